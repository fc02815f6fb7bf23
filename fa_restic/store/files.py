"""Private files written durably: the state file, its index and journals (SPEC §7, §9)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import orjson

FILE_MODE = 0o600
"""The state file, its journal and their temporary files: the records name users and paths."""
FOLDER_MODE = 0o700
"""A folder the store makes for them."""


def dumps(document: Any) -> bytes:
    """Returns compact JSON; orjson is several times faster than json on records."""
    try:
        return orjson.dumps(document)
    except TypeError:  # e.g. a lone surrogate, which orjson refuses: json escapes it
        return json.dumps(document, separators=(",", ":")).encode("utf-8")


def open_private(path: Path, flags: int = os.O_WRONLY | os.O_TRUNC) -> int:
    """Returns a descriptor of `path` opened with `flags` (and O_CREAT), mode FILE_MODE.

    The mode is set on the open file too: a file left by an older version (0644) is
    tightened, whatever the umask.
    """
    descriptor = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(descriptor, FILE_MODE)
    except OSError:
        os.close(descriptor)
        raise
    return descriptor


def make_folders(folder: Path) -> None:
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


def fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_all(descriptor: int, data: bytes | bytearray | memoryview) -> None:
    """Writes all of `data` (os.write may write less)."""
    view = memoryview(data)
    while view:
        view = view[os.write(descriptor, view) :]


def copy_range(source: int, target: int, offset: int, length: int) -> None:
    """Appends `length` bytes of `source` from `offset` to `target` (in the kernel when it can)."""
    while length > 0:
        try:
            copied = os.copy_file_range(source, target, length, offset)
        except OSError:  # another file system, or no copy_file_range: copy through memory
            copied = 0
        if copied == 0:
            chunk = os.pread(source, min(length, 1 << 20), offset)
            if not chunk:
                raise OSError(f"state file shorter than its index (at {offset})")
            write_all(target, chunk)
            copied = len(chunk)
        offset += copied
        length -= copied
