"""A Store in memory: applies batches as the JSON journal does and keeps every batch, so a
test can read what was durable at each step (and hold a write to look in between)."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterable
from typing import Any

from fa_restic.store import Collections, Delete, Operation, Put, Store, Update


class MemoryStore:
    """Durable collections of JSON records in a dict; `batches` is every write, in order."""

    def __init__(self, collections: Collections | None = None) -> None:
        self.collections: Collections = copy.deepcopy(collections or {})
        self.batches: list[list[Operation]] = []
        self.holds: list[asyncio.Event] = []
        """Each next write waits for the first of these (a test releases it)."""
        self.closed = False

    def load(self) -> Collections:
        return copy.deepcopy(self.collections)

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
            if isinstance(operation, Put):
                records[operation.key] = copy.deepcopy(operation.value)
            elif isinstance(operation, Update):
                if operation.key in records:
                    records[operation.key].update(copy.deepcopy(operation.fields))
            else:
                assert isinstance(operation, Delete)
                records.pop(operation.key, None)
        self.batches.append(batch)

    def close(self) -> None:
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
