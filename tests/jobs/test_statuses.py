# mypy: disable-error-code="comparison-overlap,unreachable"
# (a record's status changes across awaits, by the event loop: mypy's narrowing cannot know)
"""A job's statuses: pending -> running -> success/failed, what each records, and that a
terminal status never changes again (SPEC §5 Jobs, §7, §9 "no lock left by a failed job")."""

from __future__ import annotations

import pytest

from fa_restic.jobs.errors import JobConflict
from fa_restic.jobs.intake import Caller
from fa_restic.jobs.models import Progress, TransitionError
from fa_restic.jobs.ports import ResticRunner
from fa_restic.metrics import Metrics
from fa_restic.names import JobKind, JobStatus
from fa_restic.restic.errors import ErrorKind, ResticError
from fa_restic.restic.messages import BackupStatus
from tests.jobs.conftest import Harness, until
from tests.jobs.fake_restic import FAKE_PID, BackupScript, FakeRestic

pytestmark = pytest.mark.timeout(5)

_: ResticRunner = FakeRestic()  # mypy: the fake is a ResticRunner

ALICE = Caller("alice")


def finished(metrics: Metrics, kind: str, status: str) -> float:
    value = metrics.registry.get_sample_value(
        "fa_restic_jobs_finished_total", {"kind": kind, "status": status}
    )
    return value or 0.0


async def test_backup_goes_pending_running_success(harness: Harness) -> None:
    restic, service = harness.restic, harness.service
    gate = restic.hold("backup:1")
    record = await harness.backup("alice", 1)
    # Answered: the record is durable, pending (in a cluster a node may have claimed it
    # already: restic is held, so it is no further than running).
    stored = await harness.stored("backup", 1)
    assert stored is not None and stored["status"] in {"pending", "running"}
    assert record.status in {JobStatus.PENDING, JobStatus.RUNNING}

    await until(gate.entered.is_set, "restic runs")
    assert record.status is JobStatus.RUNNING
    assert record.attempts == 1 and record.started_at is not None
    assert record.pid == FAKE_PID, "on_start recorded restic's pid"
    stored = await harness.stored("backup", 1)
    assert stored is not None
    assert stored["status"] == "running" and stored["pid"] == FAKE_PID
    call = restic.calls_of("backup")[0]
    cwd, paths, tags, confinement = call.args
    assert (cwd, paths, confinement) == (harness.path("alice"), (".",), None)
    assert tags == ("fa:id=1", "fa:user=alice")

    gate.release()
    await harness.ended(record)
    assert record.status is JobStatus.SUCCESS
    assert (record.total_size, record.pack_size, record.file_count) == (1000, 400, 3)
    assert record.extra == "" and record.pid is None and record.finished_at is not None
    assert record.snapshot_id is not None and len(record.snapshot_id) == 64
    assert restic.snapshots_by_id[record.snapshot_id].tags == ["fa:id=1", "fa:user=alice"]
    assert harness.store.statuses("backup", 1) == ["pending", "running", "success"]
    stored = await harness.stored("backup", 1)
    assert stored is not None
    assert stored["snapshot_id"] == record.snapshot_id and stored["total_size"] == 1000
    assert service.progress(JobKind.BACKUP, record).percent_done == 1.0
    assert finished(service.metrics, "backup", "success") == 1.0


async def test_progress_is_live_while_running(harness: Harness) -> None:
    status = BackupStatus(
        percent_done=0.5,
        total_files=4,
        files_done=2,
        total_bytes=800,
        bytes_done=400,
        seconds_remaining=7,
    )
    harness.restic.script_backup(1, BackupScript(statuses=[status]))
    gate = harness.restic.hold("backup:1")
    record = await harness.backup("alice", 1)
    await until(gate.entered.is_set)
    assert harness.service.progress(JobKind.BACKUP, record) == Progress(
        percent_done=0.5,
        bytes_done=400,
        total_bytes=800,
        files_done=2,
        total_files=4,
        seconds_remaining=7,
    )
    assert record.total_size == 400, "total_size is the bytes so far while running"
    gate.release()
    await harness.ended(record)
    assert record.total_size == 1000


async def test_incomplete_backup_is_success_with_extra(harness: Harness) -> None:
    harness.restic.script_backup(1, BackupScript(unreadable=("/x: permission denied",)))
    record = await harness.ended(await harness.backup("alice", 1))
    assert record.status is JobStatus.SUCCESS
    assert record.extra == "incomplete: 1 item could not be read: /x: permission denied"


async def test_restic_failure_ends_failed_with_its_message(harness: Harness) -> None:
    message = "Fatal: unable to save snapshot: no space left on device"
    error = ResticError(ErrorKind.NO_SPACE, message, exit_code=1)
    harness.restic.script_backup(1, BackupScript(error=error))
    record = await harness.ended(await harness.backup("alice", 1))
    assert record.status is JobStatus.FAILED
    assert record.extra == message
    assert record.snapshot_id is None and record.finished_at is not None
    assert harness.store.statuses("backup", 1) == ["pending", "running", "failed"]
    stored = await harness.stored("backup", 1)
    assert stored is not None and stored["extra"] == message
    assert finished(harness.service.metrics, "backup", "failed") == 1.0


async def test_failed_job_removes_stale_locks_before_it_says_failed(harness: Harness) -> None:
    error = ResticError(ErrorKind.FATAL, "Fatal: unable to create lock", exit_code=1)
    harness.restic.script_backup(1, BackupScript(error=error))
    unlocking = harness.restic.hold("remove_stale_locks")
    record = await harness.backup("alice", 1)
    await until(unlocking.entered.is_set, "remove_stale_locks called")
    # The locks are being removed: the job does not say failed yet, nor does the store.
    assert record.status is JobStatus.RUNNING
    stored = await harness.stored("backup", 1)
    assert stored is not None and stored["status"] == "running"
    unlocking.release()
    await harness.ended(record)
    assert record.status is JobStatus.FAILED
    names = harness.restic.names()
    assert names.index("backup") < names.index("remove_stale_locks")


async def test_failure_before_restic_ran_needs_no_unlock(harness: Harness) -> None:
    # restic could not be started (exit_code None): no lock of its own can exist.
    error = ResticError(ErrorKind.BINARY, "cannot run restic: No such file or directory")
    harness.restic.script_backup(1, BackupScript(error=error, pid=None))
    record = await harness.ended(await harness.backup("alice", 1))
    assert record.status is JobStatus.FAILED and record.extra == error.message
    assert "remove_stale_locks" not in harness.restic.names()


async def test_path_gone_before_start_fails_without_restic(harness: Harness) -> None:
    home = harness.path("alice").parent
    record = await harness.service.submit_backup(ALICE, 1, home / "missing")
    await harness.ended(record)
    assert record.status is JobStatus.FAILED
    assert record.extra.startswith("path no longer exists")
    assert harness.restic.backed_up() == []


async def test_terminal_status_never_changes(harness: Harness) -> None:
    service = harness.service
    ok = await harness.ended(await harness.backup("alice", 1))
    error = ResticError(ErrorKind.FATAL, "Fatal: broken", exit_code=1)
    harness.restic.script_backup(2, BackupScript(error=error))
    bad = await harness.ended(await harness.backup("alice", 2))
    assert (ok.status, bad.status) == (JobStatus.SUCCESS, JobStatus.FAILED)
    snapshot_id, finished_at = ok.snapshot_id, ok.finished_at

    for record in (ok, bad):
        for status in JobStatus:
            with pytest.raises(TransitionError):
                record.move_to(status)
    with pytest.raises(JobConflict, match="already ended"):
        await service.cancel(ALICE, JobKind.BACKUP, 1)
    with pytest.raises(JobConflict, match="in use"):
        await harness.backup("alice", 1)
    assert ok.status is JobStatus.SUCCESS and ok.snapshot_id == snapshot_id
    assert ok.finished_at == finished_at

    # A failed id may be used again: a new record starts afresh, the old one stays failed.
    again = await harness.ended(await harness.backup("alice", 2))
    assert again is not bad and again.status is JobStatus.SUCCESS
    assert bad.status is JobStatus.FAILED and bad.extra == "Fatal: broken"
    assert again.attempts == 1 and again.extra == ""
    assert harness.store.statuses("backup", 2) == [
        "pending",
        "running",
        "failed",
        "pending",
        "running",
        "success",
    ]

    # Stopping the service leaves finished jobs as they are.
    await harness.stop()
    stored = await harness.stored("backup", 1)
    assert stored is not None and stored["status"] == "success"


async def test_another_users_id_is_in_use_and_invisible(harness: Harness) -> None:
    await harness.ended(await harness.backup("alice", 1))
    with pytest.raises(JobConflict, match="in use"):
        await harness.backup("bob", 1)
    with pytest.raises(Exception, match="no such record"):
        await harness.service.get_backup(Caller("bob"), 1)
    assert (await harness.service.get_backup(Caller("root", admin=True), 1)).user == "alice"
