"""Cancelling jobs: a pending one leaves the queue at once, a running one is interrupted."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable, Sequence

from fa_restic.jobs.execution import Execution, Stop
from fa_restic.jobs.models import JobRecord, utc_now
from fa_restic.jobs.records import Records, cancelled_in_queue_fields, key_of, update
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


class Canceller:
    """Cancels jobs; knows the queue (scheduler), the running tasks and the records."""

    def __init__(
        self, records: Records, scheduler: Scheduler, execution: Execution, metrics: Metrics
    ) -> None:
        self.records = records
        self.scheduler = scheduler
        self.execution = execution
        self.metrics = metrics

    async def cancel(self, record: JobRecord, by: str) -> None:
        """Cancels one job; returns once it is written, or once its restic is gone."""
        changes = self._cancel_queued([record], by)
        if changes:
            await self.records.write(changes)
        else:
            await self._stop(record, by)

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
