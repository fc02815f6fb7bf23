# mypy: disable-error-code="comparison-overlap,unreachable"
# (a record's status changes across awaits, by the event loop: mypy's narrowing cannot know)
"""A stop of the service, and a start after a predecessor died: scrub and settling
(SPEC §7 "Killed at any moment ... Restarted", "SIGTERM"). The records are read again by a
fresh JobService on a new store on the same records (a state file, a database), as after a
restart."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from fa_restic.jobs.errors import JobConflict
from fa_restic.jobs.intake import Caller
from fa_restic.jobs.models import BackupRecord, utc_now
from fa_restic.jobs.records import put
from fa_restic.names import JobStatus
from tests.jobs.conftest import ServiceMaker, step_until, until
from tests.jobs.fake_restic import FAKE_PID, FakeRestic
from tests.jobs.stores import Backing

pytestmark = pytest.mark.timeout(5)


async def stored_backup(backing: Backing, backup_id: int) -> dict[str, Any]:
    """Returns the backup as the next start would read it (the service must be stopped)."""
    value = await backing.read("backup", backup_id)
    assert value is not None, f"backup {backup_id} is not in the store"
    return value


async def left_running(backing: Backing, *records: BackupRecord) -> None:
    """Writes the records a predecessor left, as it last wrote them."""
    store = backing.new()
    await store.start()
    await store.write([put(record) for record in records])
    await store.stop()


def was_running(harness_path: Path, backup_id: int, user: str, attempts: int) -> BackupRecord:
    started = utc_now() - timedelta(minutes=5)
    return BackupRecord(
        id=backup_id,
        user=user,
        path=str(harness_path),
        status=JobStatus.RUNNING,
        created_at=started,
        started_at=started,
        attempts=attempts,
        sequence=backup_id,
        pid=FAKE_PID,
        pid_start=12345,  # no such process: nothing is killed
    )


async def test_stop_sends_a_running_job_back_to_pending(
    make_service: ServiceMaker, backing: Backing
) -> None:
    restic = FakeRestic()
    harness = await make_service(restic=restic, max_running=1)
    gate = restic.hold("backup:1")
    running = await harness.backup("alice", 1)
    waiting = await harness.backup("alice", 2)
    await until(gate.entered.is_set)

    await harness.stop()
    assert gate.interrupted, "restic was interrupted"
    assert running.status is JobStatus.PENDING
    assert running.attempts == 0, "an attempt cut short by a stop does not count"
    assert running.unsettled and running.pid is None
    assert running.extra.startswith("interrupted by a stop of the service")
    assert waiting.status is JobStatus.PENDING and waiting.attempts == 0
    with pytest.raises(JobConflict, match="stopping"):
        await harness.backup("alice", 3)

    saved = await stored_backup(backing, 1)
    assert (saved["status"], saved["attempts"], saved["unsettled"]) == ("pending", 0, True)
    assert (await stored_backup(backing, 2))["status"] == "pending"

    # After the restart both run: the interrupted one first, as its first attempt.
    again = await make_service(restic=restic, max_running=1)
    first, second = await again.backup_record(1), await again.backup_record(2)
    await again.ended(first)
    await again.ended(second)
    assert (first.status, second.status) == (JobStatus.SUCCESS, JobStatus.SUCCESS)
    assert first.attempts == 1 and not first.unsettled
    assert restic.backed_up() == [1, 1, 2]
    looked = [call.args for call in restic.calls_of("snapshots")]
    assert (("fa:id=1", "fa:user=alice"), ()) in looked, "settled before it ran again"


async def test_scrub_at_start(
    make_service: ServiceMaker, backing: Backing, data_root: Path
) -> None:
    """A job left running runs again while it has attempts left; else it fails."""
    folder = data_root / "users" / "alice" / "docs"
    folder.mkdir(parents=True)
    await left_running(
        backing, was_running(folder, 1, "alice", attempts=1), was_running(folder, 2, "alice", 2)
    )
    restic = FakeRestic()
    unlock = restic.hold("unlock")  # the start-up work waits: look before anything runs
    harness = await make_service(restic=restic, wait_for_startup=False, max_attempts=2)
    again, exhausted = await harness.backup_record(1), await harness.backup_record(2)
    assert again.status is JobStatus.PENDING
    assert again.extra == "interrupted (attempt 1 of 2); runs again"
    assert again.unsettled and again.pid is None and again.pid_start is None
    assert exhausted.status is JobStatus.FAILED
    assert exhausted.extra == (
        "interrupted: the service stopped during attempt 2 of 2; not tried again"
    )
    assert harness.service.health().pending == 1
    await until(unlock.entered.is_set, "start-up unlock")
    assert restic.backed_up() == [], "nothing runs before the start-up work"

    unlock.release()
    await harness.ended(again)
    assert again.status is JobStatus.SUCCESS and again.attempts == 2
    assert exhausted.status is JobStatus.FAILED
    assert restic.backed_up() == [1]

    await harness.stop()
    saved = await stored_backup(backing, 1)
    assert (saved["status"], saved["attempts"]) == ("success", 2)
    assert (await stored_backup(backing, 2))["status"] == "failed"


async def test_settling_adopts_the_snapshot_of_an_attempt_cut_short(
    make_service: ServiceMaker, backing: Backing, data_root: Path
) -> None:
    folder = data_root / "users" / "alice" / "docs"
    folder.mkdir(parents=True)
    await left_running(
        backing,
        was_running(folder, 1, "alice", attempts=1),
        was_running(folder, 2, "alice", attempts=2),
    )
    restic = FakeRestic()
    # The dead predecessor's restic saved snapshots just before it died: for job 1 two
    # (a retry inside the attempt), for job 2 one; bob has a job 1 of his own elsewhere.
    older = restic.add_snapshot(1, "alice", minutes=1)
    newest = restic.add_snapshot(1, "alice", minutes=2, total_bytes=5000, added_packed=2000)
    of_failed = restic.add_snapshot(2, "alice", minutes=3)
    bobs = restic.add_snapshot(1, "bob", minutes=4)

    harness = await make_service(restic=restic, max_attempts=2)
    adopted, failed = await harness.backup_record(1), await harness.backup_record(2)
    assert adopted.status is JobStatus.SUCCESS, "adopted at start, not run again"
    assert adopted.snapshot_id == newest.id
    assert (adopted.total_size, adopted.pack_size) == (5000, 2000)
    assert adopted.extra == "" and not adopted.unsettled
    assert failed.status is JobStatus.FAILED and not failed.unsettled

    # The other snapshots of the cut attempts are forgotten by maintenance; bob's stays.
    await until(lambda: not harness.service.forgets, "forget queue empty")
    # (Between the forget and the prune the scheduler may look idle for a moment.)
    await until(lambda: "prune" in restic.names(), "prune ran")
    await harness.idle()
    assert restic.backed_up() == []
    assert set(restic.forgotten()) == {older.id, of_failed.id}
    assert set(restic.snapshots_by_id) == {newest.id, bobs.id}
    alice = Caller("alice")
    assert (await harness.service.get_backup(alice, 1)).snapshot_id == newest.id

    await harness.stop()
    saved = await stored_backup(backing, 1)
    assert (saved["status"], saved["snapshot_id"]) == ("success", newest.id)
    assert saved["unsettled"] is False
    for snapshot in (older, of_failed):
        assert await backing.read("forget", snapshot.id) is None, "the forget queue is empty"


async def test_stop_as_the_scheduler_takes_a_job(make_service: ServiceMaker) -> None:
    """The job left the queue and has a task that has not taken a step: a stop then
    leaves it pending, with no attempt counted, and restic never runs."""
    harness = await make_service(max_running=1)
    service = harness.service
    key = ("backup", 1)
    record = await harness.backup("alice", 1)
    await step_until(lambda: service.scheduler.task_of(key) is not None, "taken")
    assert record.status is JobStatus.PENDING
    await harness.stop()
    assert record.status is JobStatus.PENDING and record.attempts == 0
    assert service.scheduler.running_count == 0
    for _ in range(20):
        await asyncio.sleep(0)
    assert harness.restic.backed_up() == []
    stored = await harness.stored("backup", 1)
    assert stored is not None
    assert (stored["status"], stored["attempts"]) == ("pending", 0)


async def test_snapshot_saved_as_the_stop_came_is_adopted_after_restart(
    make_service: ServiceMaker,
) -> None:
    restic = FakeRestic()
    harness = await make_service(restic=restic)
    gate = restic.hold("backup:1")
    record = await harness.backup("alice", 1)
    await until(gate.entered.is_set)
    # restic saved the snapshot just as SIGINT came: the job cannot know it did.
    saved = restic.add_snapshot(1, "alice", minutes=9, total_bytes=777, added_packed=77)
    await harness.stop()
    assert record.status is JobStatus.PENDING and record.unsettled

    again = await make_service(restic=restic)
    adopted = await again.backup_record(1)
    assert adopted.status is JobStatus.SUCCESS and adopted.snapshot_id == saved.id
    assert (adopted.total_size, adopted.pack_size) == (777, 77)
    await again.idle()
    assert restic.backed_up() == [1], "not run a second time"
    assert set(restic.snapshots_by_id) == {saved.id}
