"""A Store in memory: applies batches as the JSON journal does and keeps every batch, so a
test can read what was durable at each step (and hold a write to look in between).

It keeps records as the job layer's Layout says (finished jobs are left out of `start`),
answering `fetch`, `fetch_page` and `counts` by scanning: simple, and the same answers."""

from __future__ import annotations

import asyncio
import copy
from collections import Counter
from collections.abc import Iterable
from typing import Any

from fa_restic.jobs.records import LAYOUT
from fa_restic.store import Clear, Collections, Delete, Layout, Operation, Put, Store, Update, Value


class MemoryStore:
    """Durable collections of JSON records in a dict; `batches` is every write, in order."""

    def __init__(self, collections: Collections | None = None, layout: Layout = LAYOUT) -> None:
        self.collections: Collections = copy.deepcopy(collections or {})
        self.layout = layout
        self.batches: list[list[Operation]] = []
        self.holds: list[asyncio.Event] = []
        """Each next write waits for the first of these (a test releases it)."""
        self.closed = False

    async def start(self) -> Collections:
        return self.load()

    def load(self) -> Collections:
        return {
            name: {
                key: copy.deepcopy(value)
                for key, value in records.items()
                if name not in self.layout.indexed or self.layout.is_live(value)
            }
            for name, records in self.collections.items()
        }

    async def fetch(self, collection: str, key: str) -> Value | None:
        return copy.deepcopy(self.collections.get(collection, {}).get(key))

    async def fetch_page(
        self,
        collection: str,
        *,
        owner: str | None = None,
        label: str | None = None,
        before: int | None = None,
        limit: int = 100,
    ) -> list[Value]:
        chosen = [
            value
            for key, value in self.collections.get(collection, {}).items()
            if (owner is None or self.layout.owner_of(value) == owner)
            and (label is None or self.layout.label_of(value) == label)
            and (before is None or int(key) < before)
        ]
        chosen.sort(key=lambda value: -int(value["id"]))
        return copy.deepcopy(chosen[:limit])

    def counts(self, collection: str) -> dict[str, int]:
        records = self.collections.get(collection, {}).values()
        return dict(Counter(self.layout.label_of(value) for value in records))

    async def write(self, operations: Iterable[Operation]) -> None:
        batch = list(operations)
        if not batch:
            return
        if self.closed:  # as StateStore's writer thread, once shut down
            raise RuntimeError("cannot schedule new futures after shutdown")
        if self.holds:
            await self.holds.pop(0).wait()
        for operation in batch:
            records = self.collections.setdefault(operation.collection, {})
            if isinstance(operation, Clear):
                records.clear()
            elif isinstance(operation, Put):
                records[operation.key] = copy.deepcopy(operation.value)
            elif isinstance(operation, Update):
                if operation.key in records:
                    records[operation.key].update(copy.deepcopy(operation.fields))
            else:
                assert isinstance(operation, Delete)
                records.pop(operation.key, None)
        self.batches.append(batch)

    async def stop(self) -> None:
        self.closed = True

    # -- what a test reads ---------------------------------------------------------------

    def record(self, collection: str, key: int | str) -> dict[str, Any] | None:
        """Returns the durable record, or None."""
        return self.collections.get(collection, {}).get(str(key))

    def statuses(self, collection: str, key: int | str) -> list[str]:
        """Returns the statuses record `key` was written with, in order (repeats folded)."""
        seen: list[str] = []
        for batch in self.batches:
            for operation in batch:
                if operation.collection != collection or operation.key != str(key):
                    continue
                status = None
                if isinstance(operation, Put):
                    status = operation.value.get("status")
                elif isinstance(operation, Update):
                    status = operation.fields.get("status")
                if status is not None and (not seen or seen[-1] != status):
                    seen.append(status)
        return seen


def _conforms(store: MemoryStore) -> Store:
    """mypy checks here that MemoryStore is a Store."""
    return store
