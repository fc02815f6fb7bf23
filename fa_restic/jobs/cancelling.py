"""Cancelling jobs: a pending one leaves the queue at once, a running one is interrupted.

In a cluster (SPEC §10) a pending job is cancelled in the database the nodes share, and the
node running a job is asked to cancel it (it looks every second, jobs.node); the cancel
returns once that node wrote the job's end.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable, Sequence

from fa_restic.jobs.execution import Execution, Stop
from fa_restic.jobs.models import JobRecord, utc_now
from fa_restic.jobs.ports import Coordination
from fa_restic.jobs.records import JobKey, Records, cancelled_in_queue_fields, key_of, update
from fa_restic.jobs.scheduler import Scheduler
from fa_restic.metrics import Metrics
from fa_restic.names import JobStatus
from fa_restic.store import Cleared, Operation

CANCEL_CHUNK = 250
"""Jobs a cancel-all changes per step (~15 µs each on the 2-core VM): it gives the event
loop back between steps, so that other requests are answered while 50,000 jobs are
cancelled."""
WRITE_BATCH = 2_000
"""Most changes a cancel-all writes at once: the writer thread holds the GIL while it
encodes a batch, and the event loop waits for the GIL meanwhile."""
SCAN_CHUNK = 2_000
"""Records a cancel-all looks at per step to find the active ones (~0.5 µs each)."""
POLL_SECONDS = 0.2
"""How often a cancel looks whether the node running the job has ended it."""


class Canceller:
    """Cancels jobs; knows the queue (scheduler), the running tasks and the records."""

    def __init__(
        self,
        records: Records,
        scheduler: Scheduler,
        execution: Execution,
        metrics: Metrics,
        coordination: Coordination | None = None,
        remote_wait_seconds: float = 40.0,
    ) -> None:
        """`coordination`: the cluster's, or None for a single node. `remote_wait_seconds`:
        how long a cancel waits for another node to end the job (its lease and then some:
        a node that died has its jobs ended by the others)."""
        self.records = records
        self.scheduler = scheduler
        self.execution = execution
        self.metrics = metrics
        self.coordination = coordination
        self.remote_wait_seconds = remote_wait_seconds

    async def cancel(self, record: JobRecord, by: str) -> JobRecord:
        """Cancels one job; returns the record once the cancel is written, or once its
        restic is gone (in a cluster, once the node running it wrote its end)."""
        if self.coordination is not None:
            return await self._cancel_in_cluster(self.coordination, record, by)
        changes = self._cancel_queued([record], by)
        if changes:
            await self.records.write(changes)
        else:
            await self._stop(record, by)
        return record

    async def _cancel_in_cluster(
        self, coordination: Coordination, record: JobRecord, by: str
    ) -> JobRecord:
        kind, job_id = key = key_of(record)
        for _ in range(3):  # the job may change hands while it is asked for
            local = self.records.of(kind).get(job_id)
            if local is not None:  # this node runs it
                await self._stop(local, by)
                return local
            fields = cancelled_in_queue_fields(f"cancelled by {by} before it started", utc_now())
            if await coordination.cancel_pending(kind, fields, job_id=job_id):
                self.metrics.jobs_cancelled(kind, 1)
                return await self.records.get(key) or record
            if await coordination.request_cancel(kind, by, job_id=job_id):
                return (await self._ended([key]))[0] or record
            current = await self.records.get(key)
            if current is None or current.status.is_terminal:
                return current or record
        return record

    async def _ended(self, keys: Sequence[JobKey]) -> list[JobRecord | None]:
        """Returns the records of jobs other nodes were asked to cancel, once each ended or
        `remote_wait_seconds` passed (as they were then)."""
        deadline = asyncio.get_running_loop().time() + self.remote_wait_seconds
        found: dict[JobKey, JobRecord | None] = {}
        waiting = list(keys)
        while True:
            for key in waiting:
                found[key] = await self.records.get(key)
            waiting = [key for key in waiting if (r := found[key]) and not r.status.is_terminal]
            if not waiting or asyncio.get_running_loop().time() >= deadline:
                return [found[key] for key in keys]
            await asyncio.sleep(POLL_SECONDS)

    async def cancel_all(self, candidates: Sequence[JobRecord], by: str) -> list[int]:
        """Cancels every active job among `candidates`; returns the ids now `cancel`, sorted.

        Pending jobs are cancelled CANCEL_CHUNK at a time, with the event loop given back
        in between, so that 50,000 of them never hold it for long; the scheduler starts
        none of them meanwhile. While one write runs on the store's writer thread, the
        next steps' changes gather and go in the next write (at most WRITE_BATCH changes).
        Running jobs are then interrupted together. Jobs accepted meanwhile are left alone.
        """
        with self.scheduler.held():
            active = await self._active(candidates)
            cancelled: list[int] = []
            started: list[JobRecord] = []
            gathered: list[Operation] = []
            writing: asyncio.Task[Cleared] | None = None
            for start in range(0, len(active), CANCEL_CHUNK):
                chunk = active[start : start + CANCEL_CHUNK]
                gathered += self._cancel_queued(chunk, by)
                for record in chunk:
                    if record.status is JobStatus.CANCEL:
                        cancelled.append(record.id)
                    elif record.status.is_active:
                        started.append(record)
                if writing is None or writing.done() or len(gathered) >= WRITE_BATCH:
                    if writing is not None:
                        await writing  # raises what the write raised
                    writing = asyncio.create_task(self.records.write(gathered))
                    gathered = []
                await asyncio.sleep(0)
            if writing is not None:
                await writing
            await self.records.write(gathered)
        await asyncio.gather(*(self._stop(record, by) for record in started))
        cancelled += (record.id for record in started if record.status is JobStatus.CANCEL)
        return sorted(cancelled)

    async def cancel_all_in_cluster(self, kind: str, by: str, user: str | None) -> list[int]:
        """Cancels every pending or running job of `kind` of `user` (None: of everyone) on
        every node; returns the ids now `cancel`, sorted."""
        coordination = self.coordination
        if coordination is None:
            return await self.cancel_all(self._live(kind, user), by)
        # The cluster's queue first: a slot this node's stops free would claim a job still
        # waiting there, and request_cancel asks other nodes only. Then the other nodes are
        # asked before this node's own stops, which wait for restic to end: asked after
        # them, a short backup elsewhere finished meanwhile (CI saw both end in success).
        fields = cancelled_in_queue_fields(f"cancelled by {by} before it started", utc_now())
        queued = await coordination.cancel_pending(kind, fields, user=user)
        self.metrics.jobs_cancelled(kind, len(queued))
        cancelled = set(queued)
        asked = await coordination.request_cancel(kind, by, user=user)
        # This node's records read now: a job it claimed meanwhile is stopped here too.
        cancelled.update(await self.cancel_all(self._live(kind, user), by))
        ended = await self._ended([(kind, job_id) for job_id in asked])
        cancelled.update(r.id for r in ended if r is not None and r.status is JobStatus.CANCEL)
        return sorted(cancelled)

    def _live(self, kind: str, user: str | None) -> list[JobRecord]:
        """Returns this node's live records of `kind` of `user` (None: of everyone)."""
        return [r for r in self.records.of(kind).values() if user is None or r.user == user]

    @staticmethod
    async def _active(candidates: Sequence[JobRecord]) -> list[JobRecord]:
        active: list[JobRecord] = []
        for start in range(0, len(candidates), SCAN_CHUNK):
            active += (
                record
                for record in candidates[start : start + SCAN_CHUNK]
                if record.status.is_active
            )
            await asyncio.sleep(0)
        return active

    def _cancel_queued(self, records: Iterable[JobRecord], by: str) -> list[Operation]:
        """Cancels the jobs among `records` that wait in the queue; returns the changes."""
        changes: list[Operation] = []
        extra = f"cancelled by {by} before it started"
        now = utc_now()
        fields = cancelled_in_queue_fields(extra, now)
        for record in records:
            if record.status is JobStatus.PENDING and self.scheduler.dequeue(key_of(record)):
                record.move_to(JobStatus.CANCEL, extra, now)
                changes.append(update(record, fields))
        for kind, count in Counter(change.collection for change in changes).items():
            self.metrics.jobs_cancelled(kind, count)
        return changes

    async def _stop(self, record: JobRecord, by: str) -> None:
        """Interrupts a started job; returns once restic is gone and the record written."""
        key = key_of(record)
        task = self.scheduler.task_of(key)
        if task is None:
            return
        await self.execution.interrupt(key, task, Stop("cancel", by))
        if record.status is JobStatus.PENDING:  # cancelled before its task began to run
            record.move_to(JobStatus.CANCEL, extra=f"cancelled by {by} before it started")
            await self.records.save(record)
            self.metrics.job_finished(key[0], record)
