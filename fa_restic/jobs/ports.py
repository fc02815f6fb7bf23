"""What the job layer needs of restic, as a Protocol.

`fa_restic.restic.client.Restic` is the real one. The job layer's tests use a small
hand-written fake (tests/jobs/fake_restic.py) that answers what a test scripted, so
that scheduling, cancel races and recovery are tested in milliseconds.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Protocol

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


ClusterJob = tuple[str, int, dict[str, Any]]
"""(kind, id, record) of a job as the cluster's database holds it."""


class Coordination(Protocol):
    """What a node of a cluster (SPEC §10) asks of the database the nodes share.

    `fa_restic.cluster.coordination.DatabaseCoordination` is the real one. Every method
    raises OSError (the store's StoreUnavailable) when the database cannot be reached.
    Jobs are (kind, id): kind "backup" or "restore".
    """

    @property
    def node(self) -> str:
        """This node's name (unique in the cluster)."""
        ...

    async def admit(
        self,
        kind: str,
        job_id: int,
        user: str,
        value: dict[str, Any],
        reusable: Collection[str],
        cap: int | None = None,
    ) -> Admission:
        """Writes a new pending job record with the next place in the queue, or replaces
        the one of that id if it is `user`'s and its status is in `reusable`; unless `user`
        has `cap` jobs pending already (counted exactly across nodes). Of nodes admitting
        one id at once exactly one admits it. Committed when it returns."""
        ...

    async def claim(self, slots: int) -> list[ClusterJob]:
        """Takes up to `slots` pending jobs for this node, fairly between users, and returns
        them as now running on it (status running, started_at now, one more attempt).
        Returns [] while any node holds `exclusive`."""
        ...

    async def cancel_pending(
        self,
        kind: str,
        fields: dict[str, Any],
        *,
        job_id: int | None = None,
        user: str | None = None,
    ) -> list[int]:
        """Merges `fields` into the pending (unclaimed) jobs of `kind`: the one `job_id`,
        else those of `user`, else all; returns the ids changed, ascending."""
        ...

    async def request_cancel(
        self, kind: str, by: str, *, job_id: int | None = None, user: str | None = None
    ) -> list[int]:
        """Asks the nodes running jobs of `kind` (the one `job_id`, else `user`'s, else all)
        to cancel them on behalf of `by`; jobs running on this node are left out. Returns the
        ids asked for, ascending."""
        ...

    async def cancel_requests(self) -> list[tuple[str, int, str]]:
        """Returns (kind, id, by) of the jobs running on this node that someone asked to
        cancel."""
        ...

    async def share_progress(self, progress: Mapping[tuple[str, int], dict[str, Any]]) -> None:
        """Publishes the live progress of jobs running on this node (read back as the
        record's "progress" by other nodes)."""
        ...

    async def beat(self) -> None:
        """Renews this node's lease."""
        ...

    async def requeue_dead(self, max_attempts: int) -> list[ClusterJob]:
        """Puts the running jobs of nodes whose lease expired back to pending (backups
        unsettled), fails them after `max_attempts`, or cancels those someone asked to
        cancel; returns them as changed."""
        ...

    async def release(
        self, running: Collection[tuple[str, int]], max_attempts: int
    ) -> list[ClusterJob]:
        """As `requeue_dead`, for the jobs the database says run on this node but that are
        not among `running` (this node restarted, or lost its lease meanwhile)."""
        ...

    async def nodes(self) -> Sequence[NodeLease]:
        """Returns every node that has a lease, alive or not, by name."""
        ...

    async def pending_exists(self) -> bool:
        """True when any job waits to be claimed."""
        ...

    async def running_anywhere(self) -> int:
        """Returns how many jobs run on nodes whose lease has not expired."""
        ...

    def exclusive(self) -> AbstractAsyncContextManager[None]:
        """Holds the cluster's exclusive lock while inside: one node at a time, and no node
        claims a job meanwhile (jobs that already run go on: the caller waits for
        `running_anywhere` to be 0). Waits for the lock while another node holds it."""
        ...

    def reading(self, wait_seconds: float) -> AbstractAsyncContextManager[bool]:
        """Keeps every node's exclusive work from starting while inside (a browse's
        `restic ls`); waits up to `wait_seconds` while one node does such work, and yields
        False (holding nothing) if it did not end by then."""
        ...

    def initialising(self) -> AbstractAsyncContextManager[None]:
        """Holds the cluster's lock for creating the repository while inside (one node
        creates it; claims go on meanwhile)."""
        ...

    async def shared(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Returns the small collections every node shares: "forget" and "meta"."""
        ...


class Admission(Protocol):
    """What `Coordination.admit` did."""

    @property
    def admitted(self) -> bool: ...

    @property
    def pending(self) -> int | None:
        """The user's jobs pending when the cap was checked (None: no cap given)."""
        ...

    @property
    def sequence(self) -> int | None:
        """The job's place in the queue, when admitted."""
        ...


class NodeLease(Protocol):
    """A node as the cluster's database knows it."""

    @property
    def name(self) -> str: ...

    @property
    def alive(self) -> bool:
        """Its lease has not expired."""
        ...

    @property
    def lease_age(self) -> float:
        """Seconds since its last heartbeat."""
        ...

    @property
    def running(self) -> int:
        """Jobs running on it."""
        ...
