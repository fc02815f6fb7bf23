"""One restore: a backup's snapshot into a folder of the user's home."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from fa_restic.jobs.models import Progress
from fa_restic.jobs.staging import open_folder
from fa_restic.restic.client import Restic, RestoreResult
from fa_restic.restic.messages import RestoreStatus

ProgressHandler = Callable[[Progress], None]
StartHandler = Callable[[int], Awaitable[None]]


def progress_of(status: RestoreStatus) -> Progress:
    return Progress(
        percent_done=min(max(status.percent_done, 0.0), 1.0),
        bytes_done=status.bytes_restored,
        total_bytes=status.total_bytes,
        files_done=status.files_restored,
        total_files=status.total_files,
        seconds_remaining=status.seconds_remaining,
    )


def make_folder(target: Path, owner_of: Path) -> None:
    """Creates `target` and missing parents inside the home `owner_of`, owned like the home.

    The service often runs as root; folders it makes for a user must be the user's. The
    folders are walked from the home without following symlinks (StagingError if one is
    in the way), so a symlink swapped in by the user never makes root create folders
    elsewhere.
    """
    os.close(open_folder(owner_of, target, create=True))


async def run_restore(
    restic: Restic,
    snapshot_id: str,
    target: Path,
    on_progress: ProgressHandler,
    on_start: StartHandler,
) -> RestoreResult:
    """Restores a snapshot into `target`; returns what was restored, raises ResticError.

    `target` is restic's own target: a staging folder (see fa_restic.jobs.staging), never
    a folder of a user's.
    """

    def on_status(status: RestoreStatus) -> None:
        on_progress(progress_of(status))

    return await restic.restore(snapshot_id, target, on_status=on_status, on_start=on_start)
