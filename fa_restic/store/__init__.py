"""The state: job records kept durable, atomic and readable by an operator."""

from fa_restic.store.operations import (
    Clear,
    Cleared,
    Collections,
    Delete,
    Layout,
    Operation,
    Put,
    Update,
    Value,
)
from fa_restic.store.protocol import Store
from fa_restic.store.state import StateError, StateStore

__all__ = [
    "Clear",
    "Cleared",
    "Collections",
    "Delete",
    "Layout",
    "Operation",
    "Put",
    "StateError",
    "StateStore",
    "Store",
    "Update",
    "Value",
]
