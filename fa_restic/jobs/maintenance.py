"""Exclusive repository work: unlock, forget queued deletes, prune, destroy."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fa_restic.jobs.models import ForgetRecord
from fa_restic.jobs.ports import ResticRunner
from fa_restic.jobs.records import (
    UPKEEP_KEY,
    Records,
    forget_delete,
    forget_put,
    forgets_in,
    meta_in,
    meta_put,
)
from fa_restic.jobs.retry import retry_transient
from fa_restic.jobs.scheduler import ExclusiveWork
from fa_restic.restic.errors import ErrorKind, ResticError
from fa_restic.store import Collections, Operation, Put

log = logging.getLogger("fa_restic.jobs")

FAILURE_BACKOFF_SECONDS = (5.0, 30.0, 120.0, 600.0)

Outcome = Literal["ok", "failed", "no-repository"]


@dataclass
class MaintenanceState:
    """What maintenance owes the repository; the job layer persists it."""

    prune_wanted: bool = False
    last_prune: float = 0.0
    failures: int = 0
    next_try: float = 0.0

    def failed(self, now: float) -> None:
        """Backs off after a failure so a broken repository is not hammered."""
        delay = FAILURE_BACKOFF_SECONDS[min(self.failures, len(FAILURE_BACKOFF_SECONDS) - 1)]
        self.failures += 1
        self.next_try = now + delay

    def succeeded(self) -> None:
        self.failures = 0
        self.next_try = 0.0

    @property
    def resting(self) -> bool:
        """True while backing off after a failure."""
        return time.monotonic() < self.next_try


class Upkeep:
    """The repository's upkeep between jobs: the durable forget queue and prune scheduling.

    The scheduler asks `pick` for work when no job runs or waits.
    """

    def __init__(
        self, restic: ResticRunner, records: Records, lock_wait: float, prune_interval: float
    ) -> None:
        self.restic = restic
        self.records = records
        self.lock_wait = lock_wait
        self.prune_interval = prune_interval
        self.forgets: dict[str, ForgetRecord] = {}
        self.state = MaintenanceState()

    def load(self, collections: Collections) -> None:
        """Takes the forget queue and prune wish from the store's records."""
        self.forgets = forgets_in(collections)
        saved = meta_in(collections, UPKEEP_KEY)
        self.state.prune_wanted = bool(saved.get("prune_wanted", False))

    def state_op(self) -> Put:
        return meta_put(UPKEEP_KEY, {"prune_wanted": self.state.prune_wanted})

    def want_prune(self) -> Put:
        """Asks for a prune (interrupted backups leave unused data); returns the change."""
        self.state.prune_wanted = True
        return self.state_op()

    @staticmethod
    def forget_op(forget: ForgetRecord) -> Put:
        """Returns the change that queues `forget` durably."""
        return forget_put(forget)

    def queue(self, forget: ForgetRecord) -> None:
        """Adds a forget, once its `forget_op` is on disk."""
        self.forgets[forget.snapshot_id] = forget
        self.state.succeeded()  # new work: no reason to wait out an old failure

    def clear(self) -> list[Operation]:
        """Drops every queued forget and the prune wish (the repository is gone)."""
        operations: list[Operation] = [forget_delete(key) for key in self.forgets]
        self.forgets.clear()
        self.state.prune_wanted = False
        return [*operations, self.state_op()]

    def pick(self) -> ExclusiveWork | None:
        """Returns the upkeep due now, or None."""
        if self.state.resting:
            return None
        if self.forgets:
            return ExclusiveWork(
                "forget", self._forget, preemptible=True, still_wanted=lambda: bool(self.forgets)
            )
        since = time.monotonic() - self.state.last_prune
        if self.state.prune_wanted and (
            self.state.last_prune == 0.0 or since >= self.prune_interval
        ):
            return ExclusiveWork(
                "prune",
                self._prune,
                preemptible=True,
                still_wanted=lambda: self.state.prune_wanted,
            )
        return None

    async def guarded(self, name: str, work: Callable[[], Awaitable[None]]) -> Outcome:
        """Runs repository work; returns how it went, backing off after a failure."""
        try:
            await work()
        except ResticError as error:
            if error.kind is ErrorKind.REPOSITORY_MISSING:
                self.state.succeeded()
                return "no-repository"
            log.error("maintenance %s failed: %s", name, error)
            self.state.failed(time.monotonic())
            return "failed"
        self.state.succeeded()
        return "ok"

    async def _forget(self) -> None:
        ids = sorted(self.forgets)
        gone: list[str] = []

        async def work() -> None:
            gone.extend(await forget_snapshots(self.restic, ids, self.lock_wait))

        outcome = await self.guarded("forget", work)
        if outcome == "no-repository":
            gone = ids  # no repository: nothing left to forget
        if gone:
            for snapshot_id in gone:
                del self.forgets[snapshot_id]
            deletes: list[Operation] = [forget_delete(key) for key in gone]
            await self.records.write([*deletes, self.want_prune()])
            log.info("maintenance: forgot %d snapshots", len(gone))
        if outcome == "ok" and len(gone) < len(ids):
            self.state.failed(time.monotonic())

    async def _prune(self) -> None:
        started = time.monotonic()

        async def work() -> None:
            await prune(self.restic, self.lock_wait)

        if await self.guarded("prune", work) == "ok":
            self.state.prune_wanted = False
            self.state.last_prune = time.monotonic()
            await self.records.write([self.state_op()])
            log.info("maintenance: pruned in %.1fs", time.monotonic() - started)


async def unlocking_stale(restic: ResticRunner, work: Awaitable[None]) -> None:
    """Awaits exclusive work; when a lock is in its way, removes the lock if it is stale.

    A restic that died without removing its lock (SIGKILL, or 0.14 on SIGTERM) blocks every
    exclusive command until `unlock`. Plain `unlock` leaves a live process's lock alone, so
    it is safe before the retry. Raises what `work` raised.
    """
    try:
        await work
    except ResticError as error:
        if error.kind is ErrorKind.LOCKED:
            with contextlib.suppress(ResticError):
                await restic.unlock()
        raise


async def forget_snapshots(
    restic: ResticRunner, snapshot_ids: list[str], lock_wait: float
) -> list[str]:
    """Forgets snapshots and returns those that are really gone.

    restic's `forget` exits 0 even when it removed nothing (unknown id, an
    append-only server), so the result is checked with `snapshots`.
    """

    async def forget() -> None:
        await unlocking_stale(restic, restic.forget(snapshot_ids, lock_wait=min(lock_wait, 60)))

    await retry_transient(forget, lock_wait, "forget")
    remaining = {snapshot.id for snapshot in await restic.snapshots(snapshot_ids=snapshot_ids)}
    for snapshot_id in remaining:
        log.error("forget: snapshot %s is still in the repository", snapshot_id[:12])
    return [snapshot_id for snapshot_id in snapshot_ids if snapshot_id not in remaining]


async def prune(restic: ResticRunner, lock_wait: float) -> None:
    """Reclaims the space of forgotten snapshots and interrupted backups."""

    async def run() -> None:
        await unlocking_stale(restic, restic.prune(lock_wait=min(lock_wait, 60)))

    await retry_transient(run, lock_wait, "prune")


def _remove_folder(path: Path) -> None:
    """Removes a folder's contents, then the folder itself where that is allowed.

    Under systemd the repository folder may be a ReadWritePaths mount point that
    cannot itself be removed; an empty folder is as good (restic init fills it).
    Raises OSError when the contents cannot be removed.
    """
    if not path.exists():
        return
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    with contextlib.suppress(OSError):
        path.rmdir()


@dataclass(frozen=True)
class DestroyReport:
    method: str
    snapshots_removed: int


async def destroy(
    restic: ResticRunner, local_path: Path | None, lock_wait: float, on_phase: Callable[[str], None]
) -> DestroyReport:
    """Removes a local repository folder, or forgets and prunes every snapshot of a remote one."""
    if local_path is not None:
        on_phase("removing the repository folder")
        count = 0
        try:
            count = len(await restic.snapshots())
        except ResticError as error:
            if error.kind is not ErrorKind.REPOSITORY_MISSING:
                log.warning("destroy: could not count snapshots: %s", error)
        await asyncio.to_thread(_remove_folder, local_path)
        return DestroyReport("removed the local repository folder", count)
    on_phase("forgetting every snapshot")
    try:
        snapshots = await restic.snapshots()
    except ResticError as error:
        if error.kind is ErrorKind.REPOSITORY_MISSING:
            return DestroyReport("no repository to remove", 0)
        raise
    ids = [snapshot.id for snapshot in snapshots]
    if ids:
        gone = await forget_snapshots(restic, ids, lock_wait)
        if len(gone) != len(ids):
            raise ResticError(
                ErrorKind.FATAL, f"{len(ids) - len(gone)} snapshots could not be forgotten"
            )
    on_phase("pruning")
    await prune(restic, lock_wait)
    return DestroyReport("forgot every snapshot and pruned (remote repository)", len(ids))
