"""What the job layer needs of a store; the JSON journal is one, a cluster's database another."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from fa_restic.store.operations import Cleared, Collections, Operation, Value


class Store(Protocol):
    """Durable collections of JSON records, changed in atomic batches.

    Records of an indexed collection (its Layout) that are finished need not be in
    memory: `start` leaves them out, and `fetch` and `fetch_page` find them. Everything
    that may wait for a disk or a database is a coroutine.
    """

    async def start(self) -> Collections:
        """Opens the store; returns every record but the finished ones of indexed
        collections. Raises StateError when the store cannot be read."""
        ...

    async def write(self, operations: Iterable[Operation]) -> Cleared:
        """Persists a batch of changes atomically; returns once they are durable, with how
        many records each Clear of the batch removed (exact: counted as it was applied).

        Raises OSError (nothing changed then)."""
        ...

    async def fetch(self, collection: str, key: str) -> Value | None:
        """Returns one record, or None. Raises OSError."""
        ...

    async def fetch_page(
        self,
        collection: str,
        *,
        owner: str | None = None,
        label: str | None = None,
        before: int | None = None,
        limit: int = 100,
    ) -> list[Value]:
        """Returns up to `limit` records of an indexed collection (of `owner`, with `label`,
        if given) with a key below `before`, highest key first (through an index). Raises
        OSError."""
        ...

    def counts(self, collection: str) -> dict[str, int]:
        """Returns label -> how many records of an indexed collection (without waiting: a
        shared database's may be a few seconds old)."""
        ...

    async def stop(self) -> None:
        """Waits for pending writes and releases the store."""
        ...
