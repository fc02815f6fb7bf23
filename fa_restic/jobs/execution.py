"""Running one job: its restic, its progress, why it stopped, and the record at its end."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fa_restic.jobs.backup import Source, run_backup
from fa_restic.jobs.direct import (
    MAX_TREE_NODES,
    Destination,
    TooManyNodes,
    restore_directly,
    staging_reason,
)
from fa_restic.jobs.models import BackupRecord, JobRecord, Progress, RestoreRecord
from fa_restic.jobs.ports import ResticRunner
from fa_restic.jobs.records import JobKey, Records, key_of
from fa_restic.jobs.restore import make_folder, run_restore
from fa_restic.jobs.retry import retry_transient
from fa_restic.jobs.staging import staged_restore
from fa_restic.metrics import Metrics
from fa_restic.names import JobKind, JobStatus, home_of, users_root
from fa_restic.restic import runner
from fa_restic.restic.client import RestoreResult
from fa_restic.restic.errors import ResticError
from fa_restic.restic.sandbox import EXIT_REFUSED, Refused
from fa_restic.store import Operation

log = logging.getLogger("fa_restic.jobs")

StopReason = Literal["cancel", "shutdown"]

MAX_RUNNING_LISTED = 10_000
"""More restores than any cluster runs at once."""


@dataclass(frozen=True)
class Stop:
    """Why a running job's task was cancelled."""

    reason: StopReason
    by: str = ""


@dataclass(frozen=True)
class Settings:
    """What running a job needs of the service's options."""

    data_root: Path
    lock_wait_seconds: float
    confine_backups: bool
    restore_direct: bool | None = None
    """None: restores go straight into dst wherever that is safe (jobs.direct), else staged;
    False: always staged; True: straight into dst wherever restic can be confined (tests)."""
    direct_tree_nodes: int = MAX_TREE_NODES
    """The most snapshot nodes a direct restore into a dst that is not empty holds."""


@dataclass(frozen=True)
class JobResult:
    """What a finished backup or restore reports."""

    total_size: int
    pack_size: int
    file_count: int
    extra: str
    snapshot_id: str | None = None


async def to_the_end(ending: Coroutine[Any, Any, None]) -> None:
    """Runs a job's ending (its record written, its lock removed) to its end, even when the
    job's task is cancelled meanwhile: whoever cancelled it (a cancel, a stop, a destroy)
    waits for the task and must find the record final. The cancel is raised afterwards.
    """
    work = asyncio.ensure_future(ending)
    cancelled = False
    while not work.done():
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            cancelled = cancelled or not work.done()
    work.result()  # raises what the ending raised
    if cancelled:
        raise asyncio.CancelledError


class Execution:
    """Runs jobs for the scheduler (`run`), and knows their live progress and stops.

    `before_backup` makes sure the repository exists; `after_cancel` returns changes to
    write with a cancelled job (a prune is wanted for the data it left).
    """

    def __init__(
        self,
        records: Records,
        restic: ResticRunner,
        metrics: Metrics,
        settings: Settings,
        before_backup: Callable[[], Awaitable[None]],
        after_cancel: Callable[[], Operation],
        settle_claimed: Callable[[BackupRecord], Awaitable[bool]] | None = None,
    ) -> None:
        self.records = records
        self.restic = restic
        self.metrics = metrics
        self.settings = settings
        self.before_backup = before_backup
        self.after_cancel = after_cancel
        self.settle_claimed = settle_claimed
        self.progress: dict[JobKey, Progress] = {}
        self.stops: dict[JobKey, Stop] = {}
        self.after_stop = "runs again after the restart"
        """What a job interrupted by a stop of the service says of what comes next."""
        self.claimed: set[JobKey] = set()
        """Jobs a cluster's claim made running on this node, to be run as they are."""

    async def run(self, key: JobKey) -> None:
        """Runs a pending (or claimed) job to its end; a cancel of this task ends it as
        `stops` says."""
        claimed = key in self.claimed
        self.claimed.discard(key)
        record = await self.records.get(key)
        if record is None:
            return
        if claimed and record.status is JobStatus.RUNNING:
            pass  # the claim made it running and counted the attempt
        elif record.status is JobStatus.PENDING:
            record.move_to(JobStatus.RUNNING, extra="")
            record.attempts += 1
        else:
            return
        record.total_size = record.pack_size = record.file_count = 0
        self.progress[key] = Progress()
        started = time.monotonic()
        try:
            if claimed and await self._adopted(record):
                return
            await self.records.save(record)
            log.info("%s %d: started (attempt %d)", *key, record.attempts)
            if isinstance(record, BackupRecord):
                result = await self._back_up(key, record)
            else:
                result = await self._restore(key, record)
        except asyncio.CancelledError:
            await to_the_end(self._interrupted(key, record))
            return
        except (ResticError, OSError, Refused, ValueError) as error:
            await to_the_end(self._failed(key, record, error))
            return
        finally:
            self.metrics.observe_duration(key[0], time.monotonic() - started)
        record.total_size, record.pack_size = result.total_size, result.pack_size
        record.file_count = result.file_count
        if isinstance(record, BackupRecord):
            record.snapshot_id = result.snapshot_id
        await to_the_end(self.end(key, record, JobStatus.SUCCESS, result.extra))

    async def _adopted(self, record: JobRecord) -> bool:
        """Settles a claimed backup cut short on a node that died; returns True when the
        snapshot that attempt made was adopted (the job is `success` then)."""
        if not isinstance(record, BackupRecord) or not record.unsettled:
            return False
        if self.settle_claimed is None or not await self.settle_claimed(record):
            return False
        self.progress.pop(key_of(record), None)
        return True

    def progress_of(self, key: JobKey, record: JobRecord) -> Progress:
        """Returns live progress of a running job (in a cluster: as the node running it
        last published it), or what its status implies."""
        live = self.progress.get(key)
        if live is not None:
            return live
        if record.status is JobStatus.RUNNING and record.progress is not None:
            return record.progress
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

    async def interrupt(self, key: JobKey, task: asyncio.Task[None], stop: Stop) -> None:
        """Cancels a job's task and returns once it has ended (restic gone, record written)."""
        self.stops[key] = stop
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        self.stops.pop(key, None)  # a task cancelled before it began never looked

    def _handlers(
        self, key: JobKey, record: JobRecord
    ) -> tuple[Callable[[Progress], None], Callable[[int], Awaitable[None]]]:
        """Returns the callbacks that follow restic's progress and record its pid."""

        def on_progress(progress: Progress) -> None:
            self.progress[key] = progress
            record.total_size = progress.bytes_done

        async def on_start(pid: int) -> None:
            record.pid = pid
            record.pid_start = runner.process_start_ticks(pid)
            await self.records.save(record)

        return on_progress, on_start

    async def _back_up(self, key: JobKey, record: BackupRecord) -> JobResult:
        await self.before_backup()
        on_progress, on_start = self._handlers(key, record)
        root = await asyncio.to_thread(os.path.realpath, users_root(self.settings.data_root))
        source = Source(root, record.user, record.path, self.settings.confine_backups)
        outcome = await retry_transient(
            lambda: run_backup(
                self.restic, record.id, source, on_progress, on_start, record.exclude
            ),
            self.settings.lock_wait_seconds,
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
        home = home_of(self.settings.data_root, record.user)
        await asyncio.to_thread(make_folder, target, home)
        on_progress, on_start = self._handlers(key, record)
        staged_because = await self._staging_reason(record, home)
        if staged_because is None:
            try:
                return await self._restore_directly(record, on_progress, on_start)
            except TooManyNodes as error:
                staged_because = str(error)
        log.info("restore %d: staged (%s)", record.id, staged_because)
        # Restores running on any node (a cluster's share the data root): their staging
        # folders are not leftovers.
        elsewhere, _ = await self.records.page(
            JobKind.RESTORE, status=JobStatus.RUNNING, limit=MAX_RUNNING_LISTED
        )
        running = [other.id for other in self.records.restores.values()]
        running += [other.id for other in elsewhere]

        async def restore_into(staging: Path) -> RestoreResult:
            return await retry_transient(
                lambda: run_restore(
                    self.restic,
                    record.snapshot_id,
                    staging,
                    on_progress,
                    on_start,
                    include=record.include,
                ),
                self.settings.lock_wait_seconds,
                f"restore {record.id}",
            )

        # restic (as root) never writes into the user's folder itself: it restores into a
        # private staging folder, whose tree is then moved into dst without following
        # symlinks (fa_restic.jobs.staging explains why, for every restic version).
        restored = await staged_restore(
            self.settings.data_root,
            record.id,
            home,
            target,
            restore_into,
            active=running,
            overwrite=record.overwrite,
        )
        return JobResult(restored.bytes_restored, 0, restored.files_restored, "")

    async def _staging_reason(self, record: RestoreRecord, home: Path) -> str | None:
        """Returns None when the restore goes straight into dst, else why it is staged."""
        if self.settings.restore_direct is False:
            return "direct restores are turned off"
        confined = self.settings.confine_backups
        if self.settings.restore_direct and confined:
            return None
        return await asyncio.to_thread(
            staging_reason, self.restic, confined=confined, overwrite=record.overwrite, home=home
        )

    async def _restore_directly(
        self,
        record: RestoreRecord,
        on_progress: Callable[[Progress], None],
        on_start: Callable[[int], Awaitable[None]],
    ) -> JobResult:
        """Restores with restic writing into dst itself (fa_restic.jobs.direct)."""
        log.info("restore %d: direct into %r", record.id, record.dst_path)
        root = await asyncio.to_thread(os.path.realpath, users_root(self.settings.data_root))
        into = Destination(Path(root), record.user, Path(record.dst_path))
        restored = await retry_transient(
            lambda: restore_directly(
                self.restic,
                record.snapshot_id,
                into,
                on_progress,
                on_start,
                include=record.include,
                overwrite=record.overwrite,
                max_nodes=self.settings.direct_tree_nodes,
            ),
            self.settings.lock_wait_seconds,
            f"restore {record.id}",
        )
        return JobResult(restored.bytes_restored, 0, restored.files_restored, "")

    async def _failed(self, key: JobKey, record: JobRecord, error: Exception) -> None:
        message = error.message if isinstance(error, ResticError) else str(error)
        if isinstance(error, ResticError) and error.exit_code not in (None, EXIT_REFUSED):
            # restic may have left its lock (it failed writing): removed before the job
            # says failed, so that a failed job never leaves a lock of its own.
            await self.restic.remove_stale_locks()
        await self.end(key, record, JobStatus.FAILED, message)

    async def _interrupted(self, key: JobKey, record: JobRecord) -> None:
        stop = self.stops.pop(key, Stop("shutdown"))
        if isinstance(record, BackupRecord):
            record.unsettled = True  # restic may have saved the snapshot as the signal came
        if stop.reason == "shutdown":
            # The service stopped, not the job: this try does not count.
            record.move_to(
                JobStatus.PENDING,
                extra=f"interrupted by a stop of the service; {self.after_stop}",
            )
            record.attempts -= 1
            self.progress.pop(key, None)
            await self.records.save(record)
            log.info("%s %d: interrupted by shutdown, will run again", *key)
            return
        extra = f"cancelled by {stop.by}"
        if isinstance(record, RestoreRecord):
            extra += f"; partially restored files may remain in {record.dst_path}"
        await self.end(key, record, JobStatus.CANCEL, extra, [self.after_cancel()])

    async def end(
        self,
        key: JobKey,
        record: JobRecord,
        status: JobStatus,
        extra: str,
        more: Iterable[Operation] = (),
    ) -> None:
        """Ends a job with `status`, writes it, counts it and logs one line."""
        record.move_to(status, extra=extra)
        self.progress.pop(key, None)
        await self.records.save(record, *more)
        self.metrics.job_finished(key[0], record)
        seconds = (
            (record.finished_at - record.started_at).total_seconds()
            if record.finished_at and record.started_at
            else 0.0
        )
        log.info(
            "%s %d: %s for %s after %.1fs (total_size=%d pack_size=%d)%s",
            *key,
            status,
            record.user,
            seconds,
            record.total_size,
            record.pack_size,
            f": {extra}" if extra else "",
        )
