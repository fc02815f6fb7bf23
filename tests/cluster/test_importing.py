"""`fa-restic import-state`: a single node's state file moved into the database, nothing lost,
and the same result when run twice."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from fa_restic.__main__ import main
from fa_restic.cluster.database import Database
from fa_restic.cluster.records import COLLECTIONS, DatabaseRecords
from fa_restic.jobs import records as job_records
from fa_restic.jobs.models import BackupRecord, ForgetRecord, RestoreRecord
from fa_restic.names import JobStatus
from fa_restic.store import Delete, Operation, StateStore, Update

FINISHED = (JobStatus.SUCCESS, JobStatus.FAILED, JobStatus.CANCEL)
USERS = ("alice", "bob", "carol", "dave")
START = datetime(2026, 1, 1, tzinfo=UTC)


def _backup(number: int, status: JobStatus, **more: Any) -> BackupRecord:
    moment = START + timedelta(seconds=number)
    return BackupRecord(
        id=number,
        user=USERS[number % len(USERS)],
        path=f"/data/users/{USERS[number % len(USERS)]}/folder {number}",
        status=status,
        created_at=moment,
        started_at=None if status is JobStatus.PENDING else moment,
        finished_at=moment if status.is_terminal else None,
        sequence=number,
        attempts=0 if status is JobStatus.PENDING else 1,
        total_size=number * 1000,
        snapshot_id=f"{number:08x}" if status is JobStatus.SUCCESS else None,
        exclude=["*.tmp"] if number % 7 == 0 else [],
        **more,
    )


async def _write_state(path: Path) -> StateStore:
    """Writes, through StateStore's own API, a state of 5,000 finished backups, live jobs of
    every kind, restores, queued forgets and meta values; some folded into the state file,
    some only in its journal. Returns the store, loaded again from the files."""
    store = StateStore(path, job_records.LAYOUT)
    store.load()
    batch: list[Operation] = [
        job_records.put(_backup(number, FINISHED[number % 3])) for number in range(1, 5001)
    ]
    await store.write(batch)
    await store.compact()
    later: list[Operation] = [
        job_records.put(_backup(number, JobStatus.PENDING)) for number in range(5001, 5041)
    ]
    later += [job_records.put(_backup(number, JobStatus.RUNNING)) for number in (5041, 5042)]
    later.append(job_records.put(_backup(5043, JobStatus.FAILED, unsettled=True)))
    later += [
        job_records.put(
            RestoreRecord(
                id=number,
                user=USERS[number % len(USERS)],
                backup_id=number,
                dst_path=f"/data/users/{USERS[number % len(USERS)]}/restored",
                snapshot_id=f"{number:08x}",
                status=JobStatus.SUCCESS if number <= 300 else JobStatus.PENDING,
                created_at=START,
                sequence=6000 + number,
            )
        )
        for number in range(3, 311, 3)
    ]
    later += [
        job_records.forget_put(
            ForgetRecord(
                snapshot_id=f"{number:08x}", backup_id=number, user="alice", queued_at=START
            )
        )
        for number in range(4, 40, 4)
    ]
    later += [
        job_records.forget_delete(f"{8:08x}"),
        job_records.Records.delete("backup", 17),
        Update("backup", "18", {"extra": "changed after the compaction"}),
    ]
    later.append(job_records.meta_put(job_records.REPOSITORY_KEY, {"initialised": True}))
    later.append(
        job_records.meta_put(job_records.UPKEEP_KEY, {"pruned_at": "2026-01-02T00:00:00Z"})
    )
    await store.write(later)
    store.close()
    again = StateStore(path, job_records.LAYOUT)
    again.load()
    return again


def _everything(state: StateStore) -> dict[str, dict[str, Any]]:
    return {
        collection: {key: state.read(collection, key) for key in state.keys(collection)}
        for collection in COLLECTIONS
    }


async def _database_has(records: DatabaseRecords, expected: dict[str, dict[str, Any]]) -> None:
    for collection in ("backup", "restore"):
        every = await records.page(collection, limit=1_000_000)
        assert {str(value["id"]): value for value in every} == expected[collection]
    for collection in ("forget", "meta"):
        assert await records.every(collection) == expected[collection]


async def test_import_moves_every_record_and_again_changes_nothing(
    tmp_path: Path, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "state.json"
    state = await _write_state(path)
    expected = _everything(state)
    counts = {kind: state.counts(kind) for kind in ("backup", "restore")}
    state.close()
    assert len(expected["backup"]) == 5042
    assert len(expected["restore"]) == 103
    assert len(expected["forget"]) == 8
    assert len(expected["meta"]) == 2

    arguments = ["import-state", "--from", str(path), "--database", database_url]
    assert await asyncio.to_thread(main, arguments) == 0
    said = capsys.readouterr().out
    assert "backup: 5042 records imported" in said
    assert "every record of" in said

    async with Database(database_url) as database:
        records = DatabaseRecords(database)
        await _database_has(records, expected)
        assert {kind: await records.counts(kind) for kind in ("backup", "restore")} == counts
        live = await records.live("backup")
        assert set(live) == {str(number) for number in range(5001, 5044)}
        assert (await records.read("backup", 18) or {})["extra"] == "changed after the compaction"
        assert await records.read("backup", 17) is None
        # Jobs queued on the cluster after the import start after the imported ones.
        assert await records.next_sequence() > 6000 + 309

        # Run twice: the same database; a record the cluster made meanwhile stays.
        assert await records.insert("backup", 9000, "erin", {"id": 9000, "user": "erin"})
        assert await asyncio.to_thread(main, arguments) == 0
        assert "the database holds 5043" in capsys.readouterr().out
        kept = await records.read("backup", 9000)
        await records.write([Delete("backup", "9000")])
        await _database_has(records, expected)
    assert kept == {"id": 9000, "user": "erin"}


async def test_import_without_a_state_file_or_a_database_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FA_DATABASE_URL", raising=False)
    missing = ["import-state", "--from", str(tmp_path / "none.json")]
    assert await asyncio.to_thread(main, missing) == 2
    assert "FA_DATABASE_URL" in capsys.readouterr().err

    monkeypatch.setenv("FA_DATABASE_URL", "postgresql://fa@127.0.0.1:1/nothing")
    assert await asyncio.to_thread(main, missing) == 1
    assert "no state file" in capsys.readouterr().out
    # Nothing was made where the state file was expected.
    assert not (tmp_path / "none.json").exists()

    state = StateStore(tmp_path / "state.json", job_records.LAYOUT)
    state.load()
    await state.write([job_records.put(_backup(1, JobStatus.SUCCESS))])
    state.close()
    unreachable = ["import-state", "--from", str(tmp_path / "state.json")]
    assert await asyncio.to_thread(main, unreachable) == 1
    said = capsys.readouterr().err
    assert "database unavailable" in said
    assert "Traceback" not in said
