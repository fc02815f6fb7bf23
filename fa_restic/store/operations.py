"""What a store keeps (records of collections) and the changes a write makes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Value = dict[str, Any]
Collections = dict[str, dict[str, Value]]


@dataclass(frozen=True)
class Put:
    collection: str
    key: str
    value: Value


@dataclass(frozen=True)
class Update:
    """Changes some fields of a record that exists (a missing one stays missing)."""

    collection: str
    key: str
    fields: Value


@dataclass(frozen=True)
class Delete:
    collection: str
    key: str


@dataclass(frozen=True)
class Clear:
    """Deletes every record of a collection (a million deletes would be one huge line)."""

    collection: str


Operation = Put | Update | Delete | Clear

Cleared = dict[str, int]
"""What a write's Clears removed: collection -> how many records (empty without a Clear)."""


def _always(value: Value) -> bool:
    return True


@dataclass(frozen=True)
class Layout:
    """How a store keeps records: which collections are indexed, and which records stay
    in memory.

    An indexed collection has integer keys; each record has an owner and a label (e.g.
    its user and status) by which it is counted and listed. Its records for which
    `is_live` is False (finished jobs) are kept on disk and read when asked for; every
    other record is kept in memory.
    """

    indexed: frozenset[str] = frozenset()
    owner_field: str = "user"
    label_field: str = "status"
    is_live: Callable[[Value], bool] = field(default=_always)

    def owner_of(self, value: Value) -> str:
        return str(value.get(self.owner_field, ""))

    def label_of(self, value: Value) -> str:
        return str(value.get(self.label_field, ""))


def encode(operation: Operation) -> dict[str, Any]:
    """Returns the journal form of `operation`."""
    if isinstance(operation, Put):
        return {"put": operation.collection, "key": operation.key, "value": operation.value}
    if isinstance(operation, Update):
        return {"update": operation.collection, "key": operation.key, "fields": operation.fields}
    if isinstance(operation, Delete):
        return {"delete": operation.collection, "key": operation.key}
    return {"clear": operation.collection}


def decode(entry: dict[str, Any]) -> Operation:
    """Returns the operation of a journal entry; raises KeyError or TypeError if malformed."""
    if "put" in entry:
        return Put(entry["put"], entry["key"], entry["value"])
    if "update" in entry:
        return Update(entry["update"], entry["key"], entry["fields"])
    if "delete" in entry:
        return Delete(entry["delete"], entry["key"])
    return Clear(entry["clear"])
