# mypy: disable-error-code="comparison-overlap,unreachable"
# (a record's status changes across awaits, by the event loop: mypy's narrowing cannot know)
"""A job whose end is under way when a cancel, a stop or a destroy comes.

A failed job's end first runs `restic.remove_stale_locks()` (bounded at 10 s with the
real restic), then writes the record. A cancel, a stop or a destroy that comes meanwhile
waits for that end (`execution.to_the_end`): it must find the record final, never write
after it (or after the store closed). The fake holds remove_stale_locks so that the
window stays open as long as the test likes.
"""

from __future__ import annotations

import asyncio

import pytest

from fa_restic.jobs.errors import JobConflict
from fa_restic.jobs.intake import Caller
from fa_restic.jobs.models import JobRecord
from fa_restic.names import JobKind, JobStatus
from fa_restic.restic.errors import ErrorKind, ResticError
from tests.jobs.conftest import Harness, until
from tests.jobs.fake_restic import BackupScript, Gate

pytestmark = pytest.mark.timeout(5)

ALICE = Caller("alice")
ROOT = Caller("root", admin=True)
BUG = (
    "Execution.interrupt waits for the job's task, not for the shielded end "
    "(_failed: remove_stale_locks, then the final write) that the task leaves behind"
)


async def failing_in_cleanup(harness: Harness) -> tuple[JobRecord, Gate]:
    """Starts backup 1, which fails; returns while its restic locks are being removed."""
    error = ResticError(ErrorKind.FATAL, "Fatal: unable to save snapshot", exit_code=1)
    harness.restic.script_backup(1, BackupScript(error=error))
    unlocking = harness.restic.hold("remove_stale_locks")
    record = await harness.backup("alice", 1)
    await until(unlocking.entered.is_set, "the failed job removes its locks")
    assert record.status is JobStatus.RUNNING
    return record, unlocking


async def held_back(work: asyncio.Task[object], record: JobRecord) -> None:
    """Asserts that `work` waits while the failing job's end is held."""
    for _ in range(20):
        await asyncio.sleep(0)
    assert not work.done(), "it did not wait for the failing job's end"
    assert record.status is JobStatus.RUNNING


async def test_cancel_waits_for_a_failing_job_to_end_and_is_refused(harness: Harness) -> None:
    """restic already failed, so the cancel is refused once the job has ended failed (never
    cancel), its lock clean-up done and its record written."""
    record, unlocking = await failing_in_cleanup(harness)
    cancel = asyncio.create_task(harness.service.cancel(ALICE, JobKind.BACKUP, 1))
    await held_back(cancel, record)
    unlocking.release()
    with pytest.raises(JobConflict, match=r"ended \(failed\) before it could be cancelled"):
        await cancel
    assert record.status is JobStatus.FAILED
    assert harness.store.statuses("backup", 1) == ["pending", "running", "failed"]


async def test_stop_writes_the_end_of_a_failing_job_before_closing_the_store(
    harness: Harness,
) -> None:
    record, unlocking = await failing_in_cleanup(harness)
    stop = asyncio.create_task(harness.stop())
    await held_back(stop, record)
    unlocking.release()
    await stop
    stored = await harness.stored("backup", 1)
    assert stored is not None and stored["status"] == "failed", stored


async def test_destroy_drops_a_failing_jobs_record_for_good(harness: Harness) -> None:
    record, unlocking = await failing_in_cleanup(harness)
    destroy = asyncio.create_task(harness.service.destroy_repository(ROOT))
    await held_back(destroy, record)
    unlocking.release()
    await destroy
    for _ in range(20):
        await asyncio.sleep(0)
    assert harness.service.backups == {}
    assert await harness.stored("backup", 1) is None
