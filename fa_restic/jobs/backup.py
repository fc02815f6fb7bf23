"""One backup: a user's file or folder into one tagged restic snapshot."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fa_restic.jobs.models import Progress
from fa_restic.jobs.ports import ResticRunner
from fa_restic.names import snapshot_tags
from fa_restic.restic import sandbox
from fa_restic.restic.client import BackupResult
from fa_restic.restic.commands import anchored_excludes
from fa_restic.restic.messages import BackupStatus
from fa_restic.restic.sandbox import Confinement

ProgressHandler = Callable[[Progress], None]
StartHandler = Callable[[int], Awaitable[None]]


@dataclass(frozen=True)
class Source:
    """What a backup reads: one path inside one user's home."""

    users_root: str
    """The real folder of the homes (`<data_root>/users`, symlinks resolved at start)."""
    user: str
    path: str
    """The absolute path checked at POST; it must still lie in the home."""
    confined: bool = True
    """False only where confinement cannot be had and the config allows that."""

    def relative(self) -> str:
        """Returns the path relative to the home; raises ValueError if it is not inside."""
        home = os.path.join(self.users_root, self.user)
        relative = os.path.relpath(self.path, home)
        if relative == os.curdir:
            return ""
        if relative == os.pardir or relative.startswith(os.pardir + os.sep):
            raise ValueError(f"{self.path!r} is not in the home of {self.user}")
        return relative


def source_form(source: Source) -> tuple[Confinement, list[str]]:
    """Returns (where restic runs, paths to give it) for `source`.

    A folder is backed up as `.` from inside it and a file by its name from its
    folder, so a plain `restic restore --target DST` puts the folder's contents,
    or the file, directly in DST on every restic version (NOTES §5). Looks without
    following symlinks; raises FileNotFoundError, or sandbox.Refused if a symlink
    now stands in the way.
    """
    relative = source.relative()
    try:
        is_folder = sandbox.is_folder(source.users_root, source.user, relative)
    except FileNotFoundError:
        raise FileNotFoundError(f"path no longer exists: {source.path}") from None
    if is_folder:
        return Confinement(source.users_root, source.user, relative), ["."]
    parent, name = os.path.split(relative)
    return Confinement(source.users_root, source.user, parent), [name]


def progress_of(status: BackupStatus) -> Progress:
    return Progress(
        percent_done=min(max(status.percent_done, 0.0), 1.0),
        bytes_done=status.bytes_done,
        total_bytes=status.total_bytes,
        files_done=status.files_done,
        total_files=status.total_files,
        seconds_remaining=status.seconds_remaining,
    )


@dataclass(frozen=True)
class BackupOutcome:
    snapshot_id: str
    total_size: int
    pack_size: int
    file_count: int
    extra: str


def describe_incomplete(result: BackupResult) -> str:
    """Returns the `extra` of a snapshot made with unreadable items (restic exit 3)."""
    examples = "; ".join(result.unreadable_examples)
    noun = "item" if result.unreadable_count == 1 else "items"
    text = f"incomplete: {result.unreadable_count} {noun} could not be read"
    return f"{text}: {examples}" if examples else text


async def run_backup(
    restic: ResticRunner,
    backup_id: int,
    source: Source,
    on_progress: ProgressHandler,
    on_start: StartHandler,
    exclude: Sequence[str] = (),
) -> BackupOutcome:
    """Backs `source` up, without what the `exclude` patterns (relative to it) match;
    returns the snapshot and sizes.

    Raises ResticError, FileNotFoundError, or sandbox.Refused when the path changed.
    """
    confinement, paths = await asyncio.to_thread(source_form, source)
    # A folder is backed up as `.`: its patterns are anchored below it (restic sees the
    # real path, confined or not). A single file has nothing below it, and restic 0.19
    # never excludes a path it is given while older ones would: no pattern, on every version.
    excludes = anchored_excludes(confinement.working_folder, exclude) if paths == ["."] else []

    def on_status(status: BackupStatus) -> None:
        on_progress(progress_of(status))

    result = await restic.backup(
        Path(confinement.working_folder),
        paths,
        snapshot_tags(backup_id, source.user),
        on_status=on_status,
        on_start=on_start,
        confinement=confinement if source.confined else None,
        excludes=excludes,
    )
    summary = result.summary
    return BackupOutcome(
        snapshot_id=result.snapshot_id,
        total_size=summary.total_bytes_processed,
        pack_size=summary.pack_size,
        file_count=summary.total_files_processed,
        extra=describe_incomplete(result) if result.incomplete else "",
    )
