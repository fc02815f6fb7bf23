"""One restore: a backup's snapshot into a folder of the user's home."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from fa_restic.jobs.models import Progress
from fa_restic.jobs.ports import ResticRunner
from fa_restic.jobs.staging import open_folder
from fa_restic.restic.client import RestoreResult
from fa_restic.restic.errors import ResticError
from fa_restic.restic.features import Feature
from fa_restic.restic.messages import RestoreStatus
from fa_restic.restic.sandbox import Confinement

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


def tree_bytes(root: Path) -> int:
    """Returns the bytes of regular files below `root` that are on disk (sparse-aware).

    Walks by folder descriptors and follows no symlink (os.fwalk): `root` may be a user's
    dst, where a folder swapped for a symlink must not make root measure another tree.
    """
    total = 0
    with contextlib.suppress(OSError):
        for _, _, files, folder in os.fwalk(root, follow_symlinks=False):
            for name in files:
                with contextlib.suppress(OSError):
                    status = os.stat(name, dir_fd=folder, follow_symlinks=False)
                    if stat.S_ISREG(status.st_mode):
                        total += min(status.st_size, status.st_blocks * 512)
    return total


async def poll_progress(
    restic: ResticRunner,
    snapshot_id: str,
    target: Path,
    on_progress: ProgressHandler,
    baseline: int = 0,
) -> None:
    """Reports restore progress from the bytes written under `target`, until cancelled.

    For restic < 0.16, which prints no restore status. `target` is a staging folder or,
    for a restore straight into dst, dst itself: the `baseline` bytes that were there
    before restic started are not counted.
    """
    try:
        stats = await restic.stats(snapshot_id)
    except ResticError:
        return
    total = max(stats.total_size, 1)
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        done = max(0, await asyncio.to_thread(tree_bytes, target) - baseline)
        done = min(done, stats.total_size)
        on_progress(
            Progress(
                percent_done=done / total,
                bytes_done=done,
                total_bytes=stats.total_size,
                total_files=stats.total_file_count,
            )
        )
        # Walking a large tree is not free: poll less often the longer it takes.
        await asyncio.sleep(max(1.0, 10 * (loop.time() - started)))


async def run_restore(
    restic: ResticRunner,
    snapshot_id: str,
    target: Path,
    on_progress: ProgressHandler,
    on_start: StartHandler,
    *,
    confinement: Confinement | None = None,
    include: Sequence[str] = (),
    overwrite: str | None = None,
) -> RestoreResult:
    """Restores a snapshot (only `include`, if given) into `target`; returns what was
    restored, raises ResticError.

    `target` is restic's own target: a staging folder (see fa_restic.jobs.staging), or dst
    with `confinement` (fa_restic.jobs.direct), never a user's folder without one.
    `overwrite` is restic's own `--overwrite`, for the direct path.
    """

    def on_status(status: RestoreStatus) -> None:
        on_progress(progress_of(status))

    poller: asyncio.Task[None] | None = None
    if not restic.has(Feature.RESTORE_PROGRESS_JSON):
        # Measured before restic starts: measured beside it, what restic wrote first would
        # count as there before (a busy machine showed no progress at all).
        baseline = await asyncio.to_thread(tree_bytes, target)
        poller = asyncio.create_task(
            poll_progress(restic, snapshot_id, target, on_progress, baseline)
        )
    try:
        return await restic.restore(
            snapshot_id,
            target,
            on_status=on_status,
            on_start=on_start,
            confinement=confinement,
            include=include,
            overwrite=overwrite,
        )
    finally:
        if poller is not None:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
