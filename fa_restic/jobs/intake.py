"""Accepting jobs: ids in use, the per-user cap, and the durable record before the answer."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fa_restic.jobs.browse import Browser, NotInBackup, clean_path, shown
from fa_restic.jobs.errors import JobConflict, UnknownJob
from fa_restic.jobs.models import BackupRecord, JobRecord, RestoreRecord, utc_now
from fa_restic.jobs.ports import Coordination
from fa_restic.jobs.records import Records, key_of, put
from fa_restic.jobs.scheduler import Scheduler
from fa_restic.names import JobStatus, Overwrite

log = logging.getLogger("fa_restic.jobs")

REUSABLE_BACKUP_ID = frozenset({JobStatus.FAILED, JobStatus.CANCEL})
"""A backup id of the caller's may be used again once its backup failed or was cancelled."""
REUSABLE_RESTORE_ID = frozenset({JobStatus.SUCCESS, JobStatus.FAILED, JobStatus.CANCEL})
"""A restore id of the caller's may be used again once its restore ended."""


@dataclass(frozen=True)
class Caller:
    user: str
    admin: bool = False

    def may_see(self, record: JobRecord) -> bool:
        return self.admin or record.user == self.user


class Intake:
    """Turns accepted requests into queued records; refuses what SPEC §5 and §9 refuse."""

    def __init__(
        self,
        records: Records,
        scheduler: Scheduler,
        max_pending_per_user: int,
        browser: Browser | None = None,
        coordination: Coordination | None = None,
        queued: Callable[[], None] = lambda: None,
    ) -> None:
        """`coordination`: a cluster's (SPEC §10), where a job is queued in the database
        the nodes share and `queued` is told (this node then claims sooner)."""
        self.records = records
        self.scheduler = scheduler
        self.max_pending_per_user = max_pending_per_user
        self.browser = browser
        """Checks a selective restore's entries against the backup's tree."""
        self.coordination = coordination
        self.queued = queued
        self._writing: dict[str, int] = {}
        """Per user, jobs accepted but not yet queued (their record is being written)."""

    async def backup(
        self, caller: Caller, backup_id: int, path: Path, exclude: Sequence[str] = ()
    ) -> BackupRecord:
        """Records a backup durably and queues it; raises JobConflict, OSError.

        `exclude`: restic patterns relative to `path` (checked by the API's request model).
        """
        # Records.get looks at the live records after its read of the store, and from here
        # to the record's place among them (Records.add) nothing awaits on a single node: of
        # racing POSTs of one id, one is accepted. In a cluster the database decides (admit).
        existing = await self.records.backup(backup_id)
        if existing is not None:
            if existing.user != caller.user:  # ids are global; say nothing of another's job
                raise JobConflict(f"backup id {backup_id} is in use")
            if existing.status.is_active or existing.status is JobStatus.SUCCESS:
                raise JobConflict(f"backup id {backup_id} is in use ({existing.status})")
        self._refuse_too_many(caller)
        record = BackupRecord(
            id=backup_id,
            user=caller.user,
            path=str(path),
            exclude=list(exclude),
            created_at=utc_now(),
            sequence=self._next_sequence(),
        )
        await self._accept(record, REUSABLE_BACKUP_ID, caller.admin)
        log.info("backup %d: accepted from %s for %s", backup_id, caller.user, path)
        return record

    async def restore(
        self,
        caller: Caller,
        restore_id: int,
        backup_id: int,
        target: Path,
        include: Sequence[str] = (),
        overwrite: Overwrite = Overwrite.ALWAYS,
    ) -> RestoreRecord:
        """Records a restore durably and queues it; raises UnknownJob, JobConflict,
        NotInBackup (an `include` entry the backup does not hold), ResticError (its tree
        could not be read), OSError."""
        backup = await self.records.backup(backup_id)
        if backup is None or not caller.may_see(backup):
            raise UnknownJob(f"no such backup [ {backup_id} ]")
        if backup.status is not JobStatus.SUCCESS or backup.snapshot_id is None:
            raise JobConflict(f"backup {backup_id} is {backup.status}, not success")
        entries = [clean_path(entry) for entry in include]
        await self._check_entries(backup, entries)
        existing = await self.records.restore(restore_id)  # the last await: see `backup`
        if existing is not None:
            if existing.user != caller.user:  # ids are global; say nothing of another's job
                raise JobConflict(f"restore id {restore_id} is in use")
            if existing.status.is_active:
                raise JobConflict(f"restore id {restore_id} is in use ({existing.status})")
        self._refuse_too_many(caller)
        record = RestoreRecord(
            id=restore_id,
            user=caller.user,
            backup_id=backup_id,
            dst_path=str(target),
            snapshot_id=backup.snapshot_id,
            include=entries,
            overwrite=overwrite,
            created_at=utc_now(),
            sequence=self._next_sequence(),
        )
        await self._accept(record, REUSABLE_RESTORE_ID, caller.admin)
        log.info(
            "restore %d: accepted from %s, backup %d into %s",
            restore_id,
            caller.user,
            backup_id,
            target,
        )
        return record

    async def _check_entries(self, backup: JobRecord, entries: list[str]) -> None:
        """Raises NotInBackup naming the first entry the backup's tree does not hold.

        Before the checks of the restore id and the cap, which must have no await between
        them and the record's write."""
        if not entries or self.browser is None:
            return
        assert isinstance(backup, BackupRecord)
        missing = await self.browser.first_missing(backup, entries)
        if missing is not None:
            raise NotInBackup(f"include: {shown(missing)} is not in backup {backup.id}")

    def _next_sequence(self) -> int:
        """Returns the new job's place in its user's queue; 0 in a cluster, where the
        database gives it (Coordination.admit)."""
        return 0 if self.coordination is not None else self.records.next_sequence()

    def _refuse_too_many(self, caller: Caller) -> None:
        """Raises JobConflict when a non-admin caller has `max_pending_per_user` jobs
        pending (backups and restores together, those being accepted included).

        It awaits nothing, so concurrent POSTs cannot overshoot the cap. In a cluster the
        database counts, when it admits the job (`_accept`)."""
        if caller.admin or self.coordination is not None:
            return
        pending = self.scheduler.queued_of(caller.user) + self._writing.get(caller.user, 0)
        self._check_cap(pending)

    def _check_cap(self, pending: int) -> None:
        limit = self.max_pending_per_user
        if pending >= limit:
            raise JobConflict(
                f"too many pending jobs ({pending} of at most {limit}): "
                "wait for some to start, or cancel some"
            )

    async def _accept(
        self, record: BackupRecord | RestoreRecord, reusable: frozenset[JobStatus], admin: bool
    ) -> None:
        """Writes a new record and queues it, counted against its user's pending jobs
        meanwhile; raises OSError (not written), JobConflict (a cluster: another node took
        the id meanwhile, or it is another user's, or the user's cap is reached).
        `_refuse_too_many` comes first, with no await in between on a single node, so
        concurrent POSTs cannot overshoot the cap. `reusable`: the statuses in which the
        caller's own record of that id is replaced; `admin`: an admin's jobs have no cap."""
        user = record.user
        self._writing[user] = self._writing.get(user, 0) + 1
        try:
            if self.coordination is not None:
                kind = key_of(record)[0]
                cap = None if admin else self.max_pending_per_user
                admission = await self.coordination.admit(
                    kind, record.id, user, put(record).value, [s.value for s in reusable], cap
                )
                if not admission.admitted:
                    if admission.pending is not None and cap is not None:
                        self._check_cap(admission.pending)
                    raise JobConflict(f"{kind} id {record.id} is in use")
                record.sequence = admission.sequence or 0
                self.queued()
                return
            await self.records.add(record)
        finally:
            if self._writing[user] == 1:
                del self._writing[user]
            else:
                self._writing[user] -= 1
        self.scheduler.enqueue(key_of(record), record.sequence, record.user)
