"""A JSON state file plus an append-only journal.

Every change is one journal line (a batch of puts and deletes), appended and
fsynced before the caller goes on, so a write costs the same with 10 or 50,000
records. Now and then the journal is folded into the JSON file (write a temporary
file, fsync, rename, fsync the folder) and emptied; replaying a journal line
that the JSON file already holds changes nothing, so a crash between the two
steps loses nothing. All file work runs on one writer thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("fa_restic.store")

FORMAT = "fa-restic-state"
VERSION = 1
MIN_COMPACTION_LINES = 1000
FILE_MODE = 0o600
"""The state file, its journal and their temporary files: the records name users and paths."""
FOLDER_MODE = 0o700
"""A folder the store makes for them."""

Value = dict[str, Any]
Collections = dict[str, dict[str, Value]]


class StateError(Exception):
    """The state file or its journal cannot be read; the message names the file."""


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


Operation = Put | Update | Delete


def _encode(operation: Operation) -> dict[str, Any]:
    if isinstance(operation, Put):
        return {"put": operation.collection, "key": operation.key, "value": operation.value}
    if isinstance(operation, Update):
        return {"update": operation.collection, "key": operation.key, "fields": operation.fields}
    return {"delete": operation.collection, "key": operation.key}


def _apply(collections: Collections, entry: Mapping[str, Any]) -> None:
    for operation in entry["ops"]:
        if "put" in operation:
            collections.setdefault(operation["put"], {})[operation["key"]] = operation["value"]
        elif "update" in operation:
            record = collections.get(operation["update"], {}).get(operation["key"])
            if record is not None:
                record.update(operation["fields"])
        else:
            collections.get(operation["delete"], {}).pop(operation["key"], None)


def _dumps(document: Any) -> bytes:
    """Returns compact JSON; orjson is several times faster than json on records."""
    try:
        return orjson.dumps(document)
    except TypeError:  # e.g. a lone surrogate, which orjson refuses: json escapes it
        return json.dumps(document, separators=(",", ":")).encode("utf-8")


def _open_private(path: Path) -> int:
    """Returns a descriptor of `path` opened for writing, emptied, mode FILE_MODE.

    The mode is set on the open file too: a file left by an older version (0644) is
    tightened, whatever the umask.
    """
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(descriptor, FILE_MODE)
    except OSError:
        os.close(descriptor)
        raise
    return descriptor


def _make_folders(folder: Path) -> None:
    """Creates `folder` and its missing parents, each mode FOLDER_MODE (Path.mkdir gives
    parents the default mode); a folder that exists is left as it is."""
    missing: list[Path] = []
    while not folder.exists():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    for made in reversed(missing):
        try:
            made.mkdir(mode=FOLDER_MODE)
        except FileExistsError:
            continue


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class StateStore:
    """The records of every collection, persisted; `load` first, then `write`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.journal_path = path.with_name(path.name + ".journal")
        self._collections: Collections = {}
        self._journal: Any = None
        self._journal_lines = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state-writer")

    def load(self) -> Collections:
        """Reads the file and its journal, folds them together and returns every record.

        Raises StateError when either is corrupt; the files are then left untouched.
        """
        collections: Collections = {}
        if self.path.exists():
            try:
                document = orjson.loads(self.path.read_bytes())
                if document.get("format") != FORMAT:
                    raise ValueError(f"not a {FORMAT} file")
                if document.get("version") != VERSION:
                    raise ValueError(f"unsupported version {document.get('version')!r}")
                collections = {
                    name: dict(records) for name, records in document["collections"].items()
                }
            except (ValueError, KeyError, AttributeError, TypeError) as error:
                raise StateError(
                    f"state file {self.path} is unreadable ({error}); it was left as it is: "
                    "run `fa-restic rebuild-state` to rebuild it from the repository"
                ) from None
        if self.journal_path.exists():
            self._replay(collections)
        self._collections = collections
        _make_folders(self.path.parent)
        self._compact()
        return {name: dict(records) for name, records in collections.items()}

    def _replay(self, collections: Collections) -> None:
        raw = self.journal_path.read_bytes()
        lines = raw.split(b"\n")
        # The last piece has no newline: an append cut short by a crash, never acknowledged.
        for number, line in enumerate(lines[:-1], start=1):
            if not line.strip():
                continue
            try:
                _apply(collections, orjson.loads(line))
            except (ValueError, KeyError, TypeError) as error:
                raise StateError(
                    f"state journal {self.journal_path} line {number} is unreadable ({error}); "
                    "it was left as it is: fix or remove the line, or run `fa-restic rebuild-state`"
                ) from None

    def _compact(self) -> None:
        document = {"format": FORMAT, "version": VERSION, "collections": self._collections}
        temporary = self.path.with_name(self.path.name + ".tmp")
        text = _dumps(document) + b"\n"
        try:
            with os.fdopen(_open_private(temporary), "wb") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError:
            temporary.unlink(missing_ok=True)
            raise
        os.replace(temporary, self.path)
        _fsync_folder(self.path.parent)
        if self._journal is not None:
            self._journal.close()
        # Emptied: the file now holds it all.
        self._journal = os.fdopen(_open_private(self.journal_path), "wb")
        os.fsync(self._journal.fileno())
        _fsync_folder(self.path.parent)
        self._journal_lines = 0

    def _write_now(self, operations: list[Operation]) -> None:
        entry = {"ops": [_encode(operation) for operation in operations]}
        line = _dumps(entry) + b"\n"
        end = self._journal.tell()
        try:
            self._journal.write(line)
            self._journal.flush()
            os.fsync(self._journal.fileno())
        except OSError:
            # A line cut short (disk full) must not glue itself to the next one.
            self._journal.seek(end)
            self._journal.truncate(end)
            raise
        _apply(self._collections, entry)
        self._journal_lines += 1
        records = sum(len(records) for records in self._collections.values())
        # Fold in when the journal is as long as the file: the rewrite costs O(records)
        # once every O(records) writes, so each write costs O(1) on average.
        if self._journal_lines >= max(MIN_COMPACTION_LINES, records):
            try:
                self._compact()
            except OSError as error:  # the journal still holds everything: try again later
                log.error("state: could not fold the journal into %s: %s", self.path, error)
                self._journal_lines = 0

    async def write(self, operations: Iterable[Operation]) -> None:
        """Persists a batch of changes atomically; returns once they are on disk (fsync)."""
        batch = list(operations)
        if not batch:
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._write_now, batch)

    def close(self) -> None:
        """Waits for pending writes and closes the journal."""
        self._executor.shutdown(wait=True)
        if self._journal is not None:
            self._journal.close()
            self._journal = None
