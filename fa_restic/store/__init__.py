"""The state file: job records kept durable, atomic and readable by an operator."""

from fa_restic.store.state import Delete, Operation, Put, StateError, StateStore, Update

__all__ = ["Delete", "Operation", "Put", "StateError", "StateStore", "Update"]
