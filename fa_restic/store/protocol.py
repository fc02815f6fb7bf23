"""What the job layer needs of a store; the JSON journal is one, a cluster's database another."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from fa_restic.store.state import Collections, Operation


class Store(Protocol):
    """Durable collections of JSON records, changed in atomic batches."""

    def load(self) -> Collections:
        """Returns every record; raises StateError when the store cannot be read."""
        ...

    async def write(self, operations: Iterable[Operation]) -> None:
        """Persists a batch of changes atomically; returns once they are durable."""
        ...

    def close(self) -> None:
        """Waits for pending writes and releases the store."""
        ...
