"""The embedded store: a state file of JSON lines, an index of it, and a journal.

In the state file's folder (every file mode 0600):

- `state.json`: a line naming the format, then one line per record,
  `{"c": collection, "k": key, "v": record}`: finished records first, in the order they
  were folded in, then the records that still change (pending and running jobs, meta).
- `state.json.index`: where each finished record's line is, and its owner and status
  (fa_restic.store.index); rebuilt from `state.json` when missing or stale.
- `state.json.journal`: every change since, one line per batch, appended and fsynced
  before the caller goes on, so a write costs the same with a thousand records or a million.
- `state.json.journal.N`: journals being folded into the next `state.json`.

Finished records are not kept in memory (a million of them would be gigabytes): the index
says where they are and they are read when asked for. Records finished since the last
compaction are kept encoded until it.

Compaction runs in the background once the journal or the finished records held in memory
pass a size: the journal is renamed `journal.N` (between two writes) and a new one begins;
a thread writes the new state file (the finished records' lines copied from the old one
by the kernel) and its index, fsyncs them and renames them into place; then `journal.N` is
removed. Writes go on meanwhile. A reader replays the state file, then every `journal.N`,
then the journal: replaying changes the state file already holds changes nothing, so a
crash at any point loses no acknowledged write.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from fa_restic.store import compaction
from fa_restic.store.files import dumps, fsync_folder, make_folders, open_private, write_all
from fa_restic.store.index import ColdIndex, Fresh, load_indexes, save_indexes
from fa_restic.store.operations import (
    Clear,
    Cleared,
    Collections,
    Layout,
    Operation,
    Put,
    Update,
    Value,
    decode,
    encode,
)

log = logging.getLogger("fa_restic.store")

FORMAT = "fa-restic-state"
VERSION = 2
MIN_JOURNAL_BYTES = 1 << 20
MAX_JOURNAL_BYTES = 32 << 20
JOURNAL_RATIO = 0.25
"""Compaction starts once the journal passes this much of the state file (folding in then
costs O(1) per write on average), but at least MIN_JOURNAL_BYTES and at most
MAX_JOURNAL_BYTES (a restart replays the journal: it must stay short) ..."""
QUIET_SECONDS = 0.25
"""A compaction waits for writes to pause this long (up to twice its bound)."""
RECENT_RECORDS = 20_000
"""... or once this many finished records wait in memory for it (a few tens of MB)."""


class StateError(Exception):
    """The state file or its journal cannot be read; the message names the file."""


@dataclass(slots=True)
class _Undo:
    collection: str
    key: str
    previous: Value | None = None
    cleared: tuple[Any, ...] | None = None


def _size(undo: _Undo) -> int:
    """Returns how many records the Clear that `undo` takes back removed."""
    assert undo.cleared is not None
    if len(undo.cleared) == 1:  # a collection kept whole in memory
        return len(undo.cleared[0])
    counts: Counter[str] = undo.cleared[5]  # an indexed one counts every record, cold or not
    return sum(counts.values())


class StateStore:
    """The records of every collection, persisted; `load` first, then `write`."""

    def __init__(self, path: Path, layout: Layout | None = None) -> None:
        self.path = path
        self.layout = layout or Layout()
        self.journal_path = path.with_name(path.name + ".journal")
        self.index_path = path.with_name(path.name + ".index")
        self._hot: Collections = {}
        self._recent: dict[str, dict[int, Value]] = {}
        self._recent_count = 0
        self._cold: dict[str, ColdIndex] = {}
        self._gone: dict[str, set[int]] = {}
        self._fresh: dict[str, Fresh] = {}
        self._counts: dict[str, Counter[str]] = {}
        self._reader: int | None = None
        self._journal: int | None = None
        self._journal_bytes = 0
        self._state_bytes = 0
        self._segment = 1
        self._failures = 0
        self._last_write = 0.0
        self._touched: dict[str, set[int]] | None = None
        self._cleared: set[str] = set()
        self._compaction: asyncio.Future[None] | None = None
        self._stopping = False
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state-writer")
        self._compactor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state-compactor")
        for name in self.layout.indexed:
            self._reset(name)

    def _reset(self, name: str) -> None:
        self._recent[name] = {}
        self._cold[name] = ColdIndex()
        self._gone[name] = set()
        self._fresh[name] = Fresh()
        self._counts[name] = Counter()

    # -- reading at start ----------------------------------------------------------------

    def load(self) -> Collections:
        """Reads the state file and its journals; returns the records kept in memory (all
        but the finished ones of indexed collections).

        Raises StateError when a file is corrupt; the files are then left untouched.
        """
        migrate = not self.path.exists()
        if not migrate:
            migrate = self._read_state()
        segments = sorted(self._segments())
        for _, segment in segments:
            self._replay(segment)
        whole = self._replay(self.journal_path) if self.journal_path.exists() else 0
        make_folders(self.path.parent)
        self._segment = max((number for number, _ in segments), default=0) + 1
        if migrate or segments:
            # A first start, a state file of version 1, or a compaction cut short: fold now.
            self._compact_now()
        else:
            self._open_journal(whole)
        return {name: dict(records) for name, records in self._hot.items()}

    def _segments(self) -> Iterator[tuple[int, Path]]:
        prefix = self.journal_path.name + "."
        for found in self.path.parent.glob(prefix + "*"):
            suffix = found.name[len(prefix) :]
            if suffix.isdigit():
                yield int(suffix), found

    def _read_state(self) -> bool:
        """Reads the state file; returns True when it is of an older version (to rewrite)."""
        try:
            with self.path.open("rb") as handle:
                first = handle.readline()
                header = orjson.loads(first)
                if header.get("format") != FORMAT:
                    raise ValueError(f"not a {FORMAT} file")
                if header.get("version") == 1:
                    for name, records in header["collections"].items():
                        for key, value in records.items():
                            self._set(name, key, value)
                    return True
                if header.get("version") != VERSION:
                    raise ValueError(f"unsupported version {header.get('version')!r}")
                self._state_bytes = os.fstat(handle.fileno()).st_size
                self._read_lines(handle, len(first), str(header["generation"]))
            self._reader = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except (ValueError, KeyError, AttributeError, TypeError) as error:
            raise StateError(
                f"state file {self.path} is unreadable ({error}); it was left as it is: "
                "run `fa-restic rebuild-state` to rebuild it from the repository"
            ) from None
        return False

    def _read_lines(self, handle: BinaryIO, start: int, generation: str) -> None:
        """Reads the index if it is this file's, and the lines it does not cover; without
        it, every line (and saves the index made from them)."""
        found = None
        if self.index_path.exists():
            found = load_indexes(self.index_path.read_bytes(), generation)
        if found is not None:
            start, indexes = found
            for name, index in indexes.items():
                self._install_index(name, index)
        handle.seek(start)
        made = compaction.read_lines(
            handle.read(), start, self.layout, self._set, index=found is None
        )
        if found is None:
            for name, index in made.items():
                self._install_index(name, index)
            pieces = save_indexes(generation, start, self._cold)
            compaction.write_file(self.index_path, pieces)

    def _install_index(self, name: str, index: ColdIndex) -> None:
        if name not in self.layout.indexed:
            raise ValueError(f"collection {name!r} is not indexed")
        self._cold[name] = index
        labels = Counter(index.label_codes)
        for code, count in labels.items():
            self._counts[name][index.labels[code]] += count

    def _replay(self, journal: Path) -> int:
        """Applies a journal's whole lines; returns the length they take."""
        raw = journal.read_bytes()
        lines = raw.split(b"\n")
        # The last piece has no newline: an append cut short by a crash, never acknowledged.
        for number, line in enumerate(lines[:-1], start=1):
            if not line.strip():
                continue
            try:
                self._apply([decode(entry) for entry in orjson.loads(line)["ops"]], undo=False)
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                raise StateError(
                    f"state journal {journal} line {number} is unreadable ({error}); "
                    "it was left as it is: fix or remove the line, or run `fa-restic rebuild-state`"
                ) from None
        return raw.rfind(b"\n") + 1

    # -- the records in memory -----------------------------------------------------------

    def _set(self, name: str, key: str, value: Value | None) -> None:
        """Makes `value` the record `key` of `name` (None: no record), in memory only."""
        if name not in self.layout.indexed:
            if value is None:
                self._hot.get(name, {}).pop(key, None)
            else:
                self._hot.setdefault(name, {})[key] = value
            return
        # Runs once per changed record on the event loop (a cancel-all: 50,000 times), so
        # plain dict operations on local names.
        number = int(key)
        meta = self._fresh[name].meta
        hot = self._hot.get(name)
        recent = self._recent[name]
        old = meta.get(number)
        if old is not None:
            if hot is not None:
                hot.pop(key, None)
            if recent.pop(number, None) is not None:
                self._recent_count -= 1
        else:
            old = self._forget_cold(name, number)
        counts = self._counts[name]
        if old is not None:
            counts[old[1]] -= 1
        if self._touched is not None:
            self._touched[name].add(number)
        if value is None:
            meta.pop(number, None)
            return
        layout = self.layout
        label = value.get(layout.label_field, "")
        if layout.is_live(value):
            if hot is None:
                hot = self._hot[name] = {}
            hot[key] = value
        else:
            # Kept as it is; encoded by the compaction, off the event loop.
            recent[number] = value
            self._recent_count += 1
        meta[number] = (value.get(layout.owner_field, ""), label)
        counts[label] += 1

    def _forget_cold(self, name: str, number: int) -> tuple[str, str] | None:
        """Masks `number` in the index; returns its (owner, label) if it was there."""
        if number in self._gone[name]:
            return None
        index = self._cold[name]
        position = index.find(number)
        if position is None:
            return None
        self._gone[name].add(number)
        entry = index.entry(position)
        return entry.owner, entry.label

    def _value(self, name: str, key: str) -> Value | None:
        if name not in self.layout.indexed:
            return self._hot.get(name, {}).get(key)
        hot = self._hot.get(name, {}).get(key)
        if hot is not None:
            return hot
        try:
            number = int(key)
        except ValueError:
            return None
        recent = self._recent[name].get(number)
        if recent is not None:
            return recent
        if number in self._gone[name]:
            return None
        position = self._cold[name].find(number)
        return None if position is None else self._read_cold(name, position)

    def _read_cold(self, name: str, position: int) -> Value:
        index = self._cold[name]
        assert self._reader is not None
        line = os.pread(self._reader, index.lengths[position], index.offsets[position])
        value: Value = orjson.loads(line)["v"]
        return value

    def _apply(self, batch: list[Operation], *, undo: bool) -> list[_Undo]:
        """Applies `batch` in memory; returns how to take it back (when `undo`)."""
        undos: list[_Undo] = []
        for operation in batch:
            kind = type(operation)
            if kind is Clear:
                undos.append(self._clear(operation.collection))
                continue
            name, key = operation.collection, operation.key  # type: ignore[union-attr]
            previous = None
            if undo or kind is Update:
                previous = self._value(name, key)
            if undo:
                undos.append(_Undo(name, key, previous))
            if kind is Put:
                self._set(name, key, operation.value)  # type: ignore[union-attr]
            elif kind is Update:
                if previous is not None:  # a new dict: a compaction may be reading the old one
                    self._set(name, key, {**previous, **operation.fields})  # type: ignore[union-attr]
            else:
                self._set(name, key, None)
        return undos

    def _clear(self, name: str) -> _Undo:
        hot = self._hot.pop(name, {})
        if name not in self.layout.indexed:
            return _Undo(name, "", cleared=(hot,))
        kept = (
            hot,
            self._recent[name],
            self._cold[name],
            self._gone[name],
            self._fresh[name],
            self._counts[name],
        )
        self._recent_count -= len(self._recent[name])
        self._reset(name)
        self._cleared.add(name)
        return _Undo(name, "", cleared=kept)

    def _take_back(self, undos: list[_Undo]) -> None:
        for undo in reversed(undos):
            if undo.cleared is None:
                self._set(undo.collection, undo.key, undo.previous)
            elif undo.collection not in self.layout.indexed:
                self._hot[undo.collection] = undo.cleared[0]
            else:
                name = undo.collection
                self._hot[name], self._recent[name], self._cold[name] = undo.cleared[:3]
                self._gone[name], self._fresh[name], self._counts[name] = undo.cleared[3:]
                self._recent_count += len(self._recent[name])

    # -- what the job layer reads --------------------------------------------------------

    def read(self, collection: str, key: str) -> Value | None:
        """Returns one record (finished ones are read from the state file), or None."""
        return self._value(collection, key)

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
        if given) with a key below `before`, highest key first; through the indexes, so the
        cost is that of the page, not of the collection."""
        fresh = iter(self._fresh[collection].highest(owner, label, before, limit))
        index, gone = self._cold[collection], self._gone[collection]
        cold = (
            (index.ids[position], position)
            for position in index.descending(owner, label, before)
            if index.ids[position] not in gone
        )
        found: list[Value] = []
        next_fresh = next(fresh, None)
        next_cold = next(cold, None)
        while len(found) < limit and (next_fresh is not None or next_cold is not None):
            if next_cold is None or (next_fresh is not None and next_fresh > next_cold[0]):
                assert next_fresh is not None
                value = self._value(collection, str(next_fresh))
                next_fresh = next(fresh, None)
            else:
                value = self._read_cold(collection, next_cold[1])
                next_cold = next(cold, None)
            if value is not None:
                found.append(value)
        return found

    def counts(self, collection: str) -> dict[str, int]:
        """Returns label -> how many records of an indexed collection."""
        return {label: count for label, count in self._counts[collection].items() if count}

    def keys(self, collection: str) -> Iterator[str]:
        """Yields the key of every record of `collection`."""
        yield from list(self._hot.get(collection, {}))
        if collection in self.layout.indexed:
            for number in list(self._recent[collection]):
                yield str(number)
            gone = self._gone[collection]
            for number in self._cold[collection].ids:
                if number not in gone:
                    yield str(number)

    # -- writing -------------------------------------------------------------------------

    def _open_journal(self, whole: int) -> None:
        """Opens the journal to append to, its first `whole` bytes kept: a line cut short
        by a crash (never acknowledged) must not glue itself to the next one."""
        self._journal = open_private(self.journal_path, os.O_WRONLY | os.O_APPEND)
        os.ftruncate(self._journal, whole)
        self._journal_bytes = whole

    def _append(self, batch: list[Operation]) -> int:
        line = dumps({"ops": [encode(operation) for operation in batch]}) + b"\n"
        assert self._journal is not None
        end = os.lseek(self._journal, 0, os.SEEK_END)
        try:
            write_all(self._journal, line)
            os.fsync(self._journal)
        except OSError:
            # A line cut short (disk full) must not glue itself to the next one.
            os.ftruncate(self._journal, end)
            raise
        # Counted by the thread that appends and turns the journal: exact at every moment.
        self._journal_bytes += len(line)
        return len(line)

    async def write(self, operations: Iterable[Operation]) -> Cleared:
        """Persists a batch of changes atomically; returns once they are on disk (fsync),
        with how many records each Clear removed (in memory and on disk alike).

        Raises OSError if they could not be written (nothing changed then).
        """
        batch = list(operations)
        if not batch:
            return {}
        undos = self._apply(batch, undo=True)
        cleared: Cleared = {}
        for undo in undos:
            if undo.cleared is not None:
                cleared[undo.collection] = cleared.get(undo.collection, 0) + _size(undo)
        loop = asyncio.get_running_loop()
        appended = loop.run_in_executor(self._writer, self._append, batch)
        try:
            await asyncio.shield(appended)
        except asyncio.CancelledError:
            # The line may still reach the disk: memory follows what the journal holds.
            appended.add_done_callback(lambda done: self._settle(done, undos))
            raise
        except BaseException:
            self._failures += 1
            self._take_back(undos)
            raise
        self._maybe_compact()
        return cleared

    def _settle(self, appended: asyncio.Future[int], undos: list[_Undo]) -> None:
        if appended.cancelled() or appended.exception() is not None:
            self._failures += 1
            self._take_back(undos)

    # -- compaction ----------------------------------------------------------------------

    def _maybe_compact(self) -> None:
        self._last_write = time.monotonic()
        if self._compaction is not None or self._journal is None or self._stopping:
            return
        if self._over(1):
            self._compaction = asyncio.ensure_future(self._compact_when_quiet())

    def _over(self, times: int) -> bool:
        """True when the journal or the finished records held pass `times` their bound."""
        bound = min(max(MIN_JOURNAL_BYTES, JOURNAL_RATIO * self._state_bytes), MAX_JOURNAL_BYTES)
        return self._journal_bytes >= times * bound or self._recent_count >= times * RECENT_RECORDS

    async def _compact_when_quiet(self) -> None:
        """Compacts once writes pause for QUIET_SECONDS, or at once past twice the bound.

        A compaction's thread competes with the event loop for the GIL: during a burst of
        writes (a cancel-all of 50,000 jobs) it would slow the burst and every request
        answered meanwhile; the journal can wait a moment.
        """
        while time.monotonic() - self._last_write < QUIET_SECONDS and not self._over(2):  # noqa: ASYNC110 - a pause in writes is no event
            await asyncio.sleep(QUIET_SECONDS)
        await self._compact()

    async def compact(self) -> None:
        """Folds the journal into the state file now (after a running compaction); returns
        when done. Raises OSError."""
        await self.settled()
        self._compaction = asyncio.ensure_future(self._compact())
        await self.settled()

    async def _compact(self) -> None:
        loop = asyncio.get_running_loop()
        segment = self._segment
        self._segment += 1
        # Queued behind the appends already in flight, whose changes memory holds already.
        rotated = loop.run_in_executor(self._writer, self._rotate, segment)
        snapshot = self._snapshot()
        failures = self._failures
        try:
            await rotated
            result = await loop.run_in_executor(
                self._compactor,
                compaction.write_state,
                self.path,
                self.index_path,
                snapshot,
                lambda: self._failures == failures,
            )
            if result is not None:
                self._install(*result, snapshot)
                await loop.run_in_executor(self._compactor, self._remove_segments, segment)
        except OSError as error:  # the journals still hold everything: folded next time
            log.error("state: could not fold the journal into %s: %s", self.path, error)
        finally:
            if snapshot.reader is not None:
                os.close(snapshot.reader)
            self._touched = None
            self._cleared = set()
            self._compaction = None

    @property
    def _folding(self) -> bool:
        """True from a compaction's first step (its snapshot) to its end; until then `stop`
        may drop it."""
        return self._touched is not None

    def _snapshot(self) -> compaction.Snapshot:
        self._touched = {name: set() for name in self.layout.indexed}
        self._cleared = set()
        return compaction.Snapshot(
            generation=secrets.token_hex(8),
            header={"format": FORMAT, "version": VERSION},
            hot={name: dict(records) for name, records in self._hot.items()},
            recent={name: dict(records) for name, records in self._recent.items()},
            meta={name: dict(self._fresh[name].meta) for name in self.layout.indexed},
            cold=dict(self._cold),
            gone={name: set(numbers) for name, numbers in self._gone.items()},
            reader=None if self._reader is None else os.dup(self._reader),
        )

    def _rotate(self, segment: int) -> None:
        assert self._journal is not None
        os.close(self._journal)
        self._journal = None
        turned = self.journal_path.with_name(f"{self.journal_path.name}.{segment}")
        os.replace(self.journal_path, turned)
        self._journal = open_private(self.journal_path)
        self._journal_bytes = 0
        fsync_folder(self.path.parent)

    def _install(
        self, indexes: dict[str, ColdIndex], size: int, snapshot: compaction.Snapshot
    ) -> None:
        """Takes the new state file's indexes: records folded in and unchanged since leave
        memory; those changed since stay, masking their folded line."""
        reader = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        if self._reader is not None:
            os.close(self._reader)
        self._reader, self._state_bytes = reader, size
        assert self._touched is not None
        for name in self.layout.indexed:
            index = ColdIndex() if name in self._cleared else indexes[name]
            touched = self._touched[name]
            self._cold[name] = index
            self._gone[name] = self._folded(name, index, touched, snapshot)
            recent = self._recent[name]
            for number in snapshot.recent.get(name, {}):
                if number not in touched:
                    del recent[number]
                    self._recent_count -= 1
            hot = self._hot.get(name, {})
            meta = self._fresh[name].meta
            self._fresh[name] = Fresh(
                {number: meta[number] for number in meta if number in recent or str(number) in hot}
            )

    @staticmethod
    def _folded(
        name: str, index: ColdIndex, touched: set[int], snapshot: compaction.Snapshot
    ) -> set[int]:
        """Returns the keys of `touched` that the new index holds.

        A key that was in memory when the snapshot was taken is in it if it was finished
        then (a dict lookup); only the others need a search of the index (a cancel-all
        touches 50,000 pending jobs during one compaction: 50,000 searches held the loop
        for a quarter of a second).
        """
        in_memory, recent = snapshot.meta.get(name, {}), snapshot.recent.get(name, {})
        return {
            number
            for number in touched
            if ((number in recent) if number in in_memory else (index.find(number) is not None))
        }

    def _remove_segments(self, up_to: int) -> None:
        for number, segment in self._segments():
            if number <= up_to:
                segment.unlink(missing_ok=True)
        fsync_folder(self.path.parent)

    def _compact_now(self) -> None:
        """Folds everything into a new state file, in this thread (at load)."""
        snapshot = self._snapshot()
        try:
            result = compaction.write_state(self.path, self.index_path, snapshot, lambda: True)
            assert result is not None
            if self._journal is not None:
                os.close(self._journal)
            self._journal = open_private(self.journal_path)
            fsync_folder(self.path.parent)
            self._install(*result, snapshot)
            self._remove_segments(self._segment - 1)
            self._journal_bytes = 0
        finally:
            if snapshot.reader is not None:
                os.close(snapshot.reader)
            self._touched = None

    # -- the Store protocol: what may wait, as coroutines --------------------------------

    async def start(self) -> Collections:
        """`load` on a thread (a million records' index takes a second or two)."""
        return await asyncio.to_thread(self.load)

    async def fetch(self, collection: str, key: str) -> Value | None:
        """`read`: one pread of some 20 µs, on the event loop."""
        return self.read(collection, key)

    async def fetch_page(
        self,
        collection: str,
        *,
        owner: str | None = None,
        label: str | None = None,
        before: int | None = None,
        limit: int = 100,
    ) -> list[Value]:
        """`page`: at most `limit` preads, on the event loop."""
        return self.page(collection, owner=owner, label=label, before=before, limit=limit)

    async def stop(self) -> None:
        """Ends a compaction, then `close` on a thread.

        A compaction still waiting for writes to pause is dropped (the journal holds its
        changes); one under way is awaited, since its last steps run on the event loop and
        would otherwise close and reopen the files `close` closes.
        """
        self._stopping = True  # no compaction starts from here on
        compaction = self._compaction
        if compaction is not None:
            if not self._folding:
                compaction.cancel()
            await asyncio.wait([compaction])
            self._compaction = None
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Waits for pending writes and closes the files.

        Raises RuntimeError while a compaction is pending or under way: a store that an
        event loop writes to is closed with `stop`.
        """
        if self._compaction is not None and not self._compaction.done():
            raise RuntimeError("the state store is compacting: close it with stop()")
        self._writer.shutdown(wait=True)
        self._compactor.shutdown(wait=True)
        for descriptor in (self._journal, self._reader):
            if descriptor is not None:
                os.close(descriptor)
        self._journal = self._reader = None

    async def settled(self) -> None:
        """Returns once no compaction runs (for tests and benchmarks)."""
        while self._compaction is not None:
            await asyncio.shield(self._compaction)

    @property
    def sizes(self) -> dict[str, int]:
        """Returns the bytes of the state file, the journal and the index, and how many
        finished records wait in memory for the next compaction."""
        return {
            "state": self._state_bytes,
            "journal": self._journal_bytes,
            "recent": self._recent_count,
            "index": sum(index.nbytes for index in self._cold.values()),
        }
