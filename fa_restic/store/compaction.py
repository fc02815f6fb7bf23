"""Writing and reading the state file's lines (fa_restic.store.state says when and why).

`write_state` runs on a thread of its own while writes go on: it reads only its
Snapshot, whose parts nobody changes (the store replaces dicts, never changes them).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from fa_restic.store.files import copy_range, dumps, fsync_folder, open_private, write_all
from fa_restic.store.index import ColdIndex, Entry, Rebuilt, save_indexes
from fa_restic.store.operations import Layout, Value

BUFFER_BYTES = 1 << 20
YIELD_EVERY = 500
"""Records encoded between two moments the compaction thread gives the GIL away: a thread
that never blocks holds it for the whole switch interval at each turn, and every request
the event loop answers meanwhile waits for it several times."""


@dataclass(frozen=True)
class Snapshot:
    """What the next state file holds: the store's records at the moment the journal turned."""

    generation: str
    header: dict[str, Any]
    hot: dict[str, dict[str, Value]]
    """Records kept in memory, by collection and key."""
    recent: dict[str, dict[int, Value]]
    """Finished records not yet in the state file."""
    meta: dict[str, dict[int, tuple[str, str]]]
    """(owner, label) of every record of `recent` (and of the hot ones)."""
    cold: dict[str, ColdIndex]
    gone: dict[str, set[int]]
    """Keys of `cold` that changed or went since: their lines are left out."""
    reader: int | None
    """The current state file, read for `cold`'s lines."""


class _Output:
    """Appends to a file through a buffer, counting where it is."""

    def __init__(self, descriptor: int) -> None:
        self.descriptor = descriptor
        self.offset = 0
        self._buffer = bytearray()

    def write(self, data: bytes) -> None:
        self._buffer += data
        self.offset += len(data)
        if len(self._buffer) >= BUFFER_BYTES:
            self.flush()

    def copy(self, source: int, offset: int, length: int) -> None:
        self.flush()
        copy_range(source, self.descriptor, offset, length)
        self.offset += length

    def flush(self) -> None:
        write_all(self.descriptor, self._buffer)
        self._buffer.clear()


def _copied(snapshot: Snapshot, name: str, output: _Output, rebuilt: Rebuilt) -> None:
    """Copies the lines of `name`'s index that still hold, in runs (by the kernel)."""
    old, gone = snapshot.cold[name], snapshot.gone.get(name, set())
    run_start = run_end = base = 0

    def finish_run() -> None:
        if run_end > run_start:
            assert snapshot.reader is not None
            output.copy(snapshot.reader, run_start, run_end - run_start)

    offsets, lengths, ids = old.offsets, old.lengths, old.ids
    for position in range(len(old)):  # a Python loop: the GIL goes back to the event loop often
        if ids[position] in gone:
            continue
        offset = offsets[position]
        if offset != run_end:
            finish_run()
            run_start = run_end = offset
            base = output.offset
        run_end = offset + lengths[position]
        rebuilt.copy(position, base + offset - run_start)
    finish_run()


def _lines(snapshot: Snapshot, output: _Output) -> dict[str, ColdIndex]:
    indexes: dict[str, ColdIndex] = {}
    for name in sorted(snapshot.meta):
        rebuilt = Rebuilt(snapshot.cold.get(name, ColdIndex()))
        _copied(snapshot, name, output, rebuilt)
        prefix = b'{"c":' + dumps(name) + b',"k":"'
        meta = snapshot.meta[name]
        for count, (number, value) in enumerate(snapshot.recent.get(name, {}).items()):
            if count % YIELD_EVERY == 0:
                time.sleep(0)  # lets the event loop's thread have the GIL
            line = prefix + str(number).encode() + b'","v":' + dumps(value) + b"}\n"
            owner, label = meta[number]
            rebuilt.add(Entry(number, output.offset, len(line), owner, label))
            output.write(line)
        indexes[name] = rebuilt.finish()
    return indexes


def write_state(
    path: Path, index_path: Path, snapshot: Snapshot, still_wanted: Callable[[], bool]
) -> tuple[dict[str, ColdIndex], int] | None:
    """Writes the state file and its index for `snapshot` (temporary files, fsync, rename:
    the index first); returns (the indexes, the file's size), or None, with nothing
    replaced, when `still_wanted()` says no at the end. Raises OSError."""
    temporary = path.with_name(path.name + ".tmp")
    descriptor = open_private(temporary)
    try:
        output = _Output(descriptor)
        output.write(dumps({**snapshot.header, "generation": snapshot.generation}) + b"\n")
        indexes = _lines(snapshot, output)
        cold_end = output.offset
        for name, records in snapshot.hot.items():
            for count, (key, value) in enumerate(records.items()):
                if count % YIELD_EVERY == 0:
                    time.sleep(0)
                output.write(dumps({"c": name, "k": key, "v": value}) + b"\n")
        output.flush()
        os.fsync(descriptor)
    except BaseException:
        os.close(descriptor)
        temporary.unlink(missing_ok=True)
        raise
    os.close(descriptor)
    if not still_wanted():
        temporary.unlink(missing_ok=True)
        return None
    write_file(index_path, save_indexes(snapshot.generation, cold_end, indexes))
    os.replace(temporary, path)
    fsync_folder(path.parent)
    return indexes, output.offset


def write_file(path: Path, pieces: list[bytes]) -> None:
    """Replaces `path` with `pieces` durably (temporary file, fsync, rename)."""
    temporary = path.with_name(path.name + ".tmp")
    descriptor = open_private(temporary)
    try:
        for piece in pieces:
            write_all(descriptor, piece)
        os.fsync(descriptor)
    except BaseException:
        os.close(descriptor)
        temporary.unlink(missing_ok=True)
        raise
    os.close(descriptor)
    os.replace(temporary, path)


def read_lines(
    raw: bytes,
    base: int,
    layout: Layout,
    keep: Callable[[str, str, Value], None],
    *,
    index: bool,
) -> dict[str, ColdIndex]:
    """Reads record lines (`raw` starts at offset `base` of the file); passes each to `keep`,
    except, when `index`, the finished records of indexed collections, whose indexes it
    returns. Raises ValueError, KeyError or TypeError on a malformed line."""
    entries: dict[str, list[Entry]] = {}
    at = 0
    while at < len(raw):
        end = raw.find(b"\n", at)
        if end < 0:
            raise ValueError(f"line at byte {base + at} is cut short")
        if end > at:
            line = orjson.loads(raw[at:end])
            name, key, value = line["c"], line["k"], line["v"]
            if index and name in layout.indexed and not layout.is_live(value):
                owner, label = layout.owner_of(value), layout.label_of(value)
                entry = Entry(int(key), base + at, end + 1 - at, owner, label)
                entries.setdefault(name, []).append(entry)
            else:
                keep(name, key, value)
        at = end + 1
    return {name: ColdIndex.build(found) for name, found in entries.items()}
