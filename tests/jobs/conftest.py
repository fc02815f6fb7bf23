"""A JobService on the fake restic and a real store, with real homes under tmp_path: each
test runs on every store (tests/jobs/stores.py: in memory, the JSON state file, PostgreSQL)
and takes milliseconds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest

from fa_restic.jobs.intake import Caller
from fa_restic.jobs.models import BackupRecord, JobRecord
from fa_restic.jobs.service import JobOptions, JobService
from fa_restic.metrics import Metrics
from fa_restic.names import JobKind, JobStatus, home_of
from fa_restic.store import Store, Value
from tests.jobs.fake_restic import FakeRestic
from tests.jobs.stores import (
    STORE_KINDS,
    Backing,
    DatabaseBacking,
    MemoryBacking,
    RecordingStore,
    StateBacking,
)

Record = TypeVar("Record", bound=JobRecord)

WAIT_LIMIT = 2.0
"""How long `until` waits: everything here happens within milliseconds."""


async def until(check: Callable[[], bool], what: str = "", limit: float = WAIT_LIMIT) -> None:
    """Waits until `check()` holds, looking every half millisecond; fails after `limit`."""
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, f"not reached within {limit}s: {what}"
        await asyncio.sleep(0.0005)


async def step_until(check: Callable[[], bool], what: str = "", steps: int = 1000) -> None:
    """Gives the event loop one turn at a time until `check()` holds: for a test that must
    act inside a window one or two turns long (a job taken but not started, ...)."""
    for _ in range(steps):
        if check():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"not reached within {steps} turns: {what}")


def options_for(data_root: Path, **changes: object) -> JobOptions:
    """JobOptions for the tests: no retry waits, no confinement (restic is fake)."""
    values: dict[str, object] = {
        "max_running": 2,
        "lock_wait_seconds": 0.0,
        "data_root": data_root,
        "confine_backups": False,
    }
    values.update(changes)
    return JobOptions(**values)  # type: ignore[arg-type]


@dataclass
class Harness:
    """A started JobService, its fake restic and its store, and the homes it backs up.

    `store` is the service's store, which keeps every batch it acknowledged (`statuses`)
    and can hold writes (`holds`); `backing` is where it keeps them."""

    service: JobService
    restic: FakeRestic
    store: RecordingStore
    backing: Backing
    data_root: Path
    stopped: bool = field(default=False)

    async def stored(self, collection: str, key: int | str) -> Value | None:
        """Returns the durable record, or None: read through the service's store, or once
        the service stopped, through a new store on the same records (as a restart)."""
        if self.stopped:
            return await self.backing.read(collection, key)
        return await self.store.fetch(collection, str(key))

    def path(self, user: str, name: str = "docs") -> Path:
        """Returns a real folder `name` in `user`'s home (made with a file in it)."""
        folder = home_of(self.data_root, user) / name
        if not folder.exists():
            folder.mkdir(parents=True)
            (folder / "a.txt").write_text("a\n")
        return folder

    async def backup(
        self, user: str, backup_id: int, *, admin: bool = False, name: str = "docs"
    ) -> BackupRecord:
        """POSTs a backup of folder `name` as `user`."""
        caller = Caller(user, admin=admin)
        return await self.service.submit_backup(caller, backup_id, self.path(user, name))

    async def backup_record(self, backup_id: int) -> BackupRecord:
        """Returns the backup record (live or finished); raises KeyError if there is none."""
        record = await self.service.records.backup(backup_id)
        if record is None:
            raise KeyError(backup_id)
        return record

    async def ended(self, record: Record, what: str = "") -> Record:
        """Waits until `record` is terminal and its task is gone; returns it."""
        kind = JobKind.BACKUP if isinstance(record, BackupRecord) else JobKind.RESTORE
        await until(
            lambda: (
                record.status.is_terminal
                and self.service.scheduler.task_of((kind, record.id)) is None
            ),
            what or f"{kind} {record.id} ended (now {record.status})",
        )
        return record

    async def counted(self, collection: str, total: int) -> None:
        """Waits until the store's counts say `total` records of `collection` (a database's
        are read in the background, a moment after the writes)."""
        await until(
            lambda: sum(self.store.counts(collection).values()) == total,
            f"{total} {collection} records counted (now {self.store.counts(collection)})",
        )

    async def running(self, record: JobRecord) -> None:
        await until(lambda: record.status is JobStatus.RUNNING, f"job {record.id} running")

    async def idle(self) -> None:
        """Waits until no job runs or waits and no maintenance runs."""
        scheduler = self.service.scheduler
        await until(
            lambda: (
                scheduler.running_count == 0
                and scheduler.queued_count == 0
                and scheduler.exclusive_name is None
            ),
            "scheduler idle",
        )

    async def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            await self.service.stop()


class ServiceMaker(Protocol):
    """The `make_service` fixture: builds, loads and starts a JobService."""

    def __call__(
        self,
        *,
        store: Store | None = None,
        restic: FakeRestic | None = None,
        wait_for_startup: bool = True,
        **options: object,
    ) -> Awaitable[Harness]: ...


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = (tmp_path / "data").resolve()
    (root / "users").mkdir(parents=True)
    return root


@pytest.fixture(params=STORE_KINDS)
def backing(request: pytest.FixtureRequest, tmp_path: Path) -> Backing:
    """Where the test's records live: each test runs once on every store."""
    kind = request.param
    if kind == "memory":
        return MemoryBacking()
    if kind == "state":
        return StateBacking(tmp_path / "state" / "state.json")
    url: Any = request.getfixturevalue("database_url")  # only for this store: PostgreSQL
    return DatabaseBacking(str(url))


@pytest.fixture
async def make_service(data_root: Path, backing: Backing) -> AsyncIterator[ServiceMaker]:
    """Builds, loads and starts a JobService; waits for its start-up work to end.

    Its store is a new one on `backing` unless given. Every service made is stopped at the
    end of the test. `wait_for_startup=False` returns as soon as `start` has (a test that
    holds the start-up work).
    """
    made: list[Harness] = []

    async def make(
        *,
        store: Store | None = None,
        restic: FakeRestic | None = None,
        wait_for_startup: bool = True,
        **options: object,
    ) -> Harness:
        recording = RecordingStore(store if store is not None else backing.new())
        restic = restic if restic is not None else FakeRestic()
        service = JobService(
            options_for(data_root, **options), recording, restic, Metrics(str(restic.version))
        )
        harness = Harness(service, restic, recording, backing, data_root)
        made.append(harness)
        unlocks = len(restic.calls_of("unlock"))
        service.load(await recording.start())
        await service.start()
        if not wait_for_startup:
            return harness
        # The start-up work (init, unlock, settling) is exclusive: it ends before any job.
        await until(lambda: len(restic.calls_of("unlock")) > unlocks, "start-up unlock")
        await until(lambda: service.scheduler.exclusive_name != "startup", "start-up ended")
        return harness

    yield make
    for harness in made:
        await harness.stop()


@pytest.fixture
async def harness(make_service: ServiceMaker) -> Harness:
    """A started service with the default test options (max_running 2)."""
    return await make_service()
