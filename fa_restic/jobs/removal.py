"""Removing backups: one (its record at once, its snapshot forgotten soon after) or all of
them with the repository (destroy-repo)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fa_restic.jobs import maintenance
from fa_restic.jobs.cancelling import Canceller
from fa_restic.jobs.models import BackupRecord, ForgetRecord, utc_now
from fa_restic.jobs.ports import ResticRunner
from fa_restic.jobs.records import Records
from fa_restic.jobs.repository import Repository, RepositoryState
from fa_restic.jobs.scheduler import ExclusiveWork, Scheduler
from fa_restic.names import JobKind
from fa_restic.store import Operation

log = logging.getLogger("fa_restic.jobs")


class Removal:
    """Deletes backups, and destroys the repository (a local folder, or every snapshot)."""

    def __init__(
        self,
        records: Records,
        repository: Repository,
        upkeep: maintenance.Upkeep,
        scheduler: Scheduler,
        canceller: Canceller,
        local_repository: Path | None,
    ) -> None:
        self.records = records
        self.repository = repository
        self.upkeep = upkeep
        self.scheduler = scheduler
        self.canceller = canceller
        self.local_repository = local_repository

    @property
    def restic(self) -> ResticRunner:
        return self.repository.restic

    async def delete_backup(self, record: BackupRecord, by: str) -> str | None:
        """Drops a finished backup's record now and queues its snapshot's forget durably.

        Returns the snapshot id to be forgotten (None if the backup made none); raises
        OSError if it could not be written (nothing changed then).
        """
        operations: list[Operation] = [self.records.delete(JobKind.BACKUP, record.id)]
        forget: ForgetRecord | None = None
        if record.snapshot_id is not None:
            forget = ForgetRecord(
                snapshot_id=record.snapshot_id,
                backup_id=record.id,
                user=record.user,
                queued_at=utc_now(),
            )
            operations.append(self.upkeep.forget_op(forget))
        await self.records.write(operations)
        if self.records.backups.get(record.id) is record:
            del self.records.backups[record.id]
        if forget is not None:
            self.upkeep.queue(forget)
        queued = "; forget of its snapshot queued" if forget else ""
        log.info("backup %d: deleted by %s%s", record.id, by, queued)
        self.scheduler.wake()
        return forget.snapshot_id if forget else None

    async def destroy(self, by: str) -> dict[str, Any]:
        """Cancels every job, removes the repository's data, drops every backup record.

        Returns what was done; raises ResticError when a remote repository could not be
        emptied (the repository's state is then as it was).
        """
        before, self.repository.state = self.repository.state, RepositoryState.DESTROYING
        try:
            for kind in (JobKind.BACKUP, JobKind.RESTORE):
                await self.canceller.cancel_all_in_cluster(kind, by, None)
            report = await self._remove()
        except BaseException:
            self.repository.state = before
            raise
        clear = self.records.clear(JobKind.BACKUP)
        self.repository.state = RepositoryState.DESTROYED
        # The store counts what its Clear removed: exact, where counts() of a database may
        # be a moment old.
        cleared = await self.records.write([clear, *self.upkeep.clear(), self.repository.op()])
        dropped = cleared.get(JobKind.BACKUP, 0)
        log.warning(
            "repository destroyed by %s: %s; %d backup records dropped",
            by,
            report.method,
            dropped,
        )
        return {
            "destroyed": True,
            "method": report.method,
            "snapshots_removed": report.snapshots_removed,
            "backup_records_dropped": dropped,
        }

    async def _remove(self) -> maintenance.DestroyReport:
        reports: list[maintenance.DestroyReport] = []

        async def work() -> None:
            reports.append(
                await maintenance.destroy(
                    self.restic,
                    self.local_repository,
                    self.repository.lock_wait,
                    lambda phase: log.info("destroy: %s", phase),
                )
            )

        await self.scheduler.exclusive(ExclusiveWork("destroy", work))
        return reports[0]
