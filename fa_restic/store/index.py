"""Where each finished record lies in the state file, in a few bytes per record.

A year of records is about a million, nearly all finished and never changed again. As
objects they would cost kilobytes each; here each costs about 40 bytes of flat arrays
(id, offset, length, owner, label, and three orderings of positions), and the record is
read from the state file when asked for. The arrays are saved beside the state file
(`state.json.index`), so a restart loads them in milliseconds instead of parsing every line.

An index never changes once built: records that change or go later are masked by the
store (`gone`), and the next compaction builds a new index.
"""

from __future__ import annotations

import bisect
import heapq
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

INDEX_FORMAT = "fa-restic-state-index"


@dataclass(frozen=True)
class Entry:
    """One record of a collection, as the index keeps it."""

    key: int
    offset: int
    length: int
    owner: str
    label: str


@dataclass
class ColdIndex:
    """The records of one collection in the state file; positions are in file order."""

    ids: array[int] = field(default_factory=lambda: array("q"))
    offsets: array[int] = field(default_factory=lambda: array("q"))
    lengths: array[int] = field(default_factory=lambda: array("i"))
    owner_codes: array[int] = field(default_factory=lambda: array("i"))
    label_codes: array[int] = field(default_factory=lambda: array("b"))
    owners: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    by_id: array[int] = field(default_factory=lambda: array("i"))
    """Positions in ascending id."""
    by_owner: array[int] = field(default_factory=lambda: array("i"))
    """Positions in ascending (owner, id); owner_starts[code] is where an owner's run starts."""
    owner_starts: array[int] = field(default_factory=lambda: array("q"))
    by_label: array[int] = field(default_factory=lambda: array("i"))
    label_starts: array[int] = field(default_factory=lambda: array("q"))

    _ARRAYS = (
        "ids",
        "offsets",
        "lengths",
        "owner_codes",
        "label_codes",
        "by_id",
        "by_owner",
        "owner_starts",
        "by_label",
        "label_starts",
    )

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        """Returns the bytes its arrays hold."""
        return sum(len(a) * a.itemsize for a in (getattr(self, n) for n in self._ARRAYS))

    @classmethod
    def build(cls, entries: Iterable[Entry]) -> ColdIndex:
        """Returns the index of `entries` (in file order)."""
        index = cls()
        owner_code: dict[str, int] = {}
        label_code: dict[str, int] = {}
        for entry in entries:  # a Python loop: a compaction thread gives the GIL back often
            index.ids.append(entry.key)
            index.offsets.append(entry.offset)
            index.lengths.append(entry.length)
            index.owner_codes.append(owner_code.setdefault(entry.owner, len(owner_code)))
            index.label_codes.append(label_code.setdefault(entry.label, len(label_code)))
        index.owners = list(owner_code)
        index.labels = list(label_code)
        index._order()
        return index

    def _order(self) -> None:
        ids, owners, labels = self.ids, self.owner_codes, self.label_codes
        positions = range(len(ids))
        # Keys are Python functions on purpose: the sort then lets other threads run.
        self.by_id = array("i", sorted(positions, key=lambda p: ids[p]))
        self.by_owner = array("i", sorted(positions, key=lambda p: (owners[p], ids[p])))
        self.by_label = array("i", sorted(positions, key=lambda p: (labels[p], ids[p])))
        self.owner_starts = _starts(self.by_owner, owners, len(self.owners))
        self.label_starts = _starts(self.by_label, labels, len(self.labels))

    def entry(self, position: int) -> Entry:
        return Entry(
            self.ids[position],
            self.offsets[position],
            self.lengths[position],
            self.owners[self.owner_codes[position]],
            self.labels[self.label_codes[position]],
        )

    def find(self, key: int) -> int | None:
        """Returns the position of `key`, or None."""
        ids = self.ids
        slot = bisect.bisect_left(self.by_id, key, key=ids.__getitem__)
        if slot < len(self.by_id) and ids[self.by_id[slot]] == key:
            return self.by_id[slot]
        return None

    def descending(self, owner: str | None, label: str | None, before: int | None) -> Iterator[int]:
        """Yields positions of `owner`'s records (with `label`, if given), ids descending and
        below `before`; without an owner, those with `label` (or all)."""
        ids, labels = self.ids, self.label_codes
        wanted: int | None = None
        if label is not None:
            if label not in self.labels:
                return
            wanted = self.labels.index(label)
        if owner is not None:
            if owner not in self.owners:
                return
            code = self.owners.index(owner)
            run, low, high = self.by_owner, self.owner_starts[code], self.owner_starts[code + 1]
        elif wanted is not None:
            run, low, high = self.by_label, self.label_starts[wanted], self.label_starts[wanted + 1]
            wanted = None  # the run holds only that label
        else:
            run, low, high = self.by_id, 0, len(self.by_id)
        if before is not None:
            high = bisect.bisect_left(run, before, low, high, key=ids.__getitem__)
        for at in range(high - 1, low - 1, -1):
            position = run[at]
            if wanted is None or labels[position] == wanted:
                yield position

    # -- the file beside the state file ------------------------------------------------

    def dump(self) -> list[bytes]:
        """Returns the pieces of the index file of this collection's index."""
        header = {
            "owners": self.owners,
            "labels": self.labels,
            "sizes": [len(getattr(self, name)) for name in self._ARRAYS],
        }
        return [orjson.dumps(header) + b"\n"] + [
            getattr(self, name).tobytes() for name in self._ARRAYS
        ]

    @classmethod
    def undump(cls, header: dict[str, Any], data: memoryview, at: int) -> tuple[ColdIndex, int]:
        """Returns the index read from `data` at `at` (after its header) and where it ends."""
        index = cls(owners=list(header["owners"]), labels=list(header["labels"]))
        for name, size in zip(cls._ARRAYS, header["sizes"], strict=True):
            target: array[int] = array(getattr(index, name).typecode)
            end = at + size * target.itemsize
            target.frombytes(data[at:end])
            setattr(index, name, target)
            at = end
        return index, at


def _starts(order: array[int], codes: array[int], count: int) -> array[int]:
    starts = array("q", [0] * (count + 1))
    for position in order:
        starts[codes[position] + 1] += 1
    for code in range(count):
        starts[code + 1] += starts[code]
    return starts


def save_indexes(generation: str, cold_end: int, indexes: dict[str, ColdIndex]) -> list[bytes]:
    """Returns the bytes of an index file for `indexes` (written by the caller)."""
    head = {
        "format": INDEX_FORMAT,
        "generation": generation,
        "cold_end": cold_end,
        "collections": list(indexes),
    }
    pieces = [orjson.dumps(head) + b"\n"]
    for index in indexes.values():
        pieces.extend(index.dump())
    return pieces


def load_indexes(raw: bytes, generation: str) -> tuple[int, dict[str, ColdIndex]] | None:
    """Returns (cold_end, indexes) from an index file's bytes, or None when it is not the
    index of the state file of `generation` (then the caller reads the state file whole)."""
    try:
        end = raw.index(b"\n")
        head = orjson.loads(raw[:end])
        if head.get("format") != INDEX_FORMAT or head.get("generation") != generation:
            return None
        data, at = memoryview(raw), end + 1
        indexes: dict[str, ColdIndex] = {}
        for name in head["collections"]:
            line_end = raw.index(b"\n", at)
            indexes[name], at = ColdIndex.undump(orjson.loads(raw[at:line_end]), data, line_end + 1)
        if at != len(raw):
            return None
        return int(head["cold_end"]), indexes
    except (ValueError, KeyError, TypeError, orjson.JSONDecodeError):
        return None


class Fresh:
    """The records of one indexed collection that the store holds in memory (pending and
    running ones, and those finished since the last compaction): key -> (owner, label).

    A plain dict: a cancel-all changes 50,000 labels at once, one dict write each. A page
    scans it (bounded: what waits for the next compaction, and the live jobs), keeping the
    highest keys with a heap.
    """

    def __init__(self, meta: dict[int, tuple[str, str]] | None = None) -> None:
        self.meta: dict[int, tuple[str, str]] = {} if meta is None else meta

    def highest(
        self, owner: str | None, label: str | None, before: int | None, limit: int
    ) -> list[int]:
        """Returns up to `limit` keys (of `owner`, with `label`, below `before`), highest first."""
        return heapq.nlargest(
            limit,
            (
                key
                for key, (key_owner, key_label) in self.meta.items()
                if (owner is None or key_owner == owner)
                and (label is None or key_label == label)
                and (before is None or key < before)
            ),
        )


class Rebuilt:
    """The next index of a collection: the old one's records that still hold, copied in
    their order, then new ones. Orderings are merged, not sorted again: a sort of a
    million keys is one C call that would hold the GIL, and the event loop, for a second;
    a merge is Python code that lets the loop run between steps."""

    def __init__(self, old: ColdIndex) -> None:
        self.old = old
        self.index = ColdIndex(owners=list(old.owners), labels=list(old.labels))
        self._owner_codes = {owner: code for code, owner in enumerate(old.owners)}
        self._label_codes = {label: code for code, label in enumerate(old.labels)}
        self._mapping = array("i", [-1]) * len(old)
        self._copied = 0

    def copy(self, position: int, offset: int) -> None:
        """Keeps the old record at `position`, now at `offset` (call in file order)."""
        old, index = self.old, self.index
        self._mapping[position] = len(index.ids)
        index.ids.append(old.ids[position])
        index.offsets.append(offset)
        index.lengths.append(old.lengths[position])
        index.owner_codes.append(old.owner_codes[position])
        index.label_codes.append(old.label_codes[position])
        self._copied += 1

    def add(self, entry: Entry) -> None:
        """Adds a new record (after every copy)."""
        index = self.index
        index.ids.append(entry.key)
        index.offsets.append(entry.offset)
        index.lengths.append(entry.length)
        index.owner_codes.append(_code(self._owner_codes, index.owners, entry.owner))
        index.label_codes.append(_code(self._label_codes, index.labels, entry.label))

    def finish(self) -> ColdIndex:
        """Returns the new index."""
        index, mapping = self.index, self._mapping
        ids, owners, labels = index.ids, index.owner_codes, index.label_codes
        added = range(self._copied, len(ids))

        def merged(old_order: array[int], key: Any) -> array[int]:
            kept = (mapping[p] for p in old_order if mapping[p] >= 0)
            if not added:
                return array("i", kept)
            return array("i", heapq.merge(kept, sorted(added, key=key), key=key))

        index.by_id = merged(self.old.by_id, ids.__getitem__)
        index.by_owner = merged(self.old.by_owner, lambda p: (owners[p], ids[p]))
        index.by_label = merged(self.old.by_label, lambda p: (labels[p], ids[p]))
        index.owner_starts = _starts(index.by_owner, owners, len(index.owners))
        index.label_starts = _starts(index.by_label, labels, len(index.labels))
        return index


def _code(codes: dict[str, int], names: list[str], name: str) -> int:
    code = codes.get(name)
    if code is None:
        code = codes[name] = len(names)
        names.append(name)
    return code
