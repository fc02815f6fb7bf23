"""What the job layer needs of a store; the JSON journal is one, a cluster's database another."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

from fa_restic.store.operations import Collections, Operation, Value


class Store(Protocol):
    """Durable collections of JSON records, changed in atomic batches.

    Records of an indexed collection (its Layout) that are finished need not be in
    memory: `load` leaves them out, and `read` and `page` find them.
    """

    def load(self) -> Collections:
        """Returns every record but the finished ones of indexed collections; raises
        StateError when the store cannot be read."""
        ...

    async def write(self, operations: Iterable[Operation]) -> None:
        """Persists a batch of changes atomically; returns once they are durable.

        Raises OSError (nothing changed then)."""
        ...

    def read(self, collection: str, key: str) -> Value | None:
        """Returns one record, or None."""
        ...

    def page(
        self,
        collection: str,
        *,
        owner: str | None = None,
        label: str | None = None,
        before: int | None = None,
        limit: int = 100,
    ) -> list[Value]:
        """Returns up to `limit` records of an indexed collection (of `owner`, with `label`,
        if given) with a key below `before`, highest key first (through an index)."""
        ...

    def counts(self, collection: str) -> dict[str, int]:
        """Returns label -> how many records of an indexed collection."""
        ...

    def keys(self, collection: str) -> Iterator[str]:
        """Yields the key of every record of `collection`."""
        ...

    def close(self) -> None:
        """Waits for pending writes and releases the store."""
        ...
