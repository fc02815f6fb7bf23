"""This node of a cluster (SPEC §10): what it claims, its lease, the cancels other nodes ask
of it, the progress it shows them, and exclusive work that the whole cluster waits for.

A single node has none of this (JobService leaves `node` None). In a cluster the queue is
the database's: a node holds in memory only the jobs it runs, and one loop does all of
its talking to the database, every TICK_SECONDS or sooner when woken:

- publish the progress of its jobs, and cancel those another node asked it to;
- claim pending jobs for its free slots (fairly between users: DatabaseRecords.claim);
- every third of the lease: renew the lease; put the jobs of nodes whose lease expired
  back to pending (and its own that it no longer runs); read the forget queue and the
  maintenance wishes every node shares; and the nodes' leases for healthz and /metrics.

One loop, so that a claim and the release of this node's orphans never interleave. A node
that could not renew its lease for most of it stops its jobs, as the other nodes are about
to run them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fa_restic.jobs.browse import Browser
from fa_restic.jobs.cancelling import Canceller
from fa_restic.jobs.errors import Busy
from fa_restic.jobs.execution import Execution, Stop
from fa_restic.jobs.intake import Intake
from fa_restic.jobs.maintenance import Upkeep
from fa_restic.jobs.models import BackupRecord, JobRecord
from fa_restic.jobs.ports import ClusterJob, Coordination, NodeLease, ResticRunner
from fa_restic.jobs.records import JobKey, Records, key_of, record_of
from fa_restic.jobs.repository import Repository
from fa_restic.jobs.scheduler import ExclusiveWork, Scheduler
from fa_restic.metrics import Metrics
from fa_restic.names import JobStatus

log = logging.getLogger("fa_restic.jobs")

TICK_SECONDS = 1.0
"""How often a node claims, publishes progress and looks for cancels: progress on other
nodes is at most about this old, and a cancel asked elsewhere starts within it."""
RETRY_SECONDS = 0.1
"""How soon a node claims again after its free slot found every waiting job held by another
node's claim under way."""
GATE_POLL_SECONDS = 0.5
"""How often exclusive work looks whether the jobs running on other nodes have ended."""
READ_WAIT_SECONDS = 10.0
"""How long a browse waits for another node's exclusive work before it answers busy (a
waiting browse does not interrupt a prune on another node, as it does on its own)."""
FENCE_FRACTION = 0.8
"""A node that could not renew its lease for this part of it stops its jobs: the others
take them over once the lease is out."""


@dataclass(frozen=True)
class NodeOptions:
    lease_seconds: float
    max_attempts: int


class Parts(Protocol):
    """The parts of the job layer a node works with and plugs itself into (a JobService
    has them all)."""

    records: Records
    scheduler: Scheduler
    execution: Execution
    canceller: Canceller
    upkeep: Upkeep
    repository: Repository
    restic: ResticRunner
    metrics: Metrics
    intake: Intake
    browser: Browser


class ClusterNode:
    """This node's part in the cluster; `start` after the scheduler, `stop` before it.

    Made, it is plugged into `parts`: exclusive work goes through the cluster's gate, new
    jobs and freed slots wake its claims, the repository is created once, and browses keep
    apart from other nodes' exclusive work."""

    def __init__(self, coordination: Coordination, options: NodeOptions, parts: Parts) -> None:
        self.coordination = coordination
        self.options = options
        self.records = parts.records
        self.scheduler = parts.scheduler
        self.execution = parts.execution
        self.canceller = parts.canceller
        self.upkeep = parts.upkeep
        self.repository = parts.repository
        self.restic = parts.restic
        self.metrics = parts.metrics
        self.nodes_alive = 0
        self.jobs_waiting = False
        """Jobs wait to be claimed somewhere: no maintenance is begun meanwhile."""
        self._last_beat = time.monotonic()
        self._connected_since: float | None = None
        self._claiming = True
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._cancelling: dict[JobKey, asyncio.Task[None]] = {}
        self._unreachable = False
        self._missed = False
        self._retried = False
        self.read_wait = READ_WAIT_SECONDS
        self._plug_into(parts)

    def _plug_into(self, parts: Parts) -> None:
        parts.scheduler.gate = self.gate
        parts.scheduler.slot_freed = self.wake
        parts.intake.queued = self.wake
        parts.repository.serialised = self.coordination.initialising
        parts.browser.cache.reading = self.reading
        parts.execution.after_stop = "runs again on another node, or here after the restart"

    @property
    def name(self) -> str:
        return self.coordination.node

    # -- start and stop ---------------------------------------------------------------

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name="cluster node")

    async def stop(self) -> None:
        """Stops claiming and talking to the other nodes (running jobs are the caller's)."""
        self._claiming = False
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for task in list(self._cancelling.values()):
            task.cancel()
        await asyncio.gather(*self._cancelling.values(), return_exceptions=True)

    def wake(self) -> None:
        """Makes the loop look now (a job was queued, a slot came free)."""
        self._wake.set()

    # -- the loop ---------------------------------------------------------------------

    async def _loop(self) -> None:
        next_beat = 0.0
        while True:
            self._wake.clear()
            try:
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.options.lease_seconds / 3
                    await self._beat()
                await self._share()
                await self._claim()
                if self._unreachable:
                    self._unreachable = False
                    log.info("cluster: the database answers again; claiming jobs")
            except OSError as error:  # the database is out of reach: try again next tick
                self._connected_since = None
                if not self._unreachable:
                    self._unreachable = True
                    log.warning("cluster: no claims while the database is unreachable: %s", error)
            await self._fence()
            tick = min(TICK_SECONDS, self.options.lease_seconds / 3)
            if self._missed:
                # Jobs waited and a free slot took none: another node's claim held them
                # (they are locked while it chooses). Look again soon, once, not a tick later.
                self._missed = False
                tick = RETRY_SECONDS
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(tick):
                    await self._wake.wait()

    async def _beat(self) -> None:
        coordination = self.coordination
        await coordination.beat()
        now = self._last_beat = time.monotonic()
        if self._connected_since is None:
            self._connected_since = now
        # After an outage every lease looks expired: the others get a lease's time to
        # beat again before their jobs are taken for those of dead nodes.
        if now - self._connected_since >= self.options.lease_seconds:
            self._took_over(await coordination.requeue_dead(self.options.max_attempts))
        local = {key_of(record) for record in self.records.every()}
        for kind, job_id, value in await coordination.release(local, self.options.max_attempts):
            log.warning(
                "%s %d: running here no more (restarted or lease lost) -> %s",
                kind,
                job_id,
                value.get("status"),
            )
            self._settle_here(kind, value)
        shared = await coordination.shared()
        if self.scheduler.exclusive_name is None:  # exclusive work reads its own copy
            self.upkeep.load(shared)
            self.repository.refresh(shared)
        self._note_nodes(await coordination.nodes())

    def _took_over(self, requeued: list[ClusterJob]) -> None:
        for kind, job_id, value in requeued:
            log.warning(
                "%s %d: its node stopped renewing its lease -> %s (%s)",
                kind,
                job_id,
                value.get("status"),
                value.get("extra", ""),
            )
            self._settle_here(kind, value)
        if requeued:
            self.wake()
            # The dead node's restic had no time to remove its lock if it was killed too.
            task = asyncio.create_task(self.restic.remove_stale_locks())
            task.add_done_callback(lambda done: done.cancelled() or done.exception())

    def _settle_here(self, kind: str, value: dict[str, Any]) -> None:
        """Takes up a backup that ended with an attempt to settle (its node died after a
        cancel was asked): this node's maintenance settles it (Settling.due). One that
        runs again is settled by whichever node claims it."""
        record = record_of(kind, value)
        if isinstance(record, BackupRecord) and record.unsettled and record.status.is_terminal:
            self.records.adopt(record)
            self.scheduler.wake()

    def _note_nodes(self, leases: Sequence[NodeLease]) -> None:
        self.nodes_alive = sum(1 for lease in leases if lease.alive)
        self.metrics.nodes(
            {lease.name: (lease.running, lease.lease_age) for lease in leases if lease.alive}
        )

    async def _share(self) -> None:
        """Publishes the progress of this node's jobs; starts the cancels asked of it."""
        progress = {key: value.model_dump() for key, value in self.execution.progress.items()}
        if progress:
            await self.coordination.share_progress(progress)
        if not self.records.with_status(JobStatus.RUNNING):
            return  # a cancel is asked only of a job running here
        for kind, job_id, by in await self.coordination.cancel_requests():
            key = (kind, job_id)
            record = self.records.of(kind).get(job_id)
            if record is None or key in self._cancelling:
                continue
            log.info("%s %d: cancel asked by %s on another node", kind, job_id, by)
            task = asyncio.create_task(self._cancel(key, record, by))
            self._cancelling[key] = task

    async def _cancel(self, key: JobKey, record: JobRecord, by: str) -> None:
        try:
            await self.canceller.cancel(record, by)
        except OSError as error:
            log.error("%s %d: could not cancel: %s", *key, error)
        finally:
            self._cancelling.pop(key, None)

    async def _claim(self) -> None:
        slots = self.scheduler.free_slots if self._claiming and self.scheduler.accepts_jobs else 0
        # One round trip a tick when nothing waits: an idle cluster hardly loads its database.
        self.jobs_waiting = await self.coordination.pending_exists()
        claimed = await self.coordination.claim(slots) if slots and self.jobs_waiting else []
        self._missed = bool(slots and self.jobs_waiting and not claimed and not self._retried)
        self._retried = self._missed
        for kind, job_id, value in claimed:
            record = record_of(kind, value)
            key = (kind, job_id)
            self.records.adopt(record)
            self.execution.claimed.add(key)
            self.scheduler.start_now(key)
            log.info("%s %d: claimed by node %s", kind, job_id, self.name)

    async def _fence(self) -> None:
        """Stops this node's jobs once it could not renew its lease for most of it."""
        silent = time.monotonic() - self._last_beat
        if silent < FENCE_FRACTION * self.options.lease_seconds:
            return
        local = [key_of(record) for record in self.records.every()]
        if not local:
            return
        log.error(
            "cluster: lease not renewed for %.0fs: stopping %d jobs here (other nodes run "
            "them again)",
            silent,
            len(local),
        )
        stopping = []
        for key in local:
            task = self.scheduler.task_of(key)
            if task is not None:
                stopping.append(self.execution.interrupt(key, task, Stop("shutdown")))
            elif self.scheduler.dequeue(key):
                self.execution.claimed.discard(key)
        await asyncio.gather(*stopping, return_exceptions=True)
        for key in local:  # what could not be written is the database's to release
            if self.scheduler.task_of(key) is None:
                self.records.let_go(key)

    # -- shared reads and exclusive work ---------------------------------------------------

    @contextlib.asynccontextmanager
    async def reading(self) -> AsyncIterator[None]:
        """A browse's `restic ls`: kept apart from exclusive work on this node (the
        scheduler's `reading`) and on every other (the cluster's gate, shared). Raises Busy
        when another node's exclusive work did not end within `read_wait` seconds."""
        async with (
            self.scheduler.reading(),
            self.coordination.reading(self.read_wait) as held,
        ):
            if not held:
                raise Busy(
                    "the repository is busy with maintenance on another node: try again in a minute"
                )
            yield

    async def gate(self, work: ExclusiveWork) -> None:
        """Runs exclusive work once no node runs a job, holding the cluster's exclusive lock
        (no node claims meanwhile); a preemptible one gives way to a job waiting anywhere.
        Raises what the work raised, OSError when the database is out of reach."""
        if not work.cluster_wide:
            await work.run()
            return
        coordination = self.coordination
        async with coordination.exclusive():
            while await coordination.running_anywhere():
                if work.preemptible and await self._gives_way(work):
                    return
                await asyncio.sleep(GATE_POLL_SECONDS)
            if work.preemptible and await self._gives_way(work):
                return
            shared = await coordination.shared()  # another node may have done it meanwhile
            self.upkeep.load(shared)
            self.repository.refresh(shared)
            if work.still_wanted is not None and not work.still_wanted():
                return
            if not work.preemptible:
                await work.run()
                return
            task = asyncio.create_task(work.run())
            try:
                while not task.done():
                    await asyncio.wait({task}, timeout=TICK_SECONDS)
                    if not task.done() and await self._gives_way(work):
                        log.info("maintenance %s interrupted: a job is waiting", work.name)
                        task.cancel()
                        await asyncio.gather(task, return_exceptions=True)
                        raise asyncio.CancelledError
            except asyncio.CancelledError:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise
            task.result()

    async def _gives_way(self, work: ExclusiveWork) -> bool:
        if not await self.coordination.pending_exists():
            return False
        self.jobs_waiting = True
        log.debug("maintenance %s gives way: jobs are waiting", work.name)
        return True
