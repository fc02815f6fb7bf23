"""Finished records in each node's memory (fa_restic.cluster.finished), against a real
server: a change answered on one node is seen on every other at once (SPEC §10), whoever
makes it; a node that cannot hear the database stops answering from memory."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
import pytest

from fa_restic.cluster.finished import TRUST_SECONDS
from fa_restic.cluster.store import DatabaseStore
from fa_restic.jobs.records import LAYOUT
from fa_restic.store import Clear, Delete, Put, Update

pytestmark = pytest.mark.timeout(60)


def job(job_id: int, status: str = "success", **more: Any) -> dict[str, Any]:
    return {"id": job_id, "user": "alice", "status": status, "sequence": job_id, **more}


async def until(check: Callable[[], bool], what: str, limit: float = 5.0) -> None:
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, f"not reached within {limit}s: {what}"
        await asyncio.sleep(0.01)


async def started(url: str, node: str, **options: Any) -> DatabaseStore:
    store = DatabaseStore(url, layout=LAYOUT, node=node, **options)
    await store.start()
    assert store.finished is not None
    await until(lambda: store.finished is not None and store.finished.trusted, "listening")
    return store


def held(store: DatabaseStore, job_id: int, kind: str = "backup") -> dict[str, Any] | None:
    assert store.finished is not None
    return store.finished.get(kind, job_id)


@pytest.fixture
async def nodes(database_url: str) -> AsyncIterator[tuple[DatabaseStore, DatabaseStore]]:
    first = await started(database_url, "node-a")
    second = await started(database_url, "node-b")
    # Each has heard the other's ping: a change waits for both.
    await asyncio.sleep(0.6)
    yield first, second
    await second.stop()
    await first.stop()


async def test_a_change_on_one_node_is_seen_on_the_other_at_once(
    nodes: tuple[DatabaseStore, DatabaseStore],
) -> None:
    a, b = nodes
    for job_id in range(1, 31):
        await a.write([Put("backup", str(job_id), job(job_id))])
        assert await b.fetch("backup", str(job_id)) == job(job_id)
        assert held(b, job_id) == job(job_id), "read once, then held"
        started_at = time.monotonic()
        if job_id % 2:
            await a.write([Delete("backup", str(job_id))])
            expected = None
        else:  # as an operator's fix, or a settle, would change it
            await a.write([Update("backup", str(job_id), {"status": "failed"})])
            expected = job(job_id, status="failed")
        elapsed = time.monotonic() - started_at
        # Read right after the write returned: never the old record.
        assert await b.fetch("backup", str(job_id)) == expected
        assert await a.fetch("backup", str(job_id)) == expected
        assert elapsed < 1.0, f"b answered: the write waited {elapsed:.2f}s"


async def test_a_change_made_outside_any_node_is_forgotten(
    nodes: tuple[DatabaseStore, DatabaseStore], database_url: str
) -> None:
    a, b = nodes
    await a.write([Put("backup", "7", job(7))])
    assert await b.fetch("backup", "7") == job(7)
    assert held(b, 7) is not None
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as operator:
        await operator.execute(
            'UPDATE jobs SET record = record || \'{"status": "failed"}\' WHERE id = 7'
        )
    await until(lambda: held(b, 7) is None, "forgotten on b")
    assert await b.fetch("backup", "7") == job(7, status="failed")


async def test_a_live_record_is_never_held(nodes: tuple[DatabaseStore, DatabaseStore]) -> None:
    a, b = nodes
    await a.write([Put("backup", "1", job(1, status="pending"))])
    await a.write([Put("restore", "1", job(1, status="failed", unsettled=True))])
    assert (await b.fetch("backup", "1") or {})["status"] == "pending"
    assert (await b.fetch("restore", "1") or {})["status"] == "failed"
    assert held(b, 1) is None
    assert held(b, 1, "restore") is None
    # Settled: then it may be held.
    await a.write([Update("restore", "1", {"unsettled": False})])
    await b.fetch("restore", "1")
    assert held(b, 1, "restore") is not None


async def test_many_changes_in_one_transaction_forget_everything(
    nodes: tuple[DatabaseStore, DatabaseStore],
) -> None:
    a, b = nodes
    await a.write([Put("backup", str(job_id), job(job_id)) for job_id in range(1, 151)])
    await a.write([Put("restore", "1", job(1))])
    for job_id in range(1, 151):
        await b.fetch("backup", str(job_id))
    await b.fetch("restore", "1")
    assert b.finished is not None and len(b.finished) == 151
    await a.write([Clear("backup")])
    # One message for them all ("*"): b holds nothing, restores included.
    assert len(b.finished) == 0
    assert await b.fetch("backup", "150") is None
    assert await b.fetch("restore", "1") == job(1)


async def test_a_record_read_across_a_change_is_not_held(
    nodes: tuple[DatabaseStore, DatabaseStore],
) -> None:
    a, b = nodes
    assert b.finished is not None
    await a.write([Put("backup", "1", job(1)), Put("backup", "2", job(2))])
    # As a read does: the generation before it, the record, then the hold; here a change
    # is heard while the record is on its way.
    before = b.finished.generation
    value = job(2)
    await a.write([Delete("backup", "1")])
    assert b.finished.generation > before
    b.finished.hold("backup", 2, value, before)
    assert held(b, 2) is None
    b.finished.hold("backup", 2, value, b.finished.generation)
    assert held(b, 2) == job(2)


async def test_a_write_waits_for_a_node_that_does_not_answer_no_longer_than_its_trust(
    nodes: tuple[DatabaseStore, DatabaseStore], database_url: str
) -> None:
    a, b = nodes
    await a.write([Put("backup", "1", job(1)), Put("backup", "2", job(2))])
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as mute:
        # A node that pings (it may answer from memory) and then falls silent.
        await mute.execute("SELECT pg_notify('fa_restic_sync', 'ping node-mute 1')")
        await asyncio.sleep(0.05)
        started_at = time.monotonic()
        deleting = asyncio.create_task(a.write([Delete("backup", "1")]))
        await asyncio.sleep(0.1)
        # Meanwhile the node's other writes go on: only the delete's answer waits.
        other_started = time.monotonic()
        await a.write([Put("backup", "3", job(3, status="pending"))])
        assert time.monotonic() - other_started < 0.5
        assert not deleting.done()
        await deleting
        waited = time.monotonic() - started_at
    assert TRUST_SECONDS - 0.2 <= waited <= TRUST_SECONDS + 1.0, waited
    assert await b.fetch("backup", "1") is None
    # Once its pings are old, the silent node is not waited for.
    await asyncio.sleep(TRUST_SECONDS + 0.6)
    started_at = time.monotonic()
    await a.write([Delete("backup", "2")])
    assert time.monotonic() - started_at < 1.0


async def test_a_node_that_cannot_hear_stops_answering_from_memory_and_listens_anew(
    nodes: tuple[DatabaseStore, DatabaseStore], database_url: str
) -> None:
    a, b = nodes
    assert b.finished is not None
    await a.write([Put("backup", "1", job(1))])
    await b.fetch("backup", "1")
    assert held(b, 1) is not None
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as admin:
        cursor = await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'fa-restic node-b finished'"
        )
        assert [row[0] for row in await cursor.fetchall()] == [True]
    await until(lambda: b.finished is not None and not b.finished.trusted, "b distrusts")
    assert held(b, 1) is None
    await until(lambda: b.finished is not None and b.finished.trusted, "b listens again")
    # Changes it might have missed meanwhile: what it held is forgotten.
    assert len(b.finished) == 0
    assert await b.fetch("backup", "1") == job(1)
    assert held(b, 1) == job(1)


async def test_a_node_holds_the_newest_finished_records_from_its_start(database_url: str) -> None:
    writer = await started(database_url, "node-a")
    try:
        await writer.write([Put("backup", str(job_id), job(job_id)) for job_id in range(1, 51)])
        await writer.write([Put("backup", "51", job(51, status="pending"))])
        await writer.write([Put("restore", "1", job(1))])
        reader = await started(database_url, "node-b", finished_in_memory=30)
        try:
            assert reader.finished is not None
            await until(lambda: reader.finished is not None and len(reader.finished) == 30, "30")
            assert held(reader, 50) == job(50)
            assert held(reader, 21) == job(21)
            assert held(reader, 20) is None  # beyond the limit
            assert held(reader, 51) is None  # live
            # Read once more, an older one is held, and the least recently read goes.
            assert await reader.fetch("backup", "3") == job(3)
            assert held(reader, 3) == job(3)
            assert len(reader.finished) == 30
        finally:
            await reader.stop()
    finally:
        await writer.stop()


async def test_none_held_when_the_limit_is_zero(database_url: str) -> None:
    store = DatabaseStore(database_url, layout=LAYOUT, node="node-a", finished_in_memory=0)
    await store.start()
    try:
        assert store.finished is None
        await store.write([Put("backup", "1", job(1))])
        assert await store.fetch("backup", "1") == job(1)
        await store.write([Delete("backup", "1")])
        assert await store.fetch("backup", "1") is None
    finally:
        await store.stop()


async def test_an_id_used_again_is_seen_pending_on_the_other_node_at_once(
    nodes: tuple[DatabaseStore, DatabaseStore],
) -> None:
    a, b = nodes
    for job_id in range(1, 11):
        await a.write([Put("backup", str(job_id), job(job_id, status="failed"))])
        assert (await b.fetch("backup", str(job_id)) or {})["status"] == "failed"
        assert held(b, job_id) is not None
        again = job(job_id, status="pending")
        admitted = await a.coordination.admit("backup", job_id, "alice", again, ["failed"])
        assert admitted.admitted
        assert await b.fetch("backup", str(job_id)) == {**again, "sequence": admitted.sequence}
    # A new id is no change to a finished record: admitted without asking the nodes.
    new = await a.coordination.admit("backup", 99, "alice", job(99, status="pending"), [])
    assert new.admitted
