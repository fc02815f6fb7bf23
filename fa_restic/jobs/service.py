"""The job layer's face to the API: a thin front over the job layer's parts.

Records (`records`) live in memory and every change is written to the store before a
request is answered. Accepting (`intake`), running (`execution`), cancelling
(`cancelling`), recovery after a crash (`recovery`), the repository's state
(`repository`) and its upkeep (`maintenance`) each live in a module of their own; the
scheduler decides what runs when.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from fa_restic.jobs import maintenance
from fa_restic.jobs.browse import DEFAULT_BUDGET_BYTES, Browser, Level, TreeCache
from fa_restic.jobs.cancelling import Canceller
from fa_restic.jobs.errors import JobConflict, UnknownJob
from fa_restic.jobs.execution import Execution, Settings, Stop
from fa_restic.jobs.intake import Caller, Intake
from fa_restic.jobs.models import (
    BackupRecord,
    ForgetRecord,
    JobRecord,
    Progress,
    RestoreRecord,
)
from fa_restic.jobs.node import ClusterNode, NodeOptions
from fa_restic.jobs.ports import Coordination, ResticRunner
from fa_restic.jobs.records import Records, key_of
from fa_restic.jobs.recovery import Settling, scrub
from fa_restic.jobs.removal import Removal
from fa_restic.jobs.repository import Repository, RepositoryState
from fa_restic.jobs.scheduler import ExclusiveWork, Scheduler
from fa_restic.metrics import JobCounts, Metrics
from fa_restic.names import JobKind, JobStatus, Overwrite
from fa_restic.restic.errors import ResticError
from fa_restic.store import Collections, Store

log = logging.getLogger("fa_restic.jobs")

__all__ = ["Caller", "Health", "JobOptions", "JobService"]


@dataclass(frozen=True)
class JobOptions:
    max_running: int = 2
    max_pending_per_user: int = 100
    """Pending backups and restores of one user, together; admins are not capped."""
    max_attempts: int = 2
    lock_wait_seconds: float = 120.0
    prune_interval_seconds: float = 3600.0
    local_repository: Path | None = None
    """The repository's folder when it is on this machine (destroy removes it)."""
    data_root: Path = Path("var/data")
    """User homes are <data_root>/users/<user>."""
    confine_backups: bool = True
    """Run backups' restic confined to the home (fa_restic.restic.sandbox); False only where
    that cannot be had and `[paths] allow_symlink_races` allows it."""
    browse_cache_bytes: int = DEFAULT_BUDGET_BYTES
    """The memory budget of the cached backup trees (jobs.browse)."""
    lease_seconds: float = 30.0
    """In a cluster: a node silent this long is dead (SPEC §10)."""


@dataclass
class Health:
    pending: int
    running: int
    maintenance: str | None
    node: str | None = None
    """This node's name, when the records are in the cluster's database (SPEC §10)."""
    database: str | None = None
    """`ok` or a short reason, when the records are in the cluster's database."""
    nodes_alive: int | None = None
    """How many nodes of the cluster hold a lease (this one included)."""


@runtime_checkable
class NodeStore(Protocol):
    """A store that is a cluster's database (fa_restic.cluster.DatabaseStore): its node's
    name and the database's state, for healthz."""

    @property
    def node(self) -> str: ...

    @property
    def database_state(self) -> str: ...


class JobService:
    """Backups, restores and the repository's upkeep, for the API."""

    def __init__(
        self,
        options: JobOptions,
        store: Store,
        restic: ResticRunner,
        metrics: Metrics,
        coordination: Coordination | None = None,
    ) -> None:
        """`coordination`: a cluster's (SPEC §10); None for a single node."""
        self.options = options
        self.restic = restic
        self.metrics = metrics
        self.records = Records(store, keep_pending=coordination is None)
        lock_wait = options.lock_wait_seconds
        self.upkeep = maintenance.Upkeep(
            restic, self.records, lock_wait, options.prune_interval_seconds
        )
        self.repository = Repository(restic, self.records, lock_wait)
        self.execution = Execution(
            self.records,
            restic,
            metrics,
            Settings(options.data_root, lock_wait, options.confine_backups),
            before_backup=self.repository.ensure,
            after_cancel=self.upkeep.want_prune,
            settle_claimed=lambda record: self.settling.settle_claimed(record),
        )
        self.scheduler = Scheduler(options.max_running, self.execution.run, self._maintenance)
        self.browser = Browser(
            TreeCache(restic, options.browse_cache_bytes, self.scheduler.reading)
        )
        self.intake = Intake(
            self.records, self.scheduler, options.max_pending_per_user, self.browser, coordination
        )
        self.canceller = Canceller(
            self.records,
            self.scheduler,
            self.execution,
            metrics,
            coordination,
            remote_wait_seconds=options.lease_seconds + 10,
        )
        self.removal = Removal(
            self.records,
            self.repository,
            self.upkeep,
            self.scheduler,
            self.canceller,
            options.local_repository,
        )
        self.settling = Settling(
            self.records, restic, self.upkeep, self.scheduler.dequeue, metrics.job_finished
        )
        self.node: ClusterNode | None = None
        if coordination is not None:
            options_of_node = NodeOptions(options.lease_seconds, options.max_attempts)
            self.node = ClusterNode(coordination, options_of_node, self)
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def store(self) -> Store:
        return self.records.store

    @property
    def backups(self) -> dict[int, BackupRecord]:
        return self.records.backups

    @property
    def restores(self) -> dict[int, RestoreRecord]:
        return self.records.restores

    @property
    def forgets(self) -> dict[str, ForgetRecord]:
        """Snapshots of deleted backups still to be forgotten."""
        return self.upkeep.forgets

    @property
    def destroyed(self) -> bool:
        return self.repository.destroyed

    # -- start and stop -------------------------------------------------------------

    def load(self, collections: Collections) -> None:
        """Takes the records read from the store (Store.load)."""
        self.records.load(collections)
        self.upkeep.load(collections)
        self.repository.load(collections)

    async def start(self) -> None:
        """Scrubs what a dead predecessor left and starts the scheduler (after `load`).

        Before any job runs, the repository is initialised if missing, stale locks are
        removed and snapshots of attempts cut short are settled.
        """
        await self.records.write(scrub(self.records, self.options.max_attempts))
        # In a cluster the repository is shared: the startup needs it to itself on this node
        # only (`unlock` leaves live locks alone, `init` of an existing one is refused).
        preparation = self.scheduler.request(
            ExclusiveWork("startup", self._prepare, cluster_wide=False)
        )
        for record in sorted(self.records.every(), key=lambda record: record.sequence):
            if record.status is JobStatus.PENDING:  # a cluster's are the database's to claim
                self.scheduler.enqueue(key_of(record), record.sequence, record.user)
        self.metrics.bind(self._counts)
        self.scheduler.start()
        if self.node is not None:
            self.node.start()
        self._background(preparation, "prepare the repository")

    async def _prepare(self) -> None:
        if not self.repository.destroyed:
            await self.repository.ensure()
        if await self.upkeep.guarded("unlock", self.restic.unlock) == "ok":
            log.info("stale locks removed (restic unlock)")
        await self.settling.settle_all()

    def _background(self, work: Awaitable[None], what: str) -> None:
        async def guarded() -> None:
            try:
                await work
            except (ResticError, asyncio.CancelledError) as error:
                log.error("could not %s: %s", what, error or "interrupted")

        task = asyncio.create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Interrupts running work (SIGINT); interrupted jobs run again after a restart."""
        self._stopping = True
        if self.node is not None:
            await self.node.stop()
        await self.scheduler.stop()
        stopping = []
        for record in self.records.with_status(JobStatus.RUNNING):
            key = key_of(record)
            task = self.scheduler.task_of(key)
            if task is not None:
                stopping.append(self.execution.interrupt(key, task, Stop("shutdown")))
        await asyncio.gather(*stopping, return_exceptions=True)
        await self.scheduler.stop_exclusive()
        await self.store.stop()

    # -- what the API asks ------------------------------------------------------------

    def progress(self, kind: str, record: JobRecord) -> Progress:
        """Returns live progress of a running job, or what its status implies."""
        return self.execution.progress_of((kind, record.id), record)

    async def get(self, caller: Caller, kind: JobKind, job_id: int) -> JobRecord:
        """Returns a record the caller may see; raises UnknownJob."""
        record = await self.records.get((kind, job_id))
        if record is None or not caller.may_see(record):
            raise UnknownJob(f"no such record [ {job_id} ]")
        return record

    async def get_backup(self, caller: Caller, backup_id: int) -> BackupRecord:
        """Returns a backup the caller may see; raises UnknownJob."""
        record = await self.get(caller, JobKind.BACKUP, backup_id)
        assert isinstance(record, BackupRecord)
        return record

    async def get_restore(self, caller: Caller, restore_id: int) -> RestoreRecord:
        """Returns a restore the caller may see; raises UnknownJob."""
        record = await self.get(caller, JobKind.RESTORE, restore_id)
        assert isinstance(record, RestoreRecord)
        return record

    def _refuse_while_busy(self) -> None:
        if self._stopping or self.repository.state is RepositoryState.DESTROYING:
            raise JobConflict("the repository is being destroyed or the service is stopping")

    async def page(
        self, caller: Caller, kind: JobKind, user: str | None = None, **filters: Any
    ) -> tuple[list[JobRecord], int | None]:
        """Returns Records.page of the caller's records (an admin's: `user`'s, or all)."""
        return await self.records.page(kind, user=user if caller.admin else caller.user, **filters)

    async def files(self, caller: Caller, backup_id: int, path: str, **page: Any) -> Level:
        """Returns a page of one folder of a backup (jobs.browse); raises UnknownJob,
        JobConflict (not a success), NotInBackup, ResticError."""
        return await self.browser.level(await self.get_backup(caller, backup_id), path, **page)

    async def submit_backup(
        self, caller: Caller, backup_id: int, path: Path, exclude: list[str] | None = None
    ) -> BackupRecord:
        """Records a backup durably and queues it; raises JobConflict if the id is in use."""
        self._refuse_while_busy()
        return await self.intake.backup(caller, backup_id, path, exclude or [])

    async def submit_restore(
        self,
        caller: Caller,
        restore_id: int,
        backup_id: int,
        target: Path,
        include: list[str] | None = None,
        overwrite: Overwrite = Overwrite.ALWAYS,
    ) -> RestoreRecord:
        """Records a restore durably and queues it; raises UnknownJob, JobConflict or
        NotInBackup (an `include` entry the backup does not hold)."""
        self._refuse_while_busy()
        return await self.intake.restore(
            caller, restore_id, backup_id, target, include or [], overwrite
        )

    async def cancel(self, caller: Caller, kind: JobKind, job_id: int) -> JobRecord:
        """Cancels a pending or running job and returns it once it is `cancel`.

        Raises UnknownJob, or JobConflict when the job finished otherwise.
        """
        record = await self.get(caller, kind, job_id)
        if record.status is JobStatus.CANCEL:
            return record
        if record.status.is_terminal:
            raise JobConflict(f"{kind} {job_id} already ended ({record.status})")
        record = await self.canceller.cancel(record, caller.user)
        final = JobStatus(record.status)  # changed by the job's task meanwhile
        if final is not JobStatus.CANCEL:
            raise JobConflict(f"{kind} {job_id} ended ({final}) before it could be cancelled")
        return record

    async def cancel_all(self, caller: Caller, kind: JobKind) -> list[int]:
        """Cancels every pending or running job of the caller (an admin: of everyone);
        returns the ids now `cancel`."""
        if self.node is not None:
            scope = None if caller.admin else caller.user
            return await self.canceller.cancel_all_in_cluster(kind, caller.user, scope)
        records = self.records.of(kind).values()
        candidates = [record for record in records if caller.may_see(record)]
        return await self.canceller.cancel_all(candidates, caller.user)

    async def delete_backup(self, caller: Caller, backup_id: int) -> str | None:
        """Drops a finished backup's record now and queues its snapshot's forget durably.

        Returns the snapshot id to be forgotten (None if the backup made none). Raises
        UnknownJob, or JobConflict while it is pending or running.
        """
        record = await self.get_backup(caller, backup_id)
        if record.status.is_active:
            raise JobConflict(f"backup {backup_id} is {record.status}: cancel it first")
        return await self.removal.delete_backup(record, caller.user)

    async def destroy_repository(self, caller: Caller) -> dict[str, Any]:
        """Cancels every job, removes the repository's data, drops every backup record.

        Returns what was done; raises ResticError when a remote repository could not be emptied.
        """
        self._refuse_while_busy()
        return await self.removal.destroy(caller.user)

    def health(self) -> Health:
        health = Health(
            pending=self.scheduler.queued_count,
            running=self.scheduler.running_count,
            maintenance=self.scheduler.exclusive_name,
        )
        store = self.store
        if isinstance(store, NodeStore):
            health.node, health.database = store.node, store.database_state
        if self.node is not None:
            # The queue is the cluster's: its pending jobs as last counted.
            counts = self.records.status_counts()
            health.pending = sum(counts[kind][JobStatus.PENDING] for kind in counts)
            health.nodes_alive = self.node.nodes_alive
        return health

    def _counts(self) -> JobCounts:
        health = self.health()
        return JobCounts(
            self.records.status_counts(), health.pending, health.running, len(self.forgets)
        )

    def _maintenance(self) -> ExclusiveWork | None:
        busy = self._stopping or self.repository.state is RepositoryState.DESTROYING
        # In a cluster: while jobs wait anywhere they go first (as a waiting job would
        # interrupt a prune), and their node may be another.
        busy = busy or (self.node is not None and self.node.jobs_waiting)
        if busy or self.upkeep.state.resting:
            return None
        if self.settling.due():
            # Reads snapshots and queues forgets: other nodes' jobs may go on meanwhile.
            return ExclusiveWork("settle", self.settling.settle_all, cluster_wide=False)
        return self.upkeep.pick()
