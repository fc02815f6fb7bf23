"""What the job layer needs of restic, as a Protocol.

`fa_restic.restic.client.Restic` is the real one. The job layer's tests use a small
hand-written fake (tests/jobs/fake_restic.py) that answers what a test scripted, so
that scheduling, cancel races and recovery are tested in milliseconds.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Protocol

from fa_restic.restic.client import BackupResult, RestoreResult
from fa_restic.restic.features import Feature, ResticVersion
from fa_restic.restic.messages import BackupStatus, RestoreStatus, Snapshot, StatsResult, TreeNode
from fa_restic.restic.sandbox import Confinement

StartHandler = Callable[[int], Awaitable[None]]


class ResticRunner(Protocol):
    """One restic bound to one repository; every method raises ResticError on failure."""

    @property
    def version(self) -> ResticVersion:
        """restic's version, read at start."""
        ...

    def has(self, feature: Feature) -> bool:
        """Returns True when this restic has `feature`."""
        ...

    def redact(self, text: str) -> str:
        """Returns restic's `text` with the repository and hosts hidden (for users)."""
        ...

    async def exists(self) -> bool:
        """Returns True if the repository exists."""
        ...

    async def ensure_initialised(self) -> bool:
        """Creates the repository if missing; returns True if it did."""
        ...

    async def backup(
        self,
        cwd: Path,
        paths: Sequence[str],
        tags: Sequence[str],
        *,
        on_status: Callable[[BackupStatus], None] | None = None,
        on_start: StartHandler | None = None,
        confinement: Confinement | None = None,
        excludes: Sequence[str] = (),
    ) -> BackupResult:
        """Backs `paths` up into one snapshot tagged `tags`, without what `excludes` match."""
        ...

    async def restore(
        self,
        snapshot_id: str,
        target: Path,
        *,
        on_status: Callable[[RestoreStatus], None] | None = None,
        on_start: StartHandler | None = None,
        confinement: Confinement | None = None,
        include: Sequence[str] = (),
        overwrite: str | None = None,
    ) -> RestoreResult:
        """Restores a snapshot's tree (only `include`, if given) into `target` (as seen inside
        `confinement`, if given); `overwrite` is restic's own `--overwrite` (>= 0.17)."""
        ...

    async def ls(
        self, snapshot_id: str, on_node: Callable[[TreeNode], None], paths: Sequence[str] = ()
    ) -> Snapshot:
        """Streams every node of a snapshot's tree to `on_node` (with `paths`, absolute in the
        snapshot: each one's node and what is directly in it); returns the snapshot. Raises
        ResticError, or what `on_node` raised (restic stopped)."""
        ...

    async def snapshots(
        self, tags: Sequence[str] = (), snapshot_ids: Sequence[str] = ()
    ) -> list[Snapshot]:
        """Returns the snapshots having all `tags` (and among `snapshot_ids`, if given)."""
        ...

    async def stats(self, snapshot_id: str) -> StatsResult:
        """Returns a snapshot's restore size."""
        ...

    async def backup_sizes(self, snapshot: Snapshot) -> tuple[int, int]:
        """Returns (bytes processed, bytes added) of the backup that made `snapshot`."""
        ...

    async def forget(self, snapshot_ids: Sequence[str], lock_wait: float = 0) -> None:
        """Forgets snapshots by id."""
        ...

    async def prune(self, lock_wait: float = 0, on_start: StartHandler | None = None) -> None:
        """Removes data no snapshot references."""
        ...

    async def unlock(self) -> None:
        """Removes stale locks (never a live one)."""
        ...

    async def remove_stale_locks(self) -> None:
        """A bounded `unlock` that never raises (clean-up after a failure)."""
        ...
