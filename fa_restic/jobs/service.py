"""The job layer's face to the API: accepts, tracks, cancels and deletes jobs.

Records live in memory and every change is written to the state store before a
request is answered. Progress is kept in memory only and persisted with the
status changes, not with every restic status line.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from fa_restic.jobs import maintenance
from fa_restic.jobs.backup import Source, run_backup, snapshot_tags
from fa_restic.jobs.errors import JobConflict, UnknownJob
from fa_restic.jobs.models import (
    BackupRecord,
    ForgetRecord,
    JobKind,
    JobRecord,
    JobStatus,
    Progress,
    RestoreRecord,
    utc_now,
)
from fa_restic.jobs.restore import make_folder, run_restore
from fa_restic.jobs.retry import retry_transient
from fa_restic.jobs.scheduler import ExclusiveWork, JobKey, Scheduler
from fa_restic.jobs.staging import staged_restore
from fa_restic.metrics import Metrics
from fa_restic.restic import runner
from fa_restic.restic.client import Restic, RestoreResult
from fa_restic.restic.errors import ResticError
from fa_restic.restic.sandbox import EXIT_REFUSED, Refused
from fa_restic.store import Delete, Operation, Put, StateStore, Update
from fa_restic.store.state import Collections

log = logging.getLogger("fa_restic.jobs")

StopReason = Literal["cancel", "shutdown"]
REPOSITORY_KEY = "repository"
CANCEL_CHUNK = 250
"""Jobs a cancel-all changes per step (~15 µs each on the 2-core VM): it gives the event
loop back between steps, so that other requests are answered while 50,000 jobs are
cancelled."""
WRITE_BATCH = 2_000
"""Most changes a cancel-all writes at once: the writer thread holds the GIL while it
encodes a batch, and the event loop waits for the GIL meanwhile."""
SCAN_CHUNK = 2_000
"""Records a cancel-all looks at per step to find the active ones (~0.5 µs each)."""


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


@dataclass(frozen=True)
class Caller:
    user: str
    admin: bool = False

    def may_see(self, record: JobRecord) -> bool:
        return self.admin or record.user == self.user


@dataclass
class _Stop:
    reason: StopReason
    by: str = ""


@dataclass(frozen=True)
class JobResult:
    """What a finished backup or restore reports."""

    total_size: int
    pack_size: int
    file_count: int
    extra: str
    snapshot_id: str | None = None


@dataclass
class Health:
    pending: int
    running: int
    maintenance: str | None


def _record_ops(record: JobRecord) -> Put:
    kind = "backup" if isinstance(record, BackupRecord) else "restore"
    return Put(kind, str(record.id), record.model_dump(mode="json"))


class JobService:
    """Backups, restores and the repository's upkeep, for the API."""

    def __init__(
        self, options: JobOptions, store: StateStore, restic: Restic, metrics: Metrics
    ) -> None:
        self.options = options
        self.store = store
        self.restic = restic
        self.metrics = metrics
        self.backups: dict[int, BackupRecord] = {}
        self.restores: dict[int, RestoreRecord] = {}
        self.upkeep = maintenance.Upkeep(
            restic, store, options.lock_wait_seconds, options.prune_interval_seconds
        )
        self._progress: dict[JobKey, Progress] = {}
        self._stops: dict[JobKey, _Stop] = {}
        self._destroyed = False
        self._sequence = 0
        self._repository_ready = False
        self._repository_lock = asyncio.Lock()
        self._destroying = False
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._submitting: dict[str, int] = {}
        """Per user, jobs accepted but not yet queued (their record is being written)."""
        self.scheduler = Scheduler(options.max_running, self._run_job, self._pick_maintenance)

    # -- start and stop -------------------------------------------------------------

    def load(self, collections: Collections) -> None:
        """Takes the job records read from the state file (StateStore.load)."""
        self.backups = {
            int(key): BackupRecord.model_validate(value)
            for key, value in collections.get("backup", {}).items()
        }
        self.restores = {
            int(key): RestoreRecord.model_validate(value)
            for key, value in collections.get("restore", {}).items()
        }
        self.upkeep.load(collections)
        saved = collections.get("meta", {}).get(REPOSITORY_KEY, {})
        self._destroyed = bool(saved.get("destroyed", False))

    @property
    def forgets(self) -> dict[str, ForgetRecord]:
        """Snapshots of deleted backups still to be forgotten."""
        return self.upkeep.forgets

    async def start(self) -> None:
        """Scrubs what a dead predecessor left and starts the scheduler (after `load`).

        Before any job runs, the repository is initialised if missing and stale
        locks are removed.
        """
        records: list[JobRecord] = [*self.backups.values(), *self.restores.values()]
        self._sequence = max((record.sequence for record in records), default=0)
        await self.store.write(self._scrub(records))
        preparation = self.scheduler.request(ExclusiveWork("startup", self._prepare_repository))
        for record in sorted(records, key=lambda record: record.sequence):
            if record.status is JobStatus.PENDING:
                self.scheduler.enqueue(self._key(record), record.sequence, record.user)
        self.metrics.bind(self)
        self.scheduler.start()
        self._background(preparation, "prepare the repository")

    async def _prepare_repository(self) -> None:
        if not self._destroyed:
            await self._ensure_repository()
        if await self.upkeep.guarded("unlock", self.restic.unlock) == "ok":
            log.info("stale locks removed (restic unlock)")
        await self._settle_all()

    async def _settle_all(self) -> None:
        for record in [record for record in self.backups.values() if record.unsettled]:
            try:
                await self._settle(record)
            except ResticError as error:
                log.error("backup %d: could not look for its snapshots: %s", record.id, error)
                self.upkeep.state.failed(time.monotonic())
                return

    async def _settle(self, record: BackupRecord) -> None:
        """Settles the snapshots of a backup whose attempt was cut short (crash, stop, cancel).

        restic may have made the snapshot just before the service died. If the job is
        to run again, the newest such snapshot is adopted instead; any other is forgotten,
        so that every tagged snapshot stands for exactly one record.
        """
        backup_id = record.id
        found = await self.restic.snapshots(tags=snapshot_tags(backup_id, record.user))
        orphans = sorted(
            (s for s in found if s.id != record.snapshot_id and s.id not in self.forgets),
            key=lambda snapshot: snapshot.time,
        )
        record.unsettled = False
        operations: list[Operation] = []
        if (
            orphans
            and record.status is JobStatus.PENDING
            and self.scheduler.dequeue(("backup", backup_id))
        ):
            adopted = orphans.pop()
            record.total_size, record.pack_size = await self.restic.backup_sizes(adopted)
            record.snapshot_id = adopted.id
            record.move_to(JobStatus.SUCCESS)
            record.extra = ""
            self._finished("backup", record)
            log.warning(
                "backup %d: adopted snapshot %s made before the service stopped",
                backup_id,
                adopted.id[:12],
            )
        for orphan in orphans:
            forget = ForgetRecord(
                snapshot_id=orphan.id, backup_id=backup_id, user=record.user, queued_at=utc_now()
            )
            self.upkeep.queue(forget)
            operations.append(self.upkeep.forget_op(forget))
            log.warning(
                "backup %d: snapshot %s of an interrupted attempt will be forgotten",
                backup_id,
                orphan.id[:12],
            )
        await self.store.write([_record_ops(record), *operations])

    def _background(self, work: Awaitable[None], what: str) -> None:
        async def guarded() -> None:
            try:
                await work
            except (ResticError, asyncio.CancelledError) as error:
                log.error("could not %s: %s", what, error or "interrupted")

        task = asyncio.create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _scrub(self, records: Iterable[JobRecord]) -> list[Operation]:
        """Ends what the last run left running: ends its restic, runs the job again or fails it."""
        changes: list[Operation] = []
        for record in records:
            if record.status is not JobStatus.RUNNING:
                continue
            if isinstance(record, BackupRecord):
                record.unsettled = True
            if record.pid is not None and runner.kill_leftover(record.pid, record.pid_start):
                log.warning(
                    "%s %d: ended restic pid %d left by the last run",
                    *self._key(record),
                    record.pid,
                )
            if record.attempts < self.options.max_attempts:
                record.move_to(JobStatus.PENDING)
                record.extra = (
                    f"interrupted (attempt {record.attempts} of {self.options.max_attempts}); "
                    "runs again"
                )
            else:
                record.move_to(JobStatus.FAILED)
                record.extra = (
                    f"interrupted: the service stopped during attempt {record.attempts} of "
                    f"{self.options.max_attempts}; not tried again"
                )
            log.info("%s %d: found running at start -> %s", *self._key(record), record.status)
            changes.append(_record_ops(record))
        return changes

    async def stop(self) -> None:
        """Interrupts running work (SIGINT); interrupted jobs run again after a restart."""
        self._stopping = True
        await self.scheduler.stop()
        tasks = []
        for key in list(self._running_keys()):
            task = self.scheduler.task_of(key)
            if task is not None:
                self._stops[key] = _Stop("shutdown")
                task.cancel()
                tasks.append(task)
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.scheduler.stop_exclusive()
        await asyncio.to_thread(self.store.close)

    # -- records ------------------------------------------------------------------------

    @staticmethod
    def _key(record: JobRecord) -> JobKey:
        return ("backup" if isinstance(record, BackupRecord) else "restore", record.id)

    def _running_keys(self) -> Iterable[JobKey]:
        for backup in self.backups.values():
            if backup.status is JobStatus.RUNNING:
                yield ("backup", backup.id)
        for restore in self.restores.values():
            if restore.status is JobStatus.RUNNING:
                yield ("restore", restore.id)

    def _next_sequence(self) -> int:
        self._sequence += 1
        return self._sequence

    def progress(self, kind: str, record: JobRecord) -> Progress:
        """Returns live progress of a running job, or what its status implies."""
        live = self._progress.get((kind, record.id))
        if live is not None:
            return live
        if record.status is JobStatus.SUCCESS:
            return Progress(
                percent_done=1.0,
                bytes_done=record.total_size,
                total_bytes=record.total_size,
                files_done=record.file_count,
                total_files=record.file_count,
                seconds_remaining=0,
            )
        return Progress()

    def get_backup(self, caller: Caller, backup_id: int) -> BackupRecord:
        """Returns a backup the caller may see; raises UnknownJob."""
        record = self.backups.get(backup_id)
        if record is None or not caller.may_see(record):
            raise UnknownJob(f"no such record [ {backup_id} ]")
        return record

    def get_restore(self, caller: Caller, restore_id: int) -> RestoreRecord:
        """Returns a restore the caller may see; raises UnknownJob."""
        record = self.restores.get(restore_id)
        if record is None or not caller.may_see(record):
            raise UnknownJob(f"no such record [ {restore_id} ]")
        return record

    def _refuse_while_destroying(self) -> None:
        if self._destroying or self._stopping:
            raise JobConflict("the repository is being destroyed or the service is stopping")

    def _refuse_too_many(self, caller: Caller) -> None:
        """Raises JobConflict when a non-admin caller has `max_pending_per_user` jobs
        pending (backups and restores together, those being accepted included)."""
        if caller.admin:
            return
        limit = self.options.max_pending_per_user
        pending = self.scheduler.queued_of(caller.user) + self._submitting.get(caller.user, 0)
        if pending >= limit:
            raise JobConflict(
                f"too many pending jobs ({pending} of at most {limit}): "
                "wait for some to start, or cancel some"
            )

    async def _accept(
        self, caller: Caller, records: dict[int, Any], record: BackupRecord | RestoreRecord
    ) -> None:
        """Writes a new record and queues it, counted against the caller's pending jobs
        meanwhile; raises OSError (not written). `_refuse_too_many` comes first, with no
        await in between, so concurrent POSTs cannot overshoot the cap."""
        user = caller.user
        self._submitting[user] = self._submitting.get(user, 0) + 1
        try:
            await self._write_new(records, record)
        finally:
            if self._submitting[user] == 1:
                del self._submitting[user]
            else:
                self._submitting[user] -= 1
        self.scheduler.enqueue(self._key(record), record.sequence, record.user)

    async def submit_backup(self, caller: Caller, backup_id: int, path: Path) -> BackupRecord:
        """Records a backup durably and queues it; raises JobConflict if the id is in use."""
        self._refuse_while_destroying()
        existing = self.backups.get(backup_id)
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
            created_at=utc_now(),
            sequence=self._next_sequence(),
        )
        self._progress.pop(("backup", backup_id), None)
        await self._accept(caller, self.backups, record)
        log.info("backup %d: accepted from %s for %s", backup_id, caller.user, path)
        return record

    async def submit_restore(
        self, caller: Caller, restore_id: int, backup_id: int, target: Path
    ) -> RestoreRecord:
        """Records a restore durably and queues it; raises UnknownJob or JobConflict."""
        self._refuse_while_destroying()
        backup = self.backups.get(backup_id)
        if backup is None or not caller.may_see(backup):
            raise UnknownJob(f"no such backup [ {backup_id} ]")
        if backup.status is not JobStatus.SUCCESS or backup.snapshot_id is None:
            raise JobConflict(f"backup {backup_id} is {backup.status}, not success")
        existing = self.restores.get(restore_id)
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
            created_at=utc_now(),
            sequence=self._next_sequence(),
        )
        self._progress.pop(("restore", restore_id), None)
        await self._accept(caller, self.restores, record)
        log.info(
            "restore %d: accepted from %s, backup %d into %s",
            restore_id,
            caller.user,
            backup_id,
            target,
        )
        return record

    async def _write_new(
        self, records: dict[int, Any], record: BackupRecord | RestoreRecord
    ) -> None:
        """Adds a record and writes it; raises OSError, with the old record back, if it fails."""
        previous = records.get(record.id)
        records[record.id] = record
        try:
            await self.store.write([_record_ops(record)])
        except OSError:
            if previous is None:
                del records[record.id]
            else:
                records[record.id] = previous
            raise

    # -- cancel and delete ------------------------------------------------------------

    def _records(self, kind: JobKind) -> dict[int, BackupRecord] | dict[int, RestoreRecord]:
        return self.backups if kind is JobKind.BACKUP else self.restores

    async def cancel(self, caller: Caller, kind: JobKind, job_id: int) -> JobRecord:
        """Cancels a pending or running job and returns it once it is `cancel`.

        Raises UnknownJob, or JobConflict when the job finished otherwise.
        """
        record = self._records(kind).get(job_id)
        if record is None or not caller.may_see(record):
            raise UnknownJob(f"no such record [ {job_id} ]")
        if record.status is JobStatus.CANCEL:
            return record
        if record.status.is_terminal:
            raise JobConflict(f"{kind} {job_id} already ended ({record.status})")
        await self._cancel(record, caller.user)
        final = JobStatus(record.status)  # changed by the job's task meanwhile
        if final is not JobStatus.CANCEL:
            raise JobConflict(
                f"{kind} {job_id} ended ({record.status}) before it could be cancelled"
            )
        return record

    async def cancel_all(self, caller: Caller, kind: JobKind) -> list[int]:
        """Cancels every pending or running job of the caller (an admin: of everyone);
        returns the ids now `cancel`.

        Pending jobs are cancelled CANCEL_CHUNK at a time, with the event loop given back
        in between, so that 50,000 of them never hold it for long; the scheduler starts
        none of them meanwhile. While one write runs on the store's writer thread, the
        next steps' changes gather and go in the next write (one fsync for many steps,
        at most WRITE_BATCH changes).
        Running jobs are then interrupted together. Jobs accepted meanwhile are left alone.
        """
        with self.scheduler.held():
            everything = list(self._records(kind).values())
            records: list[JobRecord] = []
            for start in range(0, len(everything), SCAN_CHUNK):
                records += (
                    record
                    for record in everything[start : start + SCAN_CHUNK]
                    if record.status.is_active and caller.may_see(record)
                )
                await asyncio.sleep(0)
            cancelled: list[int] = []
            started: list[JobRecord] = []
            gathered: list[Operation] = []
            writing: asyncio.Task[None] | None = None
            for start in range(0, len(records), CANCEL_CHUNK):
                chunk = records[start : start + CANCEL_CHUNK]
                gathered += self._cancel_queued(chunk, caller.user)
                for record in chunk:
                    if record.status is JobStatus.CANCEL:
                        cancelled.append(record.id)
                    elif record.status.is_active:
                        started.append(record)
                if writing is None or writing.done() or len(gathered) >= WRITE_BATCH:
                    if writing is not None:
                        await writing  # raises what the write raised
                    writing = asyncio.create_task(self.store.write(gathered))
                    gathered = []
                await asyncio.sleep(0)
            if writing is not None:
                await writing
            await self.store.write(gathered)
        await asyncio.gather(*(self._stop(record, caller.user) for record in started))
        cancelled += (record.id for record in started if record.status is JobStatus.CANCEL)
        cancelled.sort()
        return cancelled

    async def _cancel(self, record: JobRecord, by: str) -> None:
        changes = self._cancel_queued([record], by)
        if changes:
            await self.store.write(changes)
        else:
            await self._stop(record, by)

    def _cancel_queued(self, records: Iterable[JobRecord], by: str) -> list[Operation]:
        """Cancels the jobs among `records` that wait in the queue; returns the changes to write."""
        changes: list[Operation] = []
        extra = f"cancelled by {by} before it started"
        now = utc_now()
        # Only what changed: a cancel-all writes 50,000 of these.
        fields = {
            "status": JobStatus.CANCEL.value,
            "extra": extra,
            "finished_at": rfc3339(now),
            "pid": None,
            "pid_start": None,
        }
        for record in records:
            key = self._key(record)
            if record.status is JobStatus.PENDING and self.scheduler.dequeue(key):
                record.move_to(JobStatus.CANCEL, extra, now)
                changes.append(Update(key[0], str(record.id), fields))
        for kind, count in Counter(change.collection for change in changes).items():
            self.metrics.jobs_cancelled(kind, count)
        return changes

    async def _stop(self, record: JobRecord, by: str) -> None:
        """Interrupts a started job and returns once restic is gone and the record written."""
        key = self._key(record)
        task = self.scheduler.task_of(key)
        if task is None:
            return
        self._stops[key] = _Stop("cancel", by)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if record.status is JobStatus.PENDING:  # cancelled before its task began to run
            self._stops.pop(key, None)
            record.move_to(JobStatus.CANCEL)
            record.extra = f"cancelled by {by} before it started"
            await self.store.write([_record_ops(record)])
            self._finished(key[0], record)

    async def delete_backup(self, caller: Caller, backup_id: int) -> str | None:
        """Drops a finished backup's record now and queues its snapshot's forget durably.

        Returns the snapshot id to be forgotten (None if the backup made none). Raises
        UnknownJob, or JobConflict while it is pending or running.
        """
        record = self.backups.get(backup_id)
        if record is None or not caller.may_see(record):
            raise UnknownJob(f"no such record [ {backup_id} ]")
        if record.status.is_active:
            raise JobConflict(f"backup {backup_id} is {record.status}: cancel it first")
        operations: list[Operation] = [Delete("backup", str(backup_id))]
        forget: ForgetRecord | None = None
        if record.snapshot_id is not None:
            forget = ForgetRecord(
                snapshot_id=record.snapshot_id,
                backup_id=backup_id,
                user=record.user,
                queued_at=utc_now(),
            )
            operations.append(self.upkeep.forget_op(forget))
        await self.store.write(operations)
        if self.backups.get(backup_id) is record:
            del self.backups[backup_id]
        self._progress.pop(("backup", backup_id), None)
        if forget is not None:
            self.upkeep.queue(forget)
        log.info(
            "backup %d: deleted by %s%s",
            backup_id,
            caller.user,
            "; forget of its snapshot queued" if forget else "",
        )
        self.scheduler.wake()
        return forget.snapshot_id if forget else None

    # -- destroy ----------------------------------------------------------------------

    @property
    def destroyed(self) -> bool:
        return self._destroyed

    async def destroy_repository(self, caller: Caller) -> dict[str, Any]:
        """Cancels every job, removes the repository's data, drops every backup record.

        Returns what was done; raises ResticError when a remote repository could not be emptied.
        """
        self._refuse_while_destroying()
        self._destroying = True
        try:
            for kind in (JobKind.BACKUP, JobKind.RESTORE):
                await self.cancel_all(Caller(caller.user, admin=True), kind)
            report: maintenance.DestroyReport | None = None

            async def work() -> None:
                nonlocal report
                report = await maintenance.destroy(
                    self.restic,
                    self.options.local_repository,
                    self.options.lock_wait_seconds,
                    lambda phase: log.info("destroy: %s", phase),
                )

            await self.scheduler.exclusive(ExclusiveWork("destroy", work))
            assert report is not None
            dropped = len(self.backups)
            operations: list[Operation] = [Delete("backup", str(key)) for key in self.backups]
            operations += self.upkeep.clear()
            self.backups.clear()
            self._destroyed = True
            self._repository_ready = False
            operations.append(self._repository_op())
            await self.store.write(operations)
            log.warning(
                "repository destroyed by %s: %s; %d backup records dropped",
                caller.user,
                report.method,
                dropped,
            )
            return {
                "destroyed": True,
                "method": report.method,
                "snapshots_removed": report.snapshots_removed,
                "backup_records_dropped": dropped,
            }
        finally:
            self._destroying = False

    def _repository_op(self) -> Put:
        return Put("meta", REPOSITORY_KEY, {"destroyed": self._destroyed})

    async def _ensure_repository(self) -> None:
        async with self._repository_lock:
            if self._repository_ready:
                return
            created = await retry_transient(
                self.restic.ensure_initialised, self.options.lock_wait_seconds, "init"
            )
            self._repository_ready = True
            if created or self._destroyed:
                self._destroyed = False
                await self.store.write([self._repository_op()])

    # -- running jobs -----------------------------------------------------------------

    def health(self) -> Health:
        return Health(
            pending=self.scheduler.queued_count,
            running=self.scheduler.running_count,
            maintenance=self.scheduler.exclusive_name,
        )

    async def _run_job(self, key: JobKey) -> None:
        kind, job_id = key
        record: BackupRecord | RestoreRecord | None = (
            self.backups.get(job_id) if kind == "backup" else self.restores.get(job_id)
        )
        if record is None or record.status is not JobStatus.PENDING:
            return
        record.move_to(JobStatus.RUNNING)
        record.attempts += 1
        record.extra = ""
        record.total_size = record.pack_size = record.file_count = 0
        self._progress[key] = Progress()
        started = time.monotonic()
        try:
            await self.store.write([_record_ops(record)])
            log.info("%s %d: started (attempt %d)", kind, job_id, record.attempts)
            if isinstance(record, BackupRecord):
                result = await self._back_up(key, record)
            else:
                result = await self._restore(key, record)
        except asyncio.CancelledError:
            await asyncio.shield(self._interrupted(key, record))
            return
        except (ResticError, OSError, Refused, ValueError) as error:
            message = error.message if isinstance(error, ResticError) else str(error)
            if isinstance(error, ResticError) and error.exit_code not in (None, EXIT_REFUSED):
                # restic may have left its lock (it failed writing); before the job says failed.
                await asyncio.shield(self.restic.remove_stale_locks())
            await asyncio.shield(self._end(key, record, JobStatus.FAILED, message))
            return
        finally:
            self.metrics.observe_duration(kind, time.monotonic() - started)
        record.total_size, record.pack_size = result.total_size, result.pack_size
        record.file_count = result.file_count
        if isinstance(record, BackupRecord):
            record.snapshot_id = result.snapshot_id
        await asyncio.shield(self._end(key, record, JobStatus.SUCCESS, result.extra))

    def _progress_handlers(
        self, key: JobKey, record: JobRecord
    ) -> tuple[Callable[[Progress], None], Callable[[int], Awaitable[None]]]:
        """Returns the callbacks that follow restic's progress and record its pid."""

        def on_progress(progress: Progress) -> None:
            self._progress[key] = progress
            record.total_size = progress.bytes_done

        async def on_start(pid: int) -> None:
            record.pid = pid
            record.pid_start = runner.process_start_ticks(pid)
            await self.store.write([_record_ops(record)])

        return on_progress, on_start

    async def _back_up(self, key: JobKey, record: BackupRecord) -> JobResult:
        await self._ensure_repository()
        on_progress, on_start = self._progress_handlers(key, record)
        users_root = await asyncio.to_thread(os.path.realpath, self.options.data_root / "users")
        source = Source(users_root, record.user, record.path, self.options.confine_backups)
        outcome = await retry_transient(
            lambda: run_backup(self.restic, record.id, source, on_progress, on_start),
            self.options.lock_wait_seconds,
            f"backup {record.id}",
        )
        return JobResult(
            outcome.total_size,
            outcome.pack_size,
            outcome.file_count,
            outcome.extra,
            outcome.snapshot_id,
        )

    async def _restore(self, key: JobKey, record: RestoreRecord) -> JobResult:
        target = Path(record.dst_path)
        home = self.options.data_root / "users" / record.user
        await asyncio.to_thread(make_folder, target, home)
        on_progress, on_start = self._progress_handlers(key, record)
        running = [
            other.id for other in self.restores.values() if other.status is JobStatus.RUNNING
        ]

        async def restore_into(staging: Path) -> RestoreResult:
            return await retry_transient(
                lambda: run_restore(
                    self.restic, record.snapshot_id, staging, on_progress, on_start
                ),
                self.options.lock_wait_seconds,
                f"restore {record.id}",
            )

        # restic (as root) never writes into the user's folder itself: it restores into a
        # private staging folder, whose tree is then moved into dst without following
        # symlinks (fa_restic.jobs.staging explains why, for every restic version).
        restored = await staged_restore(
            self.options.data_root, record.id, home, target, restore_into, active=running
        )
        return JobResult(restored.bytes_restored, 0, restored.files_restored, "")

    async def _interrupted(self, key: JobKey, record: JobRecord) -> None:
        stop = self._stops.pop(key, _Stop("shutdown"))
        if isinstance(record, BackupRecord):
            record.unsettled = True  # restic may have saved the snapshot as the signal came
        if stop.reason == "shutdown":
            record.move_to(JobStatus.PENDING)
            record.attempts -= 1  # the service stopped, not the job: this try does not count
            record.extra = "interrupted by a stop of the service; runs again after the restart"
            self._progress.pop(key, None)
            await self.store.write([_record_ops(record)])
            log.info("%s %d: interrupted by shutdown, will run again", *key)
            return
        extra = f"cancelled by {stop.by}"
        if isinstance(record, RestoreRecord):
            extra += f"; partially restored files may remain in {record.dst_path}"
        await self._end(key, record, JobStatus.CANCEL, extra, [self.upkeep.want_prune()])

    async def _end(
        self,
        key: JobKey,
        record: JobRecord,
        status: JobStatus,
        extra: str,
        more: Iterable[Operation] = (),
    ) -> None:
        record.move_to(status)
        record.extra = extra
        self._progress.pop(key, None)
        await self.store.write([_record_ops(record), *more])
        self._finished(key[0], record)
        seconds = (
            (record.finished_at - record.started_at).total_seconds()
            if record.finished_at and record.started_at
            else 0.0
        )
        log.info(
            "%s %d: %s for %s after %.1fs (total_size=%d pack_size=%d)%s",
            key[0],
            record.id,
            status,
            record.user,
            seconds,
            record.total_size,
            record.pack_size,
            f": {extra}" if extra else "",
        )

    def _finished(self, kind: str, record: JobRecord) -> None:
        self.metrics.job_finished(kind, record)

    # -- maintenance ------------------------------------------------------------------

    def _pick_maintenance(self) -> ExclusiveWork | None:
        if self._stopping or self._destroying or self.upkeep.state.resting:
            return None
        if any(record.unsettled and record.status.is_terminal for record in self.backups.values()):
            return ExclusiveWork("settle", self._settle_all)
        return self.upkeep.pick()


def rfc3339(moment: datetime | None) -> str | None:
    """Returns an RFC 3339 UTC time with a Z, or None."""
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
