"""Job records and the one state machine they follow."""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field

from fa_restic.names import JobStatus, Overwrite

STATUS_TO_NEXT: dict[JobStatus, frozenset[JobStatus]] = {
    # pending -> success: at start-up, a snapshot that a crashed attempt made is adopted.
    JobStatus.PENDING: frozenset(
        {JobStatus.RUNNING, JobStatus.CANCEL, JobStatus.FAILED, JobStatus.SUCCESS}
    ),
    # running -> pending: interrupted by a stop of the service, to run again after it.
    JobStatus.RUNNING: frozenset(
        {JobStatus.SUCCESS, JobStatus.FAILED, JobStatus.CANCEL, JobStatus.PENDING}
    ),
    JobStatus.SUCCESS: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCEL: frozenset(),
}


class TransitionError(Exception):
    """A status change the state machine does not allow."""


def utc_now() -> datetime:
    return datetime.now(UTC)


def rfc3339(moment: datetime | None) -> str | None:
    """Returns an RFC 3339 UTC time with a Z, or None."""
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


class Progress(BaseModel):
    """Live progress of a running job; kept in memory, not in the state file."""

    model_config = ConfigDict(frozen=True)

    percent_done: float = 0.0
    bytes_done: int = 0
    total_bytes: int = 0
    files_done: int = 0
    total_files: int = 0
    seconds_remaining: int | None = None


class JobRecord(BaseModel):
    """What both kinds of job share; persisted as JSON."""

    model_config = ConfigDict(validate_assignment=False)

    id: int
    user: str
    status: JobStatus = JobStatus.PENDING
    total_size: int = 0
    pack_size: int = 0
    extra: str = ""
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    file_count: int = 0
    """Files processed (backup) or restored (restore), once successful."""
    attempts: int = 0
    sequence: int = 0
    """Queue order: pending jobs start in ascending sequence."""
    pid: int | None = None
    pid_start: int | None = None
    """restic's pid and start time while it runs, to end it if the service dies."""
    progress: Progress | None = Field(default=None, exclude=True)
    """In a cluster, the progress another node published for a job it runs; never stored
    with the record (excluded from its dump)."""

    def move_to(
        self, status: JobStatus, extra: str | None = None, now: datetime | None = None
    ) -> None:
        """Changes the status (and `extra`, if given) at `now` (default: this moment).

        Raises TransitionError if the state machine forbids it.
        """
        if status not in STATUS_TO_NEXT[self.status]:
            raise TransitionError(f"{self.status} -> {status}")
        changes: dict[str, object] = {"status": status}
        if status is JobStatus.RUNNING:
            changes["started_at"] = now or utc_now()
        if status.is_terminal:
            changes["finished_at"] = now or utc_now()
        if status is not JobStatus.RUNNING:
            changes["pid"] = changes["pid_start"] = None
        if extra is not None:
            changes["extra"] = extra
        # One dict update instead of pydantic's __setattr__ per field (~3 µs each): a
        # cancel-all moves 50,000 records at once. The values are of the fields' types.
        self.__dict__.update(changes)


class BackupRecord(JobRecord):
    path: str
    snapshot_id: str | None = None
    unsettled: bool = False
    """An attempt was cut short by a crash and may have left a snapshot: look before running."""
    exclude: list[str] = []
    """restic --exclude patterns, relative to what is backed up (SPEC §11)."""


class RestoreRecord(JobRecord):
    backup_id: int
    dst_path: str
    snapshot_id: str
    """The snapshot restored, copied from the backup so a later delete cannot change it."""
    include: list[str] = []
    """Entries to restore, relative to what was backed up; empty: everything (SPEC §11)."""
    overwrite: Overwrite = Overwrite.ALWAYS


class ForgetRecord(BaseModel):
    """A snapshot to forget in the repository, queued durably by a delete."""

    snapshot_id: str
    backup_id: int
    user: str
    queued_at: datetime
