"""Exclusive repository work: unlock, forget queued deletes, prune, destroy."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fa_restic.jobs.retry import retry_transient
from fa_restic.restic.client import Restic
from fa_restic.restic.errors import ErrorKind, ResticError

log = logging.getLogger("fa_restic.jobs")

FAILURE_BACKOFF_SECONDS = (5.0, 30.0, 120.0, 600.0)


@dataclass
class MaintenanceState:
    """What maintenance owes the repository; the job layer persists it."""

    prune_wanted: bool = False
    last_prune: float = 0.0
    failures: int = 0
    next_try: float = 0.0

    def failed(self, now: float) -> None:
        """Backs off after a failure so a broken repository is not hammered."""
        delay = FAILURE_BACKOFF_SECONDS[min(self.failures, len(FAILURE_BACKOFF_SECONDS) - 1)]
        self.failures += 1
        self.next_try = now + delay

    def succeeded(self) -> None:
        self.failures = 0
        self.next_try = 0.0


async def forget_snapshots(restic: Restic, snapshot_ids: list[str], lock_wait: float) -> list[str]:
    """Forgets snapshots and returns those that are really gone.

    restic's `forget` exits 0 even when it removed nothing (unknown id, an
    append-only server), so the result is checked with `snapshots`.
    """

    async def forget() -> None:
        await restic.forget(snapshot_ids, lock_wait=min(lock_wait, 60))

    await retry_transient(forget, lock_wait, "forget")
    remaining = {snapshot.id for snapshot in await restic.snapshots(snapshot_ids=snapshot_ids)}
    for snapshot_id in remaining:
        log.error("forget: snapshot %s is still in the repository", snapshot_id[:12])
    return [snapshot_id for snapshot_id in snapshot_ids if snapshot_id not in remaining]


async def prune(restic: Restic, lock_wait: float) -> None:
    """Reclaims the space of forgotten snapshots and interrupted backups."""

    async def run() -> None:
        await restic.prune(lock_wait=min(lock_wait, 60))

    await retry_transient(run, lock_wait, "prune")


def _remove_folder(path: Path) -> None:
    """Removes a folder's contents, then the folder itself where that is allowed.

    Under systemd the repository folder may be a ReadWritePaths mount point that
    cannot itself be removed; an empty folder is as good (restic init fills it).
    Raises OSError when the contents cannot be removed.
    """
    if not path.exists():
        return
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    with contextlib.suppress(OSError):
        path.rmdir()


@dataclass(frozen=True)
class DestroyReport:
    method: str
    snapshots_removed: int


async def destroy(
    restic: Restic, local_path: Path | None, lock_wait: float, on_phase: Callable[[str], None]
) -> DestroyReport:
    """Removes a local repository folder, or forgets and prunes every snapshot of a remote one."""
    if local_path is not None:
        on_phase("removing the repository folder")
        count = 0
        try:
            count = len(await restic.snapshots())
        except ResticError as error:
            if error.kind is not ErrorKind.REPOSITORY_MISSING:
                log.warning("destroy: could not count snapshots: %s", error)
        await asyncio.to_thread(_remove_folder, local_path)
        return DestroyReport("removed the local repository folder", count)
    on_phase("forgetting every snapshot")
    try:
        snapshots = await restic.snapshots()
    except ResticError as error:
        if error.kind is ErrorKind.REPOSITORY_MISSING:
            return DestroyReport("no repository to remove", 0)
        raise
    ids = [snapshot.id for snapshot in snapshots]
    if ids:
        gone = await forget_snapshots(restic, ids, lock_wait)
        if len(gone) != len(ids):
            raise ResticError(
                ErrorKind.FATAL, f"{len(ids) - len(gone)} snapshots could not be forgotten"
            )
    on_phase("pruning")
    await prune(restic, lock_wait)
    return DestroyReport("forgot every snapshot and pruned (remote repository)", len(ids))
