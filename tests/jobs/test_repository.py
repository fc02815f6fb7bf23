# mypy: disable-error-code="comparison-overlap,unreachable"
# (a record's status changes across awaits, by the event loop: mypy's narrowing cannot know)
"""The repository's state (destroy-repo, the next backup initialises) and delete_backup
with its durable forget queue (SPEC §5 DELETE, destroy-repo, repo-destroyed)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from fa_restic.jobs.errors import JobConflict, UnknownJob
from fa_restic.jobs.intake import Caller
from fa_restic.jobs.repository import RepositoryState
from fa_restic.names import JobKind, JobStatus
from fa_restic.restic.errors import ErrorKind, ResticError
from fa_restic.store import Delete, Put
from tests.jobs.conftest import Harness, ServiceMaker, until
from tests.jobs.fake_restic import BackupScript

pytestmark = pytest.mark.timeout(5)

ALICE = Caller("alice")
ROOT = Caller("root", admin=True)


def forgotten(harness: Harness) -> list[str]:
    return harness.restic.forgotten()


async def test_destroy_cancels_everything_and_drops_backup_records(
    make_service: ServiceMaker,
) -> None:
    harness = await make_service(max_running=1)
    service, restic = harness.service, harness.restic
    done = await harness.ended(await harness.backup("alice", 1))
    restore = await service.submit_restore(ALICE, 10, 1, harness.path("alice", "out"))
    await harness.ended(restore)
    assert restore.status is JobStatus.SUCCESS
    gate = restic.hold("backup:2")
    running = await harness.backup("alice", 2)
    await until(gate.entered.is_set)
    waiting = await harness.backup("bob", 3)
    # The report's number of records is the store's counts (a database's are read a moment
    # after the writes, and may be a few seconds old).
    await harness.counted("backup", 3)

    report = await service.destroy_repository(ROOT)
    assert report == {
        "destroyed": True,
        "method": "forgot every snapshot and pruned (remote repository)",
        "snapshots_removed": 1,
        "backup_records_dropped": 3,
    }
    assert gate.interrupted and running.status is JobStatus.CANCEL
    assert waiting.status is JobStatus.CANCEL
    assert done.snapshot_id in forgotten(harness) and restic.snapshots_by_id == {}
    assert service.backups == {} and service.forgets == {}
    assert await service.records.backup(1) is None
    assert await service.records.restore(10) == restore, "restore records stay"
    assert service.destroyed and service.repository.state is RepositoryState.DESTROYED
    assert await harness.store.fetch_page("backup") == [], "no backup record is left"
    assert await harness.stored("meta", "repository") == {"destroyed": True}
    assert await harness.stored("restore", 10) is not None
    with pytest.raises(UnknownJob):
        await service.get_backup(ALICE, 1)

    # The next backup initialises a new repository; destroyed is then false, durably.
    restic.initialised = False
    initialisations = len(restic.calls_of("ensure_initialised"))
    again = await harness.ended(await harness.backup("alice", 1))
    assert again.status is JobStatus.SUCCESS
    assert len(restic.calls_of("ensure_initialised")) == initialisations + 1
    assert restic.initialised
    assert not service.destroyed and service.repository.state is RepositoryState.READY
    assert await harness.stored("meta", "repository") == {"destroyed": False}


async def test_destroy_refuses_new_jobs_while_under_way(harness: Harness) -> None:
    await harness.ended(await harness.backup("alice", 1))
    pruning = harness.restic.hold("prune")
    destroying = asyncio.create_task(harness.service.destroy_repository(ROOT))
    await until(pruning.entered.is_set, "destroy prunes")
    assert harness.service.repository.state is RepositoryState.DESTROYING
    with pytest.raises(JobConflict, match="being destroyed"):
        await harness.backup("alice", 2)
    with pytest.raises(JobConflict, match="being destroyed"):
        await harness.service.destroy_repository(ROOT)
    pruning.release()
    await destroying
    assert harness.service.destroyed
    await harness.ended(await harness.backup("alice", 2))


async def test_destroy_that_fails_leaves_the_state_as_it_was(harness: Harness) -> None:
    await harness.ended(await harness.backup("alice", 1))
    harness.restic.fail_next("prune", ResticError(ErrorKind.BACKEND, "connection refused", 1))
    with pytest.raises(ResticError):
        await harness.service.destroy_repository(ROOT)
    assert harness.service.repository.state is RepositoryState.READY
    assert not harness.service.destroyed
    assert await harness.service.records.backup(1) is not None


async def test_destroy_of_a_local_repository_removes_its_folder(
    make_service: ServiceMaker, tmp_path: Path
) -> None:
    repository = tmp_path / "repo"
    (repository / "data").mkdir(parents=True)
    (repository / "config").write_text("x")
    harness = await make_service(local_repository=repository)
    await harness.ended(await harness.backup("alice", 1))
    await harness.counted("backup", 1)
    report = await harness.service.destroy_repository(ROOT)
    assert report["method"] == "removed the local repository folder"
    assert report["snapshots_removed"] == 1 and report["backup_records_dropped"] == 1
    assert not repository.exists()
    assert harness.service.destroyed


async def test_delete_backup_drops_the_record_and_forgets_its_snapshot(
    harness: Harness,
) -> None:
    service, restic = harness.service, harness.restic
    record = await harness.ended(await harness.backup("alice", 1))
    snapshot_id = record.snapshot_id
    assert snapshot_id is not None

    assert await service.delete_backup(ALICE, 1) == snapshot_id
    # Gone at once, its forget queued durably in the same write.
    assert snapshot_id in service.forgets
    deleting = harness.store.batches[-1]
    assert Delete("backup", "1") in deleting
    queued = [op for op in deleting if isinstance(op, Put) and op.collection == "forget"]
    assert [op.key for op in queued] == [snapshot_id]
    assert queued[0].value["backup_id"] == 1 and queued[0].value["user"] == "alice"
    with pytest.raises(UnknownJob):
        await service.get_backup(ALICE, 1)
    assert await harness.stored("backup", 1) is None

    # Maintenance carries it out: forget, a check that it is gone, then prune.
    await until(lambda: not service.forgets, "forget queue empty")
    await until(lambda: "prune" in restic.names(), "prune ran")
    await harness.idle()  # the prune's end is written
    assert forgotten(harness) == [snapshot_id]
    assert snapshot_id not in restic.snapshots_by_id
    assert await harness.stored("forget", snapshot_id) is None
    names = restic.names()
    assert names.index("forget") < names.index("prune")
    assert await harness.stored("meta", "upkeep") == {"prune_wanted": False}


async def test_delete_refusals_and_reuse_of_the_id(make_service: ServiceMaker) -> None:
    harness = await make_service(max_running=1)
    service, restic = harness.service, harness.restic
    gate = restic.hold("backup:1")
    await harness.backup("alice", 1)
    await until(gate.entered.is_set)
    await harness.backup("alice", 2)
    for job_id in (1, 2):
        with pytest.raises(JobConflict, match="cancel it first"):
            await service.delete_backup(ALICE, job_id)
    gate.release()
    done = await harness.ended(await harness.backup_record(1))
    with pytest.raises(UnknownJob):
        await service.delete_backup(Caller("bob"), 1)
    assert done.status is JobStatus.SUCCESS

    # A failed backup made no snapshot: nothing to forget.
    error = ResticError(ErrorKind.FATAL, "Fatal: broken", exit_code=1)
    restic.script_backup(3, BackupScript(error=error))
    failed = await harness.ended(await harness.backup("alice", 3))
    assert failed.status is JobStatus.FAILED
    assert await service.delete_backup(ALICE, 3) is None
    assert service.forgets == {}

    # The id of a deleted backup may be used again at once.
    await service.delete_backup(ALICE, 1)
    again = await harness.backup("alice", 1)
    assert again.status is JobStatus.PENDING and again is not done
    await harness.ended(again)
    await harness.ended(await harness.backup_record(2))
    await until(lambda: not service.forgets, "forget queue empty")
    assert done.snapshot_id in forgotten(harness)
    assert again.snapshot_id in restic.snapshots_by_id
    assert await service.get(ALICE, JobKind.BACKUP, 1) == again
