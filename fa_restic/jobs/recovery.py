"""What a predecessor left: jobs it was running, and snapshots of attempts cut short.

`scrub` runs once at start, before anything else: a job found running had its restic
killed with the service (or is ended now), and runs again or fails for good. `settle`
then looks in the repository for snapshots such an attempt may have saved.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from fa_restic.jobs.maintenance import Upkeep
from fa_restic.jobs.models import BackupRecord, ForgetRecord, utc_now
from fa_restic.jobs.ports import ResticRunner
from fa_restic.jobs.records import JobKey, Records, forget_put, key_of, put
from fa_restic.names import JobKind, JobStatus, snapshot_tags
from fa_restic.restic import runner
from fa_restic.restic.errors import ResticError
from fa_restic.store import Operation

log = logging.getLogger("fa_restic.jobs")


def scrub(records: Records, max_attempts: int) -> list[Operation]:
    """Ends what the last run left running: ends its restic, runs the job again or fails it.

    Returns the changes to write.
    """
    changes: list[Operation] = []
    for record in records.with_status(JobStatus.RUNNING):
        if isinstance(record, BackupRecord):
            record.unsettled = True
        if record.pid is not None and runner.kill_leftover(record.pid, record.pid_start):
            log.warning(
                "%s %d: ended restic pid %d left by the last run", *key_of(record), record.pid
            )
        if record.attempts < max_attempts:
            record.move_to(
                JobStatus.PENDING,
                extra=f"interrupted (attempt {record.attempts} of {max_attempts}); runs again",
            )
        else:
            record.move_to(
                JobStatus.FAILED,
                extra=(
                    f"interrupted: the service stopped during attempt {record.attempts} of "
                    f"{max_attempts}; not tried again"
                ),
            )
        log.info("%s %d: found running at start -> %s", *key_of(record), record.status)
        changes.append(put(record))
    return changes


class Settling:
    """Makes every tagged snapshot stand for exactly one record, after attempts cut short.

    `dequeue` takes a pending job out of the queue (False if it already started);
    `finished` counts a job that ended.
    """

    def __init__(
        self,
        records: Records,
        restic: ResticRunner,
        upkeep: Upkeep,
        dequeue: Callable[[JobKey], bool],
        finished: Callable[[str, BackupRecord], None],
    ) -> None:
        self.records = records
        self.restic = restic
        self.upkeep = upkeep
        self.dequeue = dequeue
        self.finished = finished

    def due(self) -> bool:
        """True when a finished backup still has an attempt to settle."""
        return any(
            record.unsettled and record.status.is_terminal
            for record in self.records.backups.values()
        )

    async def settle_all(self) -> None:
        """Settles every unsettled backup; stops at the first repository error (and backs
        maintenance off), to try again later."""
        for record in [record for record in self.records.backups.values() if record.unsettled]:
            try:
                await self.settle(record)
            except ResticError as error:
                log.error("backup %d: could not look for its snapshots: %s", record.id, error)
                self.upkeep.state.failed(time.monotonic())
                return

    async def settle(self, record: BackupRecord) -> None:
        """Settles the snapshots of a backup whose attempt was cut short (crash, stop, cancel).

        restic may have made the snapshot just before the service died. If the job is
        to run again, the newest such snapshot is adopted instead; any other is forgotten.
        Raises ResticError.
        """
        await self._settle(
            record,
            lambda: (
                record.status is JobStatus.PENDING and self.dequeue((JobKind.BACKUP, record.id))
            ),
        )

    async def settle_claimed(self, record: BackupRecord) -> bool:
        """Settles a backup this node claimed to run again (a cluster: the node that ran it
        died); returns True when a snapshot of the attempt cut short was adopted, so that
        the backup is `success` and need not run. Raises ResticError."""
        return await self._settle(record, lambda: record.status is JobStatus.RUNNING)

    async def _settle(self, record: BackupRecord, runs_again: Callable[[], bool]) -> bool:
        found = await self.restic.snapshots(tags=snapshot_tags(record.id, record.user))
        orphans = sorted(
            (s for s in found if s.id != record.snapshot_id and s.id not in self.upkeep.forgets),
            key=lambda snapshot: snapshot.time,
        )
        record.unsettled = False
        adopted = None
        if orphans and runs_again():
            adopted = orphans.pop()
            record.total_size, record.pack_size = await self.restic.backup_sizes(adopted)
            record.snapshot_id = adopted.id
            record.move_to(JobStatus.SUCCESS, extra="")
            self.finished(JobKind.BACKUP, record)
            log.warning(
                "backup %d: adopted snapshot %s made before the service stopped",
                record.id,
                adopted.id[:12],
            )
        operations: list[Operation] = []
        for orphan in orphans:
            forget = ForgetRecord(
                snapshot_id=orphan.id, backup_id=record.id, user=record.user, queued_at=utc_now()
            )
            self.upkeep.queue(forget)
            operations.append(forget_put(forget))
            log.warning(
                "backup %d: snapshot %s of an interrupted attempt will be forgotten",
                record.id,
                orphan.id[:12],
            )
        await self.records.save(record, *operations)
        return adopted is not None
