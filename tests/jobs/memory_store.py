"""A Store in memory: applies batches as the JSON journal does (tests/jobs/stores.py's
RecordingStore keeps the batches of any store, and holds writes, for a test to look at).

It keeps records as the job layer's Layout says (finished jobs are left out of `start`),
answering `fetch`, `fetch_page` and `counts` by scanning: simple, and the same answers."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterable

from fa_restic.jobs.records import LAYOUT
from fa_restic.store import (
    Clear,
    Cleared,
    Collections,
    Delete,
    Layout,
    Operation,
    Put,
    Store,
    Update,
    Value,
)


class MemoryStore:
    """Durable collections of JSON records in a dict."""

    def __init__(self, collections: Collections | None = None, layout: Layout = LAYOUT) -> None:
        self.collections: Collections = copy.deepcopy(collections or {})
        self.layout = layout
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

    async def write(self, operations: Iterable[Operation]) -> Cleared:
        batch = list(operations)
        if not batch:
            return {}
        if self.closed:  # as StateStore's writer thread, once shut down
            raise RuntimeError("cannot schedule new futures after shutdown")
        cleared: Cleared = {}
        for operation in batch:
            records = self.collections.setdefault(operation.collection, {})
            if isinstance(operation, Clear):
                cleared[operation.collection] = cleared.get(operation.collection, 0) + len(records)
                records.clear()
            elif isinstance(operation, Put):
                records[operation.key] = copy.deepcopy(operation.value)
            elif isinstance(operation, Update):
                if operation.key in records:
                    records[operation.key].update(copy.deepcopy(operation.fields))
            else:
                assert isinstance(operation, Delete)
                records.pop(operation.key, None)
        return cleared

    async def stop(self) -> None:
        self.closed = True


def _conforms(store: MemoryStore) -> Store:
    """mypy checks here that MemoryStore is a Store."""
    return store
