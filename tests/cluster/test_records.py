"""DatabaseRecords: inserts, batches, reads and pages, against a real PostgreSQL; pages and
counts compared with the single-node StateStore holding the same records."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import psycopg
import pytest

from fa_restic.cluster import records as cluster_records
from fa_restic.cluster.database import Database
from fa_restic.cluster.records import DatabaseRecords
from fa_restic.jobs import records as job_records
from fa_restic.store import Clear, Delete, Operation, Put, StateStore, Update

STATUSES = ("pending", "running", "success", "failed", "cancel")
USERS = ("alice", "bob", "carol")


def job(job_id: int, user: str = "alice", status: str = "pending", **more: Any) -> dict[str, Any]:
    return {"id": job_id, "user": user, "status": status, "sequence": job_id, **more}


def test_the_collections_are_spelled_as_the_job_layer_spells_them() -> None:
    assert cluster_records.BACKUPS == job_records.BACKUPS
    assert cluster_records.RESTORES == job_records.RESTORES
    assert cluster_records.FORGETS == job_records.FORGETS
    assert cluster_records.META == job_records.META


async def test_one_of_racing_inserts_wins(database_url: str) -> None:
    async with Database(database_url, max_size=4) as one, Database(database_url) as two:
        await one.migrate()
        nodes = [DatabaseRecords(one), DatabaseRecords(two)]
        results = await asyncio.gather(
            *(
                nodes[attempt % 2].insert("backup", 7, "alice", job(7, extra=f"{attempt}"))
                for attempt in range(20)
            )
        )
        assert results.count(True) == 1
        winner = results.index(True)
        # The winner's record is the one kept, and it was committed before insert returned.
        assert await nodes[1].read("backup", 7) == job(7, extra=f"{winner}")
        # Ids are unique per kind: a restore may have the same id.
        assert await nodes[0].insert("restore", 7, "alice", job(7))


async def test_insert_refuses_a_record_of_another_id_or_user(records: DatabaseRecords) -> None:
    with pytest.raises(ValueError):
        await records.insert("backup", 1, "alice", job(2))
    with pytest.raises(ValueError):
        await records.insert("backup", 1, "alice", job(1, user="bob"))
    with pytest.raises(ValueError):
        await records.insert("forget", 1, "alice", job(1))
    assert await records.total("backup") == 0


async def test_a_batch_puts_updates_deletes_and_clears_in_order(records: DatabaseRecords) -> None:
    await records.write(
        [
            Put("backup", "1", job(1, progress={"files": 1, "bytes": 2})),
            Put("backup", "2", job(2)),
            Put("restore", "1", job(1, user="bob")),
            Put("forget", "abc123", {"snapshot_id": "abc123", "user": "alice"}),
            Put("meta", "repository", {"initialised": True}),
            # A shallow merge: `progress` is replaced whole, other fields are kept.
            Update("backup", "1", {"status": "success", "progress": {"files": 3}}),
            # An update of a record that is not there leaves it missing.
            Update("backup", "3", {"status": "success"}),
            Delete("backup", "2"),
            Put("backup", "2", job(2, extra="put again after its delete")),
        ]
    )
    assert await records.read("backup", "1") == job(1, status="success", progress={"files": 3})
    assert await records.read("backup", 2) == job(2, extra="put again after its delete")
    assert await records.read("backup", "3") is None
    assert await records.read("backup", "not a number") is None
    assert await records.read("restore", 1) == job(1, user="bob")
    assert await records.read("forget", "abc123") == {"snapshot_id": "abc123", "user": "alice"}
    assert await records.read("meta", "repository") == {"initialised": True}

    await records.write([Clear("backup"), Clear("forget"), Put("meta", "upkeep", {"at": 1})])
    assert await records.total("backup") == 0
    assert await records.total("restore") == 1
    assert await records.every("forget") == {}
    assert await records.every("meta") == {"repository": {"initialised": True}, "upkeep": {"at": 1}}


async def test_a_batch_that_fails_changes_nothing(records: DatabaseRecords) -> None:
    await records.write([Put("backup", "1", job(1))])
    with pytest.raises(psycopg.errors.InvalidTextRepresentation):
        await records.write(
            [
                Update("backup", "1", {"status": "success"}),
                Put("meta", "repository", {"initialised": True}),
                # The queue order must be an integer: PostgreSQL refuses the row.
                Put("backup", "2", job(2, sequence="soon")),
            ]
        )
    assert await records.read("backup", "1") == job(1)
    assert await records.every("meta") == {}
    assert await records.total("backup") == 1


async def test_a_batch_with_an_unknown_collection_is_refused_whole(
    records: DatabaseRecords,
) -> None:
    with pytest.raises(ValueError):
        await records.write([Put("backup", "1", job(1)), Put("nonsense", "1", {})])
    with pytest.raises(ValueError):
        await records.write([Put("backup", "1", job(1)), Put("backup", "one", job(1))])
    assert await records.total("backup") == 0


async def test_live_records_are_those_the_job_layer_keeps_in_memory(
    records: DatabaseRecords,
) -> None:
    cases = list(itertools.product(STATUSES, (False, True)))
    await records.write(
        Put("backup", str(number), job(number, status=status, unsettled=unsettled))
        for number, (status, unsettled) in enumerate(cases, start=1)
    )
    await records.write([Put("restore", "1", job(1, status="running"))])
    expected = {
        str(number)
        for number, (status, unsettled) in enumerate(cases, start=1)
        if job_records.is_live(status, unsettled)
    }
    live = await records.live("backup")
    assert set(live) == expected
    assert live["1"] == job(1, status="pending", unsettled=False)
    # A record that settles leaves the live ones.
    await records.write([Update("backup", "1", {"status": "cancel"})])
    assert "1" not in await records.live("backup")
    loaded = await records.load()
    assert set(loaded["backup"]) == expected - {"1"}
    assert set(loaded["restore"]) == {"1"}
    assert loaded["forget"] == {} and loaded["meta"] == {}


async def test_pages_and_counts_are_those_of_the_state_store(
    records: DatabaseRecords, tmp_path: Path
) -> None:
    state = StateStore(tmp_path / "state.json", job_records.LAYOUT)
    state.load()
    try:
        operations: list[Operation] = [
            Put(
                kind,
                str(number),
                job(number, USERS[number % 3], STATUSES[(number // 3) % 5]),
            )
            for kind in ("backup", "restore")
            for number in range(1, 301)
            if kind == "backup" or number % 4 == 0
        ]
        operations += [Delete("backup", "150"), Update("backup", "151", {"status": "failed"})]
        await state.write(operations)
        await records.write(operations)

        for kind in ("backup", "restore"):
            assert await records.counts(kind) == state.counts(kind)
            for owner, label, before, limit in itertools.product(
                (None, "alice", "dave"), (None, "failed", "running"), (None, 151, 1), (1, 7, 500)
            ):
                expected = state.page(kind, owner=owner, label=label, before=before, limit=limit)
                found = await records.page(
                    kind, owner=owner, label=label, before=before, limit=limit
                )
                assert found == expected, (kind, owner, label, before, limit)
        # Keyset paging: following `before` visits every record once, newest first.
        seen: list[int] = []
        before = None
        while page := await records.page("backup", owner="bob", before=before, limit=13):
            seen += [value["id"] for value in page]
            before = page[-1]["id"]
        assert seen == sorted((n for n in range(1, 301) if n % 3 == 1 and n != 150), reverse=True)
    finally:
        state.close()


async def test_pages_go_through_an_index(records: DatabaseRecords, database: Database) -> None:
    await records.write(
        Put("backup", str(number), job(number, USERS[number % 3], STATUSES[number % 5]))
        for number in range(1, 5001)
    )
    async with database.connection() as connection:
        await connection.execute("ANALYZE jobs")
        for where in (
            "kind = 'backup'",
            "kind = 'backup' AND owner = 'bob'",
            "kind = 'backup' AND status = 'failed' AND id < 3000",
            "kind = 'backup' AND owner = 'bob' AND status = 'failed'",
        ):
            cursor = await connection.execute(
                f"EXPLAIN SELECT record FROM jobs WHERE {where} ORDER BY id DESC LIMIT 101"  # noqa: S608 - fixed text
            )
            plan = "\n".join(row[0] for row in await cursor.fetchall())
            # Read in id order from an index and stopped at the limit: no scan of the table,
            # no sort of what matched.
            assert "Index Scan" in plan, plan
            assert "Seq Scan" not in plan and "Sort" not in plan, plan


async def test_queue_order_is_one_sequence_for_every_node(database_url: str) -> None:
    async with Database(database_url) as one, Database(database_url) as two:
        await one.migrate()
        nodes = [DatabaseRecords(one), DatabaseRecords(two)]
        taken = await asyncio.gather(*(nodes[n % 2].next_sequence() for n in range(10)))
        assert sorted(taken) == list(range(1, 11))
        await nodes[0].raise_sequence(500)
        assert await nodes[1].next_sequence() == 501
        # Never lowered: an import of an older state leaves the sequence where it is.
        await nodes[0].raise_sequence(3)
        assert await nodes[1].next_sequence() == 502
