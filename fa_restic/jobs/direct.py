"""Restores straight into dst: restic writes into a mount of dst alone (SPEC §9, 2nd bullet).

Why: the staging path (fa_restic.jobs.staging) restores into a private folder and then
moves the tree into dst; when the home is a file system of its own that move is a copy
(2.4x raw restic's time, the restore's full size free outside the home, files in dst only
at the end). Where restic can run confined (fa_restic.restic.sandbox), it writes into dst
itself, at its own speed, files appearing as they are restored.

How dst stays safe from its user (the service runs restic as root):

- restic runs in a private mount namespace in which the homes are covered by an empty
  tmpfs and only dst is mounted, writable and `nosymfollow`, at its real path; dst is
  reached from the home by an O_NOFOLLOW walk (the sandbox's writable mode). A symlink
  planted or swapped into dst, before restic starts or while it writes, at any depth, is
  never followed: the kernel answers ELOOP, and restic >= 0.17 replaces it.
- Before restic runs, with overwrite `always`, what in dst stands where the snapshot puts
  something is made ready the way the staging merge would leave it (`clear_the_way`): a
  symlink, a hard-linked file, a file where a folder goes, a folder where a file goes are
  removed by folder descriptors, never followed, never across a mount. restic < 0.17
  would otherwise fail on them (it neither replaces a symlink nor removes a folder in the
  way) or, for a hard link, write into the linked file. Skipped when dst is empty. That
  needs the snapshot's tree in memory: past `max_nodes` nodes the read stops and the
  restore is staged instead (TooManyNodes), so one user's huge backup cannot take the
  service's memory.
- restic < 0.17 writes into an existing file in place: a hard link a user makes while
  restic writes would be written through. Such a restic restores directly only where the
  home is a whole file system of its own (no hard link can lead out of it); elsewhere it
  goes through staging. restic >= 0.17 replaces a hard-linked file instead.
- Folders made for dst are the home owner's (jobs.restore.make_folder, before this).

Cancel and failure leave what restic wrote so far in dst. Tested with the real restic by
tests/integration/test_restore_safety.py (both paths) and test_restore_direct.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fa_restic.jobs.ports import ResticRunner
from fa_restic.jobs.restore import ProgressHandler, StartHandler, run_restore
from fa_restic.jobs.staging import open_folder
from fa_restic.names import Overwrite
from fa_restic.restic.client import RestoreResult
from fa_restic.restic.features import Feature
from fa_restic.restic.messages import TreeNode
from fa_restic.restic.sandbox import Confinement

_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MOUNT_INFO = "/proc/self/mountinfo"

Tree = dict[str, "Entry"]

MAX_TREE_NODES = 500_000
"""The most nodes of a snapshot a direct restore into a dst that is not empty holds (some
400 bytes each, with their tree): about 200 MB."""


class TooManyNodes(Exception):
    """The snapshot has more nodes than a direct restore may hold; it is staged instead."""


@dataclass
class Entry:
    """One node of a snapshot's tree: restic's type word, size and, for a folder, what is
    in it."""

    kind: str
    children: Tree
    size: int = 0


@dataclass(frozen=True)
class Destination:
    """Where a direct restore writes: dst, a folder inside one user's home."""

    users_root: Path
    """The real folder of the homes (symlinks resolved)."""
    user: str
    dst: Path
    """Absolute, below the real home."""

    @property
    def home(self) -> Path:
        return self.users_root / self.user

    def confinement(self) -> Confinement:
        """Returns the sandbox's writable confinement to dst; ValueError if dst is not inside."""
        relative = self.dst.relative_to(self.home).as_posix()
        return Confinement(
            str(self.users_root), self.user, "" if relative == "." else relative, writable=True
        )


def is_whole_file_system(folder: Path) -> bool:
    """Returns True if `folder` is a mount point showing the root of its file system."""
    real = os.path.realpath(folder)
    found = False
    with contextlib.suppress(OSError), open(_MOUNT_INFO, encoding="utf-8") as mounts:
        for line in mounts:
            fields = line.split(" ")
            if len(fields) > 4 and _unescape(fields[4]) == real:
                found = fields[3] == "/"  # the last mount at a path is the one seen
    return found


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo octal.
    return field.encode().decode("unicode_escape").encode("latin-1").decode(errors="replace")


def staging_reason(
    restic: ResticRunner, *, confined: bool, overwrite: Overwrite, home: Path
) -> str | None:
    """Returns None when a restore may go straight into dst, else why it is staged."""
    if not confined:
        return "restic cannot be confined here"
    if overwrite is not Overwrite.ALWAYS and not restic.has(Feature.RESTORE_OVERWRITE):
        return f"restic {restic.version} has no --overwrite {overwrite}"
    if not restic.has(Feature.RESTORE_REPLACES_SYMLINKS) and not is_whole_file_system(home):
        return f"restic {restic.version} writes through hard links; the home shares a file system"
    return None


def _wanted(path: str, include: Sequence[str]) -> bool:
    """Returns True if the restore of `include` puts something at `path` (both relative)."""
    return not include or any(
        path == entry or path.startswith(entry + "/") or entry.startswith(path + "/")
        for entry in include
    )


def build_tree(nodes: Iterable[TreeNode], include: Sequence[str] = ()) -> Tree:
    """Returns the snapshot's tree from `ls` nodes, only what restoring `include` writes."""
    entries = [entry.strip("/") for entry in include]
    tree: Tree = {}
    for node in sorted(nodes, key=lambda node: node.path.count("/")):
        relative = node.path.strip("/")
        if not relative or not _wanted(relative, entries):
            continue
        *parents, name = relative.split("/")
        level = tree
        for parent in parents:
            level = level.setdefault(parent, Entry("dir", {})).children
        entry = level.setdefault(name, Entry(node.type, {}))
        entry.kind, entry.size = node.type, node.size
    return tree


def totals(tree: Tree) -> tuple[int, int]:
    """Returns (bytes of the files, number of nodes) in `tree`, as restic counts a restore."""
    size, count = 0, 0
    for entry in tree.values():
        inner_size, inner_count = totals(entry.children)
        size += inner_size + (entry.size if entry.kind == "file" else 0)
        count += inner_count + 1
    return size, count


async def snapshot_tree(
    restic: ResticRunner,
    snapshot_id: str,
    include: Sequence[str],
    max_nodes: int = MAX_TREE_NODES,
) -> Tree:
    """Returns what restoring the snapshot (only `include`) writes; raises ResticError, or
    TooManyNodes once past `max_nodes` (restic is stopped then)."""
    nodes: list[TreeNode] = []

    def take(node: TreeNode) -> None:
        if len(nodes) == max_nodes:
            raise TooManyNodes(f"the backup has more than {max_nodes} entries and dst is not empty")
        nodes.append(node)

    await restic.ls(snapshot_id, take)
    return build_tree(nodes, include)


def is_empty(home: Path, dst: Path) -> bool:
    """Returns True if dst has nothing in it; raises StagingError if a symlink is in its way."""
    folder = open_folder(home, dst, create=False)
    try:
        return not os.listdir(folder)
    finally:
        os.close(folder)


def clear_the_way(home: Path, dst: Path, tree: Tree) -> int:
    """Removes what in dst stands where restic, restoring `tree` with overwrite `always`,
    must put something else; returns how many entries it removed.

    Raises StagingError if dst itself cannot be reached without a symlink.
    """
    folder = open_folder(home, dst, create=False)
    try:
        return _clear(folder, tree, os.fstat(folder).st_dev)
    finally:
        os.close(folder)


def _clear(folder: int, tree: Tree, device: int) -> int:
    removed = 0
    for name, entry in tree.items():
        try:
            there = os.stat(name, dir_fd=folder, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(there.st_mode) and entry.kind == "dir":
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                # A symlink swapped in meanwhile fails here (ELOOP): restic meets it
                # under nosymfollow, where it cannot lead out either.
                inner = _open_folder(folder, name)
                try:
                    removed += _clear(inner, entry.children, device)
                finally:
                    os.close(inner)
            continue
        keep = entry.kind == "file" and stat.S_ISREG(there.st_mode) and there.st_nlink == 1
        if keep or (stat.S_ISDIR(there.st_mode) and there.st_dev != device):
            continue  # a file restic rewrites itself; a mount point is never emptied
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISDIR(there.st_mode):
                _remove_tree(folder, name, device)
            else:
                os.unlink(name, dir_fd=folder)
            removed += 1
    return removed


def _open_folder(parent: int, name: str) -> int:
    try:
        return os.open(name, _DIRECTORY_FLAGS, dir_fd=parent)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise NotADirectoryError(error.errno, error.strerror, name) from None
        raise


def _remove_tree(parent: int, name: str, device: int) -> None:
    """Removes the folder `name` of `parent` and its tree, by descriptors, on `device` only."""
    folder = _open_folder(parent, name)
    try:
        if os.fstat(folder).st_dev != device:
            return  # a mount point inside: left alone (restic then reports the conflict)
        for inner in os.listdir(folder):
            if stat.S_ISDIR(os.stat(inner, dir_fd=folder, follow_symlinks=False).st_mode):
                _remove_tree(folder, inner, device)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(inner, dir_fd=folder)
    finally:
        os.close(folder)
    os.rmdir(name, dir_fd=parent)


async def restore_directly(
    restic: ResticRunner,
    snapshot_id: str,
    destination: Destination,
    on_progress: ProgressHandler,
    on_start: StartHandler,
    *,
    include: Sequence[str] = (),
    overwrite: Overwrite = Overwrite.ALWAYS,
    max_nodes: int = MAX_TREE_NODES,
) -> RestoreResult:
    """Restores a snapshot (only `include`) with restic writing into dst itself.

    Returns what restic restored; raises ResticError (a refused confinement included:
    dst changed into or behind a symlink), StagingError, or TooManyNodes (before restic
    restores anything: stage it instead).
    """
    home, dst = destination.home, destination.dst
    tree: Tree | None = None
    if not await asyncio.to_thread(is_empty, home, dst):
        tree = await snapshot_tree(restic, snapshot_id, include, max_nodes)
        if overwrite is Overwrite.ALWAYS:
            await asyncio.to_thread(clear_the_way, home, dst, tree)
    restored = await run_restore(
        restic,
        snapshot_id,
        dst,
        on_progress,
        on_start,
        confinement=destination.confinement(),
        include=include,
        overwrite=str(overwrite) if overwrite is not Overwrite.ALWAYS else None,
    )
    if tree is None:
        return restored
    # restic >= 0.17 counts a file already in dst with the same content as skipped, not
    # restored; the staging path restores everything. The same numbers on both paths:
    size, count = totals(tree)
    return RestoreResult(max(restored.bytes_restored, size), max(restored.files_restored, count))
