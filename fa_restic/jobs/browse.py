"""Browsing a successful backup's tree, and checking a selective restore's entries.

restic reopens the repository (keys, index) on every `ls`: seconds for a large one. So a
snapshot's whole tree is read once, with one `restic ls --json` streamed line by line,
into a compact form (one tuple per entry, grouped by folder and sorted by name), and kept
in a least-recently-used cache bounded by a byte budget (`[restic] browse_cache_bytes`).
A level is then a dictionary lookup and a slice. Snapshots never change, so an entry is
never stale.

A tree larger than the whole budget is never held: its read stops once past the budget
(one user's huge backup must not take the service's memory), and its levels are answered
one at a time, uncached, by `restic ls SNAP /folder`, which prints the folder's node and
what is directly in it. restic keeps a tree's nodes sorted by name (`restic check` reports
a tree that is not), so a page stops reading once it has `limit` entries.

Paths are relative to what was backed up: the service backs a folder up as `.` from inside
it and a file by its name from its folder (jobs.backup), so the tree's top is the folder's
contents (or the one file) and a tree path is the relative path with a leading `/`.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import sys
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from fa_restic.jobs.errors import JobConflict, JobError
from fa_restic.jobs.models import BackupRecord
from fa_restic.jobs.ports import ResticRunner
from fa_restic.names import JobStatus
from fa_restic.restic.messages import TreeNode

log = logging.getLogger("fa_restic.jobs")

DEFAULT_BUDGET_BYTES = 256 << 20
"""The cache's default budget: about a million entries (~230 bytes each)."""
_FOLDER_OVERHEAD = 160
"""A folder's dictionary slot and list, beyond its entries and its path string."""
_STRING_BYTES = sys.getsizeof("")
_ENTRY_BYTES = 8 + sys.getsizeof((1, 2, 3, 4)) + 2 * _STRING_BYTES + 32
"""An entry's list slot, its tuple, its name's and mtime's string headers, its size's int."""
_by_name = itemgetter(0)
_TOO_LARGE_KEPT = 1000

Entry = tuple[str, str, int, str]
"""(name, type, size, mtime) of one entry of a folder."""


class NotInBackup(JobError):
    """A path that is not in the backup (or not a folder where one is needed)."""


class TreeTooLarge(Exception):
    """A tree's read passed its byte limit (Tree.add raises it to stop `restic ls`)."""


class _PageFull(Exception):
    """A level's page has all it needs (raised to stop `restic ls`)."""


ECHO_LIMIT = 200
"""The most characters of a user's path a refusal repeats (SPEC §9)."""


def shown(path: str) -> str:
    """Returns `path` quoted for a message, cut to ECHO_LIMIT characters."""
    cut = path if len(path) <= ECHO_LIMIT else path[: ECHO_LIMIT - 1] + "…"
    return repr(cut)


def clean_path(given: str) -> str:
    """Returns a path in a backup as the cache keys it: no leading, trailing or doubled `/`,
    no `.` parts (`""` is the top). Raises NotInBackup for a `..` part."""
    if "\x00" in given:  # no entry has one; and restic's argv cannot carry it
        raise NotInBackup("a path in a backup may not contain a NUL character")
    parts = [part for part in given.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise NotInBackup("a path in a backup may not contain '..'")
    return "/".join(parts)


class Tree:
    """One snapshot's tree: folder path -> its entries sorted by name; `bytes` is an
    estimate of the memory it holds."""

    def __init__(self, limit_bytes: int | None = None) -> None:
        self.folders: dict[str, list[Entry]] = {"": []}
        self.bytes = _FOLDER_OVERHEAD
        self.entries = 0
        self.limit_bytes = limit_bytes

    def add(self, node: TreeNode) -> None:
        """Takes one node of `restic ls --json` (its path from the tree's top).

        Runs once per line of a listing: arithmetic instead of sys.getsizeof (which is
        exact only for ASCII names; close enough for a budget)."""
        path, name, kind, size, mtime = node
        path = path.strip("/")
        parent = path.rpartition("/")[0]
        folder = self.folders.get(parent)
        if folder is None:  # restic lists a folder before its contents; a stray node anyway
            folder = self.folders[parent] = []
            self.bytes += _FOLDER_OVERHEAD + _STRING_BYTES + len(parent)
        folder.append((name, kind, size, mtime))
        self.entries += 1
        self.bytes += _ENTRY_BYTES + len(name) + len(mtime)
        if kind == "dir" and path not in self.folders:
            self.folders[path] = []
            self.bytes += _FOLDER_OVERHEAD + _STRING_BYTES + len(path)
        if self.limit_bytes is not None and self.bytes > self.limit_bytes:
            raise TreeTooLarge(f"{self.entries} entries, ~{self.bytes} bytes")

    def finish(self) -> None:
        """Sorts every folder by name (restic's order already: timsort just checks it)."""
        for entries in self.folders.values():
            entries.sort(key=_by_name)

    def find(self, path: str) -> Entry | None:
        """Returns the entry at `path` (cleaned), None if there is none; the top has none."""
        parent, _, name = path.rpartition("/")
        entries = self.folders.get(parent)
        if entries is None:
            return None
        index = bisect.bisect_left(entries, name, key=_by_name)
        if index < len(entries) and entries[index][0] == name:
            return entries[index]
        return None

    def level(self, path: str, after: str | None, limit: int) -> tuple[list[Entry], str | None]:
        """Returns up to `limit` entries of the folder `path` named after `after`, and the
        `after` of the next page (None at the end); raises NotInBackup if no such folder."""
        entries = self.folders.get(path)
        if entries is None:
            what = "a file" if self.find(path) is not None else "not"
            raise NotInBackup(f"path: {shown(path)} is {what} a folder in the backup")
        start = 0 if after is None else bisect.bisect_right(entries, after, key=_by_name)
        page = entries[start : start + limit]
        more = start + limit < len(entries)
        return page, (page[-1][0] if more and page else None)


@dataclass(frozen=True)
class Level:
    """One page of one folder of a backup, as the API shows it."""

    path: str
    items: list[dict[str, Any]]
    next_after: str | None


def _level_of(path: str, name: str) -> bool:
    """True if the tree path `name` (cleaned) is directly in the folder `path` (cleaned)."""
    return name.rpartition("/")[0] == path


class TreeCache:
    """Snapshot trees read with `restic ls`, least recently used first out, within a budget.

    Concurrent requests for a tree not yet cached share one `restic ls`, which runs inside
    `reading()` (the scheduler's: never beside forget, prune or destroy).
    """

    def __init__(
        self,
        restic: ResticRunner,
        budget_bytes: int = DEFAULT_BUDGET_BYTES,
        reading: Callable[[], AbstractAsyncContextManager[None]] = nullcontext,
    ) -> None:
        self.restic = restic
        self.budget_bytes = budget_bytes
        self.reading = reading
        self.bytes = 0
        self._trees: OrderedDict[str, Tree] = OrderedDict()
        self._loading: dict[str, asyncio.Future[Tree | None]] = {}
        self._too_large: OrderedDict[str, None] = OrderedDict()
        """Snapshots whose tree is larger than the budget (the newest _TOO_LARGE_KEPT)."""

    def cached(self, snapshot_id: str) -> Tree | None:
        """Returns a cached tree (now the most recently used), or None."""
        tree = self._trees.get(snapshot_id)
        if tree is not None:
            self._trees.move_to_end(snapshot_id)
        return tree

    async def tree(self, snapshot_id: str) -> Tree | None:
        """Returns a snapshot's tree, from the cache or read once; None for a tree larger
        than the whole budget (see `level` and `present`). Raises ResticError."""
        tree = self.cached(snapshot_id)
        if tree is not None or snapshot_id in self._too_large:
            return tree
        loading = self._loading.get(snapshot_id)
        if loading is None:
            loading = self._loading[snapshot_id] = asyncio.ensure_future(self._read(snapshot_id))
            loading.add_done_callback(lambda _: self._loading.pop(snapshot_id, None))
        # Shielded: one caller going away does not stop the read the others wait for.
        return await asyncio.shield(loading)

    async def _read(self, snapshot_id: str) -> Tree | None:
        tree = Tree(limit_bytes=self.budget_bytes)
        try:
            async with self.reading():
                await self.restic.ls(snapshot_id, tree.add)
        except TreeTooLarge as error:
            log.info(
                "browse: the tree of snapshot %s exceeds the cache budget (%d bytes) at %s: "
                "its levels are read one at a time",
                snapshot_id[:12],
                self.budget_bytes,
                error,
            )
            self._too_large[snapshot_id] = None
            if len(self._too_large) > _TOO_LARGE_KEPT:
                self._too_large.popitem(last=False)
            return None
        tree.finish()
        self._keep(snapshot_id, tree)
        return tree

    async def level(
        self, snapshot_id: str, path: str, after: str | None, limit: int
    ) -> tuple[list[Entry], str | None]:
        """Returns a page of the folder `path` (cleaned) as Tree.level does, read with
        `restic ls SNAP /path` and kept nowhere: memory for `limit` entries, whatever the
        tree. Raises NotInBackup or ResticError."""
        page: list[Entry] = []
        more = False
        kind: str | None = "dir" if path == "" else None

        def on_node(node: TreeNode) -> None:
            nonlocal kind, more
            name = node.path.strip("/")
            if name == path:
                kind = node.type
            elif _level_of(path, name) and (after is None or node.name > after):
                if len(page) == limit:
                    more = True
                    raise _PageFull
                page.append((node.name, node.type, node.size, node.mtime))

        with contextlib.suppress(_PageFull):
            async with self.reading():
                await self.restic.ls(snapshot_id, on_node, ["/" + path])
        if kind != "dir":
            what = "not" if kind is None else "a file"
            raise NotInBackup(f"path: {shown(path)} is {what} a folder in the backup")
        return page, (page[-1][0] if more and page else None)

    async def present(self, snapshot_id: str, paths: Sequence[str]) -> set[str]:
        """Returns which of `paths` (cleaned, not the top) are in the snapshot, with one
        `restic ls` of them all, kept nowhere. Raises ResticError."""
        wanted = set(paths)
        found: set[str] = set()

        def on_node(node: TreeNode) -> None:
            name = node.path.strip("/")
            if name in wanted:
                found.add(name)

        async with self.reading():
            await self.restic.ls(snapshot_id, on_node, ["/" + path for path in sorted(wanted)])
        return found

    def _keep(self, snapshot_id: str, tree: Tree) -> None:
        while self._trees and self.bytes + tree.bytes > self.budget_bytes:
            _, evicted = self._trees.popitem(last=False)
            self.bytes -= evicted.bytes
        self._trees[snapshot_id] = tree
        self.bytes += tree.bytes
        log.info(
            "browse: cached the tree of snapshot %s: %d entries, ~%d bytes "
            "(cache %d of %d bytes, %d trees)",
            snapshot_id[:12],
            tree.entries,
            tree.bytes,
            self.bytes,
            self.budget_bytes,
            len(self._trees),
        )

    def forget(self, snapshot_id: str) -> None:
        """Drops a snapshot's tree (its backup was deleted)."""
        tree = self._trees.pop(snapshot_id, None)
        if tree is not None:
            self.bytes -= tree.bytes


def _browsable(record: BackupRecord) -> str:
    """Returns the snapshot of a successful backup; raises JobConflict for any other."""
    if record.status is not JobStatus.SUCCESS or record.snapshot_id is None:
        raise JobConflict(f"backup {record.id} is {record.status}, not success")
    return record.snapshot_id


class Browser:
    """What the API asks of backups' trees."""

    def __init__(self, cache: TreeCache) -> None:
        self.cache = cache

    async def level(self, record: BackupRecord, path: str, after: str | None, limit: int) -> Level:
        """Returns one page of the folder `path` of a successful backup.

        Raises JobConflict (not a success), NotInBackup (no such folder), ResticError.
        """
        snapshot_id = _browsable(record)
        cleaned = clean_path(path)
        tree = await self.cache.tree(snapshot_id)
        if tree is None:
            entries, next_after = await self.cache.level(snapshot_id, cleaned, after, limit)
        else:
            entries, next_after = tree.level(cleaned, after, limit)
        items = [
            {"name": name, "type": kind, "size": size, "mtime": mtime}
            for name, kind, size, mtime in entries
        ]
        return Level(cleaned, items, next_after)

    async def first_missing(self, record: BackupRecord, entries: Sequence[str]) -> str | None:
        """Returns the first of `entries` (cleaned paths) not in the backup's tree, or None.

        Raises JobConflict (not a success) or ResticError.
        """
        if not entries:
            return None
        snapshot_id = _browsable(record)
        tree = await self.cache.tree(snapshot_id)
        if tree is None:
            found = await self.cache.present(snapshot_id, [entry for entry in entries if entry])
        else:
            found = {entry for entry in entries if entry and tree.find(entry) is not None}
        return next((entry for entry in entries if entry not in found), None)
