"""The state: job records kept durable, atomic and readable by an operator."""

from fa_restic.store.protocol import Store
from fa_restic.store.state import (
    Collections,
    Delete,
    Operation,
    Put,
    StateError,
    StateStore,
    Update,
)

__all__ = [
    "Collections",
    "Delete",
    "Operation",
    "Put",
    "StateError",
    "StateStore",
    "Store",
    "Update",
]
