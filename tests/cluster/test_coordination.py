"""DatabaseCoordination against a real PostgreSQL: what nodes of a cluster ask of the database
they share (SPEC §10): admits racing for one id, cancels across nodes, progress another node
reads, leases, and the gate that keeps exclusive repository work alone."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from fa_restic.cluster.coordination import DatabaseCoordination, NodeLease
from fa_restic.cluster.database import Database, DatabaseUnavailable
from fa_restic.cluster.records import GATE_LOCK, DatabaseRecords
from fa_restic.jobs import ports
from fa_restic.jobs.ports import Coordination
from fa_restic.store import Put, Update
from tests.helpers import free_port

pytestmark = pytest.mark.timeout(30)

LEASE = 30.0
REUSABLE = frozenset({"failed", "cancel"})


def job(job_id: int, user: str = "alice", **more: Any) -> dict[str, Any]:
    return {
        "id": job_id,
        "user": user,
        "status": "pending",
        "sequence": job_id,
        "attempts": 0,
        **more,
    }


async def queue(records: DatabaseRecords, *jobs: tuple[str, dict[str, Any]]) -> None:
    """Queues jobs one batch each, in this order (as POSTs would)."""
    for kind, value in jobs:
        await records.write([Put(kind, str(value["id"]), value)])


async def column(database: Database, name: str, kind: str, job_id: int) -> Any:
    """Returns one column of a job's row, read beside the code under test."""
    query = sql.SQL("SELECT {} FROM jobs WHERE kind = %s AND id = %s").format(sql.Identifier(name))
    async with database.connection() as connection:
        cursor = await connection.execute(query, (kind, job_id))
        row = await cursor.fetchone()
    assert row is not None
    return row[0]


async def age_heartbeat(database: Database, node: str, seconds: int) -> None:
    """Makes `node`'s last heartbeat `seconds` old, as if it had gone silent then."""
    async with database.connection() as connection:
        await connection.execute(
            "UPDATE nodes SET heartbeat_at = now() - make_interval(secs => %s) WHERE name = %s",
            (seconds, node),
        )


def make(database: Database, records: DatabaseRecords, url: str, node: str) -> DatabaseCoordination:
    return DatabaseCoordination(database, records, node, url, LEASE)


@pytest.fixture
async def node_a(
    database: Database, records: DatabaseRecords, database_url: str
) -> DatabaseCoordination:
    coordination = make(database, records, database_url, "node-a")
    await coordination.beat()
    return coordination


@pytest.fixture
async def node_b(database_url: str) -> AsyncIterator[DatabaseCoordination]:
    """Another node: a pool of its own on the same database."""
    async with Database(database_url) as other:
        coordination = make(other, DatabaseRecords(other), database_url, "node-b")
        await coordination.beat()
        yield coordination


def _conforms(coordination: DatabaseCoordination) -> Coordination:
    """mypy checks here that DatabaseCoordination is the job layer's Coordination."""
    return coordination


def _fits(lease: NodeLease) -> ports.NodeLease:
    """mypy checks here that the cluster's NodeLease is the job layer's."""
    return lease


def test_it_is_the_job_layers_coordination_and_its_node_lease() -> None:
    wanted = {
        name
        for name, _ in inspect.getmembers(Coordination)
        if not name.startswith("_") and name not in dir(object)
    }
    assert wanted, "the Protocol's methods were found"
    for name in sorted(wanted):
        assert hasattr(DatabaseCoordination, name), name
        expected, actual = getattr(Coordination, name), getattr(DatabaseCoordination, name)
        if callable(expected):
            assert list(inspect.signature(actual).parameters) == list(
                inspect.signature(expected).parameters
            ), name
            assert inspect.iscoroutinefunction(actual) == inspect.iscoroutinefunction(expected), (
                name
            )
    # The job layer's NodeLease is a Protocol of read-only fields.
    fields = [name for name, _ in inspect.getmembers(ports.NodeLease) if not name.startswith("_")]
    assert sorted(field.name for field in dataclasses.fields(NodeLease)) == sorted(fields)
    assert NodeLease.__dataclass_params__.frozen  # type: ignore[attr-defined]


# -- admit --------------------------------------------------------------------------------


async def test_of_nodes_admitting_one_id_at_once_exactly_one_wins(
    database: Database, database_url: str
) -> None:
    # Ten connections of their own (the `database` fixture put the schema in place).
    async with Database(database_url, min_size=10, max_size=10) as pool:
        await pool.pool.wait()
        coordination = make(pool, DatabaseRecords(pool), database_url, "node-a")
        results = await asyncio.gather(
            *(
                coordination.admit("backup", 1, "alice", job(1, path=f"p{n}"), REUSABLE)
                for n in range(10)
            )
        )
        won = [result.admitted for result in results]
        assert won.count(True) == 1, results
        winner = results[won.index(True)]
        stored = await coordination.records.read("backup", 1)
        assert stored == job(1, path=f"p{won.index(True)}", sequence=winner.sequence)

        # An id the user's failed job held is reused, by several at once too: one wins.
        await coordination.records.write([Update("backup", "1", {"status": "failed"})])
        results = await asyncio.gather(
            *(
                coordination.admit("backup", 1, "alice", job(1, path=f"q{n}"), REUSABLE)
                for n in range(10)
            )
        )
        won = [result.admitted for result in results]
        assert won.count(True) == 1, results
        winner = results[won.index(True)]
        assert await coordination.records.read("backup", 1) == job(
            1, path=f"q{won.index(True)}", sequence=winner.sequence
        )


async def test_an_id_is_reused_only_by_its_user_and_only_from_a_reusable_status(
    node_a: DatabaseCoordination, database: Database
) -> None:
    async def admitted(kind: str, user: str, value: dict[str, Any]) -> bool:
        return (await node_a.admit(kind, value["id"], user, value, REUSABLE)).admitted

    assert await admitted("backup", "alice", job(1))
    assert not await admitted("backup", "alice", job(1, path="again"))
    assert await admitted("restore", "bob", job(1, "bob")), "another kind"
    [(_, _, claimed)] = await node_a.claim(1)
    assert not await admitted("backup", "alice", job(1, path="again"))

    await node_a.records.write([Update("backup", "1", {"status": "success"})])
    assert not await admitted("backup", "alice", job(1, path="again"))
    await node_a.records.write([Update("backup", "1", {"status": "cancel"})])
    assert not await admitted("backup", "bob", job(1, "bob")), "alice's"
    assert await node_a.records.read("backup", 1) == {**claimed, "status": "cancel"}
    again = await node_a.admit("backup", 1, "alice", job(1, path="again"), REUSABLE)
    assert again.admitted and again.sequence is not None
    assert await node_a.records.read("backup", 1) == job(1, path="again", sequence=again.sequence)
    # Pending again: no node's, and in the line.
    assert await column(database, "node", "backup", 1) is None
    assert await node_a.pending_of("alice") == 1

    with pytest.raises(ValueError, match="id and user"):
        await node_a.admit("backup", 2, "alice", job(3), REUSABLE)
    with pytest.raises(ValueError, match="not a job collection"):
        await node_a.admit("forget", 2, "alice", job(2), REUSABLE)


async def test_one_users_cap_holds_across_nodes_admitting_at_once(
    database: Database, database_url: str
) -> None:
    # Two nodes, ten connections each: twenty admissions of alice's at one moment.
    async with (
        Database(database_url, min_size=10, max_size=10) as pool_a,
        Database(database_url, min_size=10, max_size=10) as pool_b,
    ):
        await pool_a.pool.wait()
        await pool_b.pool.wait()
        nodes = [
            make(pool, DatabaseRecords(pool), database_url, name)
            for pool, name in ((pool_a, "node-a"), (pool_b, "node-b"))
        ]
        await nodes[0].admit("backup", 100, "bob", job(100, "bob"), REUSABLE, 5)
        results = await asyncio.gather(
            *(nodes[n % 2].admit("backup", n, "alice", job(n), REUSABLE, 5) for n in range(1, 21))
        )
        admitted = [result for result in results if result.admitted]
        refused = [result for result in results if not result.admitted]
        assert len(admitted) == 5, results
        assert {result.pending for result in refused} == {5}, "each counted the others"
        assert await nodes[0].pending_of("alice") == 5
        # Each took its own place in the queue, one after another.
        places = sorted(result.sequence for result in admitted if result.sequence is not None)
        assert len(set(places)) == 5 and places == sorted(places)
        # Bob's cap is his own; without a cap (an admin's) there is none.
        assert (await nodes[1].admit("backup", 101, "bob", job(101, "bob"), REUSABLE, 5)).admitted
        assert (await nodes[1].admit("backup", 21, "alice", job(21), REUSABLE)).admitted
        assert await nodes[0].pending_of("alice") == 6


async def test_pending_and_running_are_counted_across_nodes(
    node_a: DatabaseCoordination, node_b: DatabaseCoordination, database: Database
) -> None:
    assert not await node_a.pending_exists()
    assert (await node_a.pending_of("alice"), await node_a.running_anywhere()) == (0, 0)
    await queue(
        node_a.records,
        ("backup", job(1)),
        ("restore", job(2)),
        ("backup", job(3, "bob")),
        ("backup", job(4, "bob")),
    )
    assert await node_b.pending_exists()
    assert (await node_b.pending_of("alice"), await node_b.pending_of("bob")) == (2, 2)
    assert len(await node_a.claim(1)) == 1
    assert len(await node_b.claim(2)) == 2
    assert await node_a.running_anywhere() == 3
    assert await node_a.pending_of("alice") + await node_a.pending_of("bob") == 1
    # Jobs of a node whose lease expired do not run anywhere (they are requeued).
    await age_heartbeat(database, "node-b", 60)
    assert await node_a.running_anywhere() == 1


# -- cancels --------------------------------------------------------------------------------


async def test_cancel_pending_merges_fields_into_the_chosen_pending_jobs(
    node_a: DatabaseCoordination,
) -> None:
    await queue(
        node_a.records,
        *[("backup", job(n)) for n in (5, 1, 3)],
        *[("backup", job(n, "bob")) for n in (2, 4, 6)],
        ("restore", job(1)),
    )
    [(_, running, _)] = await node_a.claim(1)
    cancelled = {"status": "cancel", "extra": "cancelled by alice"}
    assert await node_a.cancel_pending("backup", cancelled, job_id=3) == [3]
    assert await node_a.cancel_pending("backup", cancelled, job_id=running) == []
    assert await node_a.cancel_pending("backup", cancelled, user="bob") == [2, 4, 6]
    assert await node_a.cancel_pending("backup", cancelled) == sorted({1, 5} - {running})
    assert await node_a.cancel_pending("backup", cancelled) == []
    assert (await node_a.records.read("restore", 1) or {})["status"] == "pending"
    stored = await node_a.records.read("backup", 4)
    assert stored == {**job(4, "bob"), **cancelled}


async def test_a_job_a_claim_holds_is_not_cancelled_as_pending(
    node_a: DatabaseCoordination, database_url: str
) -> None:
    await queue(node_a.records, *[("backup", job(n)) for n in (1, 2, 3)])
    async with Database(database_url) as other, other.transaction() as claiming:
        # Another node in the middle of claiming job 2: locked, about to be running.
        await claiming.execute("SELECT 1 FROM jobs WHERE id = 2 FOR UPDATE")
        cancel = asyncio.create_task(node_a.cancel_pending("backup", {"status": "cancel"}))
        await asyncio.sleep(0.3)
        assert not cancel.done(), "the cancel waits for the claim's row"
        await claiming.execute(
            "UPDATE jobs SET record = record || '{\"status\": \"running\"}', node = 'node-b'"
            " WHERE id = 2"
        )
    # The claim committed: the job runs, and the cancel left it to its node.
    assert await asyncio.wait_for(cancel, timeout=10) == [1, 3]
    assert (await node_a.records.read("backup", 2) or {})["status"] == "running"


async def test_a_cancel_is_asked_of_the_node_running_the_job(
    node_a: DatabaseCoordination, node_b: DatabaseCoordination
) -> None:
    await queue(
        node_a.records,
        ("backup", job(1)),
        ("backup", job(2, "bob")),
        ("backup", job(3)),
        ("restore", job(4)),
    )
    assert [job_id for _, job_id, _ in await node_a.claim(1)] == [1]
    assert sorted((kind, job_id) for kind, job_id, _ in await node_b.claim(3)) == [
        ("backup", 2),
        ("backup", 3),
        ("restore", 4),
    ]
    await queue(node_a.records, ("backup", job(5, "bob")))
    # Job 5 waits: a pending job is cancel_pending's, not asked of any node.
    assert await node_a.request_cancel("backup", "carol", job_id=5) == []
    # Node-a's own job 1 is its job layer's to stop; node-b's are asked.
    assert await node_a.request_cancel("backup", "alice", user="alice") == [3]
    assert await node_a.request_cancel("backup", "admin") == [2, 3]
    assert await node_b.request_cancel("restore", "alice", job_id=4) == [], "its own"
    assert await node_a.cancel_requests() == []
    assert await node_b.cancel_requests() == [("backup", 2, "admin"), ("backup", 3, "admin")]
    assert await node_a.request_cancel("restore", "alice", job_id=4) == [4]
    assert await node_b.cancel_requests() == [
        ("backup", 2, "admin"),
        ("backup", 3, "admin"),
        ("restore", 4, "alice"),
    ]
    # Once the job ends, nobody is asked any more.
    await node_b.records.write([Update("backup", "2", {"status": "cancel"})])
    assert [job_id for _, job_id, _ in await node_b.cancel_requests()] == [3, 4]


# -- progress -------------------------------------------------------------------------------


async def test_progress_is_read_back_while_the_job_runs(
    node_a: DatabaseCoordination, node_b: DatabaseCoordination, database: Database
) -> None:
    await queue(node_a.records, ("backup", job(1)), ("backup", job(2)), ("restore", job(3)))
    await node_a.share_progress({})  # sends nothing
    [(_, _, claimed)] = await node_a.claim(1)
    progress = {"percent_done": 0.5, "bytes_done": 10, "total_bytes": 20}
    await node_a.share_progress(
        {("backup", 1): progress, ("backup", 2): {"percent_done": 0.9}, ("restore", 3): {}}
    )
    # Another node reads it with the record, by id and in pages; a pending job has none.
    assert await node_b.records.read("backup", 1) == {**claimed, "progress": progress}
    page = await node_b.records.page("backup")
    assert page == [job(2), {**claimed, "progress": progress}]
    assert await node_b.records.page("backup", label="running") == [page[1]]
    assert await column(database, "progress", "backup", 2) is None

    # Only the node running the job publishes its progress.
    await node_b.share_progress({("backup", 1): {"percent_done": 0.1}})
    assert (await node_b.records.read("backup", 1) or {})["progress"] == progress
    # Finished: the record is what the node wrote at its end, without the last progress.
    await node_a.records.write([Update("backup", "1", {"status": "success"})])
    assert await node_b.records.read("backup", 1) == {**claimed, "status": "success"}
    await node_a.share_progress({("backup", 1): {"percent_done": 1.0}})
    assert await column(database, "progress", "backup", 1) == progress

    # A job put back to pending starts afresh: no progress, no cancel asked.
    assert len(await node_a.claim(1)) == 1
    await node_a.share_progress({("backup", 2): progress})
    await node_b.request_cancel("backup", "bob", job_id=2)
    await node_a.records.write([Update("backup", "2", {"status": "pending"})])
    assert (await column(database, "progress", "backup", 2)) is None
    assert (await column(database, "cancel_by", "backup", 2)) is None
    assert "progress" not in (await node_a.records.read("backup", 2) or {"progress": 1})


# -- the gate ----------------------------------------------------------------------------------


async def test_no_node_claims_while_one_holds_the_gate(
    node_a: DatabaseCoordination, node_b: DatabaseCoordination
) -> None:
    await queue(node_a.records, *[("backup", job(n)) for n in (1, 2, 3)])
    async with node_a.exclusive():
        assert await node_b.claim(1) == []
        assert await node_a.claim(1) == [], "not the holder either: its work is alone"
        assert await node_b.pending_exists()
    # Let go of at once: the next claim takes a job.
    assert [job_id for _, job_id, _ in await node_b.claim(1)] == [1]

    # Also when the block raises, or is cancelled while inside.
    with pytest.raises(RuntimeError, match="inside"):
        async with node_a.exclusive():
            raise RuntimeError("inside")
    assert len(await node_b.claim(1)) == 1
    entered = asyncio.Event()

    async def hold() -> None:
        async with node_a.exclusive():
            entered.set()
            await asyncio.sleep(60)

    holding = asyncio.create_task(hold())
    await asyncio.wait_for(entered.wait(), timeout=5)
    assert await node_b.claim(1) == []
    holding.cancel()
    with pytest.raises(asyncio.CancelledError):
        await holding
    assert len(await node_b.claim(1)) == 1


async def test_the_gate_is_held_by_one_node_at_a_time_and_waits_for_claims(
    node_a: DatabaseCoordination, node_b: DatabaseCoordination, database_url: str
) -> None:
    order: list[str] = []

    async def alone(coordination: DatabaseCoordination, first: asyncio.Event) -> None:
        async with coordination.exclusive():
            order.append(f"{coordination.node} in")
            first.set()
            await asyncio.sleep(0.3)
            order.append(f"{coordination.node} out")

    first = asyncio.Event()
    a = asyncio.create_task(alone(node_a, first))
    await asyncio.wait_for(first.wait(), timeout=5)
    b = asyncio.create_task(alone(node_b, asyncio.Event()))
    await asyncio.wait_for(asyncio.gather(a, b), timeout=10)
    assert order == ["node-a in", "node-a out", "node-b in", "node-b out"]

    # A claim under way (its transaction holds the gate shared) is waited for.
    async with await psycopg.AsyncConnection.connect(database_url) as claiming:
        await claiming.execute("SELECT pg_advisory_xact_lock_shared(%s)", (GATE_LOCK,))
        entering = asyncio.create_task(alone(node_a, asyncio.Event()))
        await asyncio.sleep(0.3)
        assert not entering.done() and order[-1] == "node-b out"
        await claiming.commit()
        await asyncio.wait_for(entering, timeout=5)
    assert order[-2:] == ["node-a in", "node-a out"]


async def test_the_gate_of_an_unreachable_database_is_database_unavailable(
    database: Database, records: DatabaseRecords
) -> None:
    nowhere = make(database, records, f"postgresql://fa@127.0.0.1:{free_port()}/x", "node-a")
    with pytest.raises(DatabaseUnavailable):
        async with nowhere.exclusive():
            pytest.fail("entered")


# -- leases ------------------------------------------------------------------------------------


async def test_a_dead_nodes_job_someone_asked_to_cancel_ends_cancelled(
    node_a: DatabaseCoordination, node_b: DatabaseCoordination, database: Database
) -> None:
    await queue(
        node_a.records,
        ("backup", job(1)),
        ("restore", job(2, "bob")),
        ("backup", job(3)),
    )
    assert len(await node_b.claim(3)) == 3
    assert await node_a.request_cancel("backup", "alice", job_id=1) == [1]
    assert await node_a.request_cancel("restore", "bob", job_id=2) == [2]
    await age_heartbeat(database, "node-b", 60)
    changed = {(kind, job_id): record for kind, job_id, record in await node_a.requeue_dead(3)}
    assert set(changed) == {("backup", 1), ("restore", 2), ("backup", 3)}
    for key, record in changed.items():
        assert await node_a.records.read(*key) == record
    backup, restore = changed["backup", 1], changed["restore", 2]
    assert (backup["status"], backup["extra"]) == ("cancel", "cancelled by alice")
    assert backup["finished_at"].endswith("Z") and backup["unsettled"] is True
    assert (restore["status"], restore["extra"]) == ("cancel", "cancelled by bob")
    assert "unsettled" not in restore
    assert changed["backup", 3]["status"] == "pending", "not asked: runs again"
    assert await node_a.requeue_dead(3) == []


async def test_release_puts_back_what_this_node_no_longer_runs(
    node_a: DatabaseCoordination, node_b: DatabaseCoordination, database: Database
) -> None:
    await queue(
        node_a.records,
        ("backup", job(1)),
        ("backup", job(2)),
        ("restore", job(3)),
        ("backup", job(4, attempts=2)),
    )
    assert len(await node_a.claim(4)) == 4
    await queue(node_a.records, ("backup", job(5, "bob")))
    assert [job_id for _, job_id, _ in await node_b.claim(1)] == [5]
    await node_b.request_cancel("restore", "alice", job_id=3)

    changed = {
        (kind, job_id): record
        for kind, job_id, record in await node_a.release({("backup", 1)}, max_attempts=3)
    }
    assert set(changed) == {("backup", 2), ("restore", 3), ("backup", 4)}
    assert changed["backup", 2]["status"] == "pending"
    assert changed["backup", 2]["unsettled"] is True
    assert changed["backup", 2]["extra"] == (
        "interrupted: node node-a restarted or lost its lease (attempt 1 of 3); runs again"
    )
    assert (changed["restore", 3]["status"], changed["restore", 3]["extra"]) == (
        "cancel",
        "cancelled by alice",
    )
    assert changed["backup", 4]["status"] == "failed"
    assert "not tried again" in changed["backup", 4]["extra"]
    # What it runs, and what other nodes run, stay.
    assert (await node_a.records.read("backup", 1) or {})["status"] == "running"
    assert (await node_a.records.read("backup", 5) or {})["status"] == "running"
    assert await node_a.release({("backup", 1)}, max_attempts=3) == []
    assert len(await node_a.release([], max_attempts=3)) == 1
    assert await column(database, "node", "backup", 2) is None


async def test_nodes_are_listed_with_their_leases(
    node_a: DatabaseCoordination, node_b: DatabaseCoordination, database: Database
) -> None:
    await queue(node_a.records, ("backup", job(1)), ("backup", job(2)))
    await node_b.claim(2)
    await age_heartbeat(database, "node-b", 60)
    await node_a.beat()
    a, b = await node_a.nodes()
    assert (a.name, a.alive, a.running) == ("node-a", True, 0)
    assert 0 <= a.lease_age < 5
    assert (b.name, b.alive, b.running) == ("node-b", False, 2)
    assert 59 < b.lease_age < 70
    await node_b.beat()
    assert [node.alive for node in await node_b.nodes()] == [True, True]


async def test_shared_returns_the_forget_queue_and_the_meta_values(
    node_a: DatabaseCoordination,
) -> None:
    assert await node_a.shared() == {"forget": {}, "meta": {}}
    await node_a.records.write(
        [
            Put("forget", "ab12", {"snapshot_id": "ab12", "backup_id": 9}),
            Put("meta", "repository", {"destroyed": False}),
        ]
    )
    assert await node_a.shared() == {
        "forget": {"ab12": {"snapshot_id": "ab12", "backup_id": 9}},
        "meta": {"repository": {"destroyed": False}},
    }
