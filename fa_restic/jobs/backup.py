"""One backup: a user's file or folder into one tagged restic snapshot."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from fa_restic.jobs.models import Progress
from fa_restic.restic.client import BackupResult, Restic
from fa_restic.restic.messages import BackupStatus

ProgressHandler = Callable[[Progress], None]
StartHandler = Callable[[int], Awaitable[None]]


def snapshot_tags(backup_id: int, user: str) -> tuple[str, str]:
    """Returns the tags that let `restic snapshots --tag fa:id=N` find a backup."""
    return (f"fa:id={backup_id}", f"fa:user={user}")


def source_form(path: Path) -> tuple[Path, list[str]]:
    """Returns (working folder, paths) to give restic for `path`.

    A folder is backed up as `.` from inside it and a file by its name from its
    folder, so a plain `restic restore --target DST` puts the folder's contents,
    or the file, directly in DST on every restic version (NOTES §5).
    """
    if path.is_dir():
        return path, ["."]
    return path.parent, [path.name]


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
    restic: Restic,
    backup_id: int,
    user: str,
    path: Path,
    on_progress: ProgressHandler,
    on_start: StartHandler,
) -> BackupOutcome:
    """Backs `path` up; returns the snapshot and sizes, raises ResticError or FileNotFoundError."""
    if not await asyncio.to_thread(path.exists):
        raise FileNotFoundError(f"path no longer exists: {path}")
    cwd, paths = await asyncio.to_thread(source_form, path)

    def on_status(status: BackupStatus) -> None:
        on_progress(progress_of(status))

    result = await restic.backup(
        cwd, paths, snapshot_tags(backup_id, user), on_status=on_status, on_start=on_start
    )
    summary = result.summary
    return BackupOutcome(
        snapshot_id=result.snapshot_id,
        total_size=summary.total_bytes_processed,
        pack_size=summary.pack_size,
        file_count=summary.total_files_processed,
        extra=describe_incomplete(result) if result.incomplete else "",
    )
