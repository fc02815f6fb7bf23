# mypy: disable-error-code="comparison-overlap,unreachable"
# (a record's status changes across awaits, by the event loop: mypy's narrowing cannot know)
"""Cancel races: a pending job, a running one, one at the moment it starts, one that just
succeeded, cancel-all, and a cancel said twice (SPEC §5 cancel, cancel-all)."""

from __future__ import annotations

import asyncio

import pytest

from fa_restic.jobs.errors import JobConflict, UnknownJob
from fa_restic.jobs.intake import Caller
from fa_restic.jobs.models import BackupRecord
from fa_restic.names import JobKind, JobStatus
from fa_restic.store import Put, Update
from tests.jobs.conftest import Harness, ServiceMaker, step_until, until
from tests.jobs.fake_restic import Gate
from tests.jobs.test_statuses import finished

pytestmark = pytest.mark.timeout(5)

ALICE = Caller("alice")
ROOT = Caller("root", admin=True)


async def running_job(harness: Harness, user: str, job_id: int) -> tuple[BackupRecord, Gate]:
    """Starts a backup whose restic runs until the test releases it."""
    gate = harness.restic.hold(f"backup:{job_id}")
    record = await harness.backup(user, job_id)
    await until(gate.entered.is_set, f"backup {job_id} runs")
    return record, gate


def cancel_batch(harness: Harness, job_id: int) -> list[Put | Update | object]:
    """Returns the store batch that wrote backup `job_id` as cancelled."""
    for batch in harness.store.batches:
        for operation in batch:
            if (
                isinstance(operation, (Put, Update))
                and operation.collection == "backup"
                and operation.key == str(job_id)
            ):
                fields = operation.value if isinstance(operation, Put) else operation.fields
                if fields.get("status") == "cancel":
                    return list(batch)
    raise AssertionError(f"backup {job_id} was never written as cancelled")


async def test_cancel_of_a_pending_job(make_service: ServiceMaker) -> None:
    harness = await make_service(max_running=1)
    _blocker, gate = await running_job(harness, "carol", 1)
    record = await harness.backup("alice", 2)
    assert record.status is JobStatus.PENDING

    cancelled = await harness.service.cancel(ALICE, JobKind.BACKUP, 2)
    assert cancelled is record and record.status is JobStatus.CANCEL
    assert record.extra == "cancelled by alice before it started"
    assert record.finished_at is not None and record.started_at is None
    assert harness.store.statuses("backup", 2) == ["pending", "cancel"]
    assert harness.service.health().pending == 0
    assert finished(harness.service.metrics, "backup", "cancel") == 1.0

    gate.release()
    await harness.idle()
    assert harness.restic.backed_up() == [1], "a cancelled pending job never runs"


async def test_cancel_of_a_running_job_interrupts_restic(harness: Harness) -> None:
    record, gate = await running_job(harness, "alice", 1)
    key = (JobKind.BACKUP, 1)
    task = harness.service.scheduler.task_of(key)
    assert task is not None

    cancelled = await harness.service.cancel(ALICE, JobKind.BACKUP, 1)
    # cancel returns once restic is gone and the record is written.
    assert cancelled is record and record.status is JobStatus.CANCEL
    assert gate.interrupted and not gate.answered
    assert task.done() and harness.service.scheduler.task_of(key) is None
    assert record.extra == "cancelled by alice" and record.pid is None
    assert record.snapshot_id is None
    assert harness.store.statuses("backup", 1) == ["pending", "running", "cancel"]
    # The interrupted backup left data: a prune is wanted, durably, with the cancel.
    wanted = Put("meta", "upkeep", {"prune_wanted": True})
    assert wanted in cancel_batch(harness, 1)
    # ...and maintenance carries it out, after looking for a snapshot the attempt made.
    await until(lambda: "prune" in harness.restic.names(), "prune ran")
    assert harness.restic.calls_of("snapshots")[0].args == (("fa:id=1", "fa:user=alice"), ())
    assert not record.unsettled


async def test_admin_cancels_another_users_running_job(harness: Harness) -> None:
    record, gate = await running_job(harness, "alice", 1)
    with pytest.raises(UnknownJob):
        await harness.service.cancel(Caller("bob"), JobKind.BACKUP, 1)
    assert record.status is JobStatus.RUNNING and not gate.interrupted
    await harness.service.cancel(ROOT, JobKind.BACKUP, 1)
    assert record.status is JobStatus.CANCEL and record.extra == "cancelled by root"


async def test_cancel_after_the_scheduler_took_it_before_its_task_ran(
    make_service: ServiceMaker,
) -> None:
    """The job left the queue and has a task, which has not taken a step yet."""
    harness = await make_service(max_running=1)
    service = harness.service
    key = (JobKind.BACKUP, 1)
    record = await harness.backup("alice", 1)
    await step_until(lambda: service.scheduler.task_of(key) is not None, "taken")
    assert record.status is JobStatus.PENDING, "the window: taken, not yet running"
    assert service.scheduler.queued_count == 0

    await service.cancel(ALICE, JobKind.BACKUP, 1)
    assert record.status is JobStatus.CANCEL
    assert record.extra == "cancelled by alice before it started"
    assert service.scheduler.task_of(key) is None
    assert harness.store.statuses("backup", 1) == ["pending", "cancel"]
    await harness.idle()
    assert harness.restic.backed_up() == []
    assert finished(service.metrics, "backup", "cancel") == 1.0


async def test_cancel_while_the_running_status_is_being_written(make_service: ServiceMaker) -> None:
    """The job says running, its write is under way, restic has not started yet."""
    harness = await make_service(max_running=1)
    record = await harness.backup("alice", 1)  # written at once
    hold = asyncio.Event()
    harness.store.holds.append(hold)  # the next write (running) waits
    await harness.running(record)
    stored = await harness.stored("backup", 1)
    assert stored is not None and stored["status"] == "pending"

    await harness.service.cancel(ALICE, JobKind.BACKUP, 1)
    assert record.status is JobStatus.CANCEL and record.extra == "cancelled by alice"
    stored = await harness.stored("backup", 1)
    assert stored is not None and stored["status"] == "cancel"
    assert harness.restic.backed_up() == [], "restic never started"
    assert harness.service.scheduler.task_of((JobKind.BACKUP, 1)) is None


async def test_cancel_of_a_job_that_just_succeeded(harness: Harness) -> None:
    """restic has answered; the job's end is under way when the cancel comes."""
    record, gate = await running_job(harness, "alice", 1)
    gate.release()
    await step_until(lambda: gate.answered, "restic answered")
    assert record.status is JobStatus.RUNNING, "the window: answered, not yet ended"
    with pytest.raises(JobConflict, match=r"ended \(success\) before it could be cancelled"):
        await harness.service.cancel(ALICE, JobKind.BACKUP, 1)
    await harness.ended(record)
    assert record.status is JobStatus.SUCCESS and record.snapshot_id is not None
    stored = await harness.stored("backup", 1)
    assert stored is not None and stored["status"] == "success"
    assert stored["snapshot_id"] == record.snapshot_id
    assert harness.store.statuses("backup", 1) == ["pending", "running", "success"]
    assert finished(harness.service.metrics, "backup", "cancel") == 0.0

    # And once it has ended: the same answer, nothing changes.
    with pytest.raises(JobConflict, match="already ended"):
        await harness.service.cancel(ALICE, JobKind.BACKUP, 1)
    assert record.status is JobStatus.SUCCESS


async def test_cancel_twice_returns_the_cancelled_job(harness: Harness) -> None:
    record, _gate = await running_job(harness, "alice", 1)
    first, second = await asyncio.gather(
        harness.service.cancel(ALICE, JobKind.BACKUP, 1),
        harness.service.cancel(ALICE, JobKind.BACKUP, 1),
    )
    assert first is second is record and record.status is JobStatus.CANCEL
    writes = len(harness.store.batches)
    third = await harness.service.cancel(ALICE, JobKind.BACKUP, 1)
    assert third == record and third.status is JobStatus.CANCEL
    assert len(harness.store.batches) == writes, "an already cancelled job is not written"
    assert harness.store.statuses("backup", 1) == ["pending", "running", "cancel"]
    assert finished(harness.service.metrics, "backup", "cancel") == 1.0


async def test_cancel_all_of_pending_and_running(make_service: ServiceMaker) -> None:
    harness = await make_service(max_running=2)
    service, restic = harness.service, harness.restic
    one, gate_one = await running_job(harness, "alice", 1)
    two, gate_two = await running_job(harness, "alice", 2)
    pending = [await harness.backup("alice", job_id) for job_id in (3, 4)]
    bobs_gate = restic.hold("backup:5")
    bobs = await harness.backup("bob", 5)
    finished_one = await harness.backup("alice", 6)  # waits; cancelled too

    cancelled = await service.cancel_all(ALICE, JobKind.BACKUP)
    assert cancelled == [1, 2, 3, 4, 6]
    for record in (one, two, *pending, finished_one):
        assert record.status is JobStatus.CANCEL, record
    assert gate_one.interrupted and gate_two.interrupted
    assert not {3, 4, 6} & set(restic.backed_up()), "none started while being cancelled"
    for job_id in (3, 4, 6):
        assert harness.store.statuses("backup", job_id) == ["pending", "cancel"]
    for job_id in (1, 2):
        assert harness.store.statuses("backup", job_id) == ["pending", "running", "cancel"]

    # bob's job is not alice's to cancel: it runs in the freed slot.
    await until(bobs_gate.entered.is_set, "bob's job runs")
    assert bobs.status is JobStatus.RUNNING
    assert await service.cancel_all(ALICE, JobKind.BACKUP) == []
    # An admin cancels everyone's.
    assert await service.cancel_all(ROOT, JobKind.BACKUP) == [5]
    assert bobs.status is JobStatus.CANCEL and bobs_gate.interrupted
    assert finished(service.metrics, "backup", "cancel") == 6.0


async def test_snapshot_saved_as_the_cancel_came_is_forgotten(harness: Harness) -> None:
    record, _gate = await running_job(harness, "alice", 1)
    # restic saved the snapshot just as SIGINT came; the job says cancel, so it goes.
    saved = harness.restic.add_snapshot(1, "alice")
    await harness.service.cancel(ALICE, JobKind.BACKUP, 1)
    assert record.status is JobStatus.CANCEL and record.snapshot_id is None
    await until(lambda: saved.id not in harness.restic.snapshots_by_id, "forgotten")
    await until(lambda: not record.unsettled and not harness.service.forgets, "settled")
    assert record.status is JobStatus.CANCEL


async def test_cancel_of_a_running_restore(harness: Harness) -> None:
    service = harness.service
    backup = await harness.ended(await harness.backup("alice", 1))
    gate = harness.restic.hold("restore")
    target = harness.path("alice", "out")
    restore = await service.submit_restore(ALICE, 5, backup.id, target)
    await until(gate.entered.is_set, "restore runs")
    assert restore.status is JobStatus.RUNNING
    assert await service.cancel(ALICE, JobKind.RESTORE, 5) is restore
    assert restore.status is JobStatus.CANCEL and gate.interrupted
    assert restore.extra == f"cancelled by alice; partially restored files may remain in {target}"
    assert harness.store.statuses("restore", 5) == ["pending", "running", "cancel"]
    # A finished restore id may be used again.
    again = await harness.ended(await service.submit_restore(ALICE, 5, backup.id, target))
    assert again.status is JobStatus.SUCCESS and (target / "restored.txt").exists()
