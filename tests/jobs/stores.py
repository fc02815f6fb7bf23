"""The stores the job layer's tests run on, and a window onto what each was asked to write.

Every test of tests/jobs runs on three stores (the `backing` fixture): the MemoryStore, the
JSON StateStore in tmp_path and the DatabaseStore on a fresh database of the throwaway
PostgreSQL. A test reads what is durable through the store itself, or, once the service
stopped, through a new instance of it on the same file or database (as a restart would).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from fa_restic.cluster.store import DatabaseStore
from fa_restic.jobs.records import LAYOUT
from fa_restic.store import Cleared, Collections, Operation, Put, StateStore, Store, Update, Value
from tests.jobs.memory_store import MemoryStore

STORE_KINDS = ("memory", "state", "database")


class Backing(Protocol):
    """Where a test's records live: a new store on it is the next start's."""

    kind: str

    def new(self) -> Store:
        """Returns a store, not started, on the records the last one left."""
        ...

    async def read(self, collection: str, key: str | int) -> Value | None:
        """Returns what is durable for one record (the stores on it must be stopped)."""
        ...


async def _read_through(store: Store, collection: str, key: str | int) -> Value | None:
    await store.start()
    try:
        return await store.fetch(collection, str(key))
    finally:
        await store.stop()


@dataclass
class MemoryBacking:
    """Records in memory: a new store starts from what the last one holds."""

    kind: str = "memory"
    last: MemoryStore | None = None

    def new(self) -> Store:
        self.last = MemoryStore(self.last.collections if self.last is not None else None)
        return self.last

    async def read(self, collection: str, key: str | int) -> Value | None:
        return await _read_through(
            MemoryStore(self.last.collections if self.last else None), collection, key
        )


@dataclass
class StateBacking:
    """The JSON state file (with its index and journal) at `path`."""

    path: Path
    kind: str = "state"

    def new(self) -> Store:
        return StateStore(self.path, LAYOUT)

    async def read(self, collection: str, key: str | int) -> Value | None:
        return await _read_through(self.new(), collection, key)


@dataclass
class DatabaseBacking:
    """A database of the throwaway PostgreSQL."""

    url: str
    kind: str = "database"
    made: int = field(default=0)
    counts_delay: float = 0.01
    """Short: counts of a test are read at once, not half a second later (a test of what
    must not rest on the cached counts makes it long)."""

    def new(self) -> Store:
        self.made += 1
        return DatabaseStore(
            self.url,
            layout=LAYOUT,
            node=f"test-{self.made}",
            counts_delay=self.counts_delay,
            whole_counts_every=0.0,
        )

    async def read(self, collection: str, key: str | int) -> Value | None:
        return await _read_through(self.new(), collection, key)


class RecordingStore:
    """Any Store, and every batch it acknowledged, in order: a test reads which statuses a
    record was written with. A test may also hold the next writes (`holds`): each waits for
    the first event of the list before it reaches the store."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.batches: list[list[Operation]] = []
        self.holds: list[asyncio.Event] = []

    async def start(self) -> Collections:
        return await self.inner.start()

    async def write(self, operations: Iterable[Operation]) -> Cleared:
        batch = list(operations)
        if not batch:
            return {}
        if self.holds:
            await self.holds.pop(0).wait()
        cleared = await self.inner.write(batch)
        self.batches.append(batch)
        return cleared

    async def fetch(self, collection: str, key: str) -> Value | None:
        return await self.inner.fetch(collection, key)

    async def fetch_page(
        self,
        collection: str,
        *,
        owner: str | None = None,
        label: str | None = None,
        before: int | None = None,
        limit: int = 100,
    ) -> list[Value]:
        return await self.inner.fetch_page(
            collection, owner=owner, label=label, before=before, limit=limit
        )

    def counts(self, collection: str) -> dict[str, int]:
        return self.inner.counts(collection)

    async def stop(self) -> None:
        await self.inner.stop()

    def statuses(self, collection: str, key: int | str) -> list[str]:
        """Returns the statuses record `key` was written with, in order (repeats folded)."""
        seen: list[str] = []
        for batch in self.batches:
            for operation in batch:
                if not isinstance(operation, (Put, Update)):
                    continue
                if operation.collection != collection or operation.key != str(key):
                    continue
                fields = operation.value if isinstance(operation, Put) else operation.fields
                status = fields.get("status")
                if status is not None and (not seen or seen[-1] != status):
                    seen.append(status)
        return seen


def _conforms(store: RecordingStore) -> Store:
    """mypy checks here that RecordingStore is a Store."""
    return store
