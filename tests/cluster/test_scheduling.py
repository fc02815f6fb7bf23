"""The cluster's scheduling primitives against a real PostgreSQL: leases, fair claims that
two nodes never share, and jobs of dead nodes put back to pending."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from fa_restic.cluster.database import Database
from fa_restic.cluster.records import DatabaseRecords, Job
from fa_restic.store import Put

LEASE = 30.0


def job(job_id: int, user: str, sequence: int | None = None, **more: Any) -> dict[str, Any]:
    return {
        "id": job_id,
        "user": user,
        "status": "pending",
        "sequence": job_id if sequence is None else sequence,
        "attempts": 0,
        **more,
    }


async def queue(records: DatabaseRecords, *jobs: tuple[str, dict[str, Any]]) -> None:
    """Queues jobs one batch each, in this order (as POSTs would)."""
    for kind, value in jobs:
        await records.write([Put(kind, str(value["id"]), value)])


async def node_of(database: Database, kind: str, job_id: int) -> str | None:
    async with database.connection() as connection:
        cursor = await connection.execute(
            "SELECT node FROM jobs WHERE kind = %s AND id = %s", (kind, job_id)
        )
        row = await cursor.fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


async def age_heartbeat(database: Database, node: str, seconds: int) -> None:
    """Makes `node`'s last heartbeat `seconds` old, as if it had gone silent then."""
    async with database.connection() as connection:
        await connection.execute(
            "UPDATE nodes SET heartbeat_at = now() - make_interval(secs => %s) WHERE name = %s",
            (seconds, node),
        )


def users_of(claimed: list[Job]) -> list[str]:
    return [str(claimed_job.record["user"]) for claimed_job in claimed]


@pytest.fixture
async def nodes(database_url: str, database: Database) -> AsyncIterator[list[DatabaseRecords]]:
    """Three nodes' views of one database, each with its own pool."""
    async with Database(database_url) as second, Database(database_url) as third:
        yield [DatabaseRecords(database), DatabaseRecords(second), DatabaseRecords(third)]


async def test_a_node_is_alive_while_its_heartbeat_is_younger_than_the_lease(
    records: DatabaseRecords, database: Database
) -> None:
    assert await records.alive_nodes(LEASE) == []
    await records.heartbeat("node-b")
    await records.heartbeat("node-a")
    assert await records.alive_nodes(LEASE) == ["node-a", "node-b"]

    await age_heartbeat(database, "node-b", 60)
    assert await records.alive_nodes(LEASE) == ["node-a"]
    assert await records.alive_nodes(90) == ["node-a", "node-b"]

    await records.heartbeat("node-b")
    assert await records.alive_nodes(LEASE) == ["node-a", "node-b"]


async def test_claims_take_turns_between_users(records: DatabaseRecords) -> None:
    await queue(
        records,
        *[("backup", job(number, "alice")) for number in range(1, 6)],
        *[("backup", job(number, "bob")) for number in (6, 7)],
        ("restore", job(8, "carol")),
    )
    order: list[str] = []
    while claimed := await records.claim("node-a", 1):
        order += users_of(claimed)
    # Round robin in the order users came; each user's jobs first in, first out.
    assert order == ["alice", "bob", "carol", "alice", "bob", "alice", "alice", "alice"]
    assert await records.claim("node-a", 1) == []


async def test_one_claim_of_several_slots_takes_turns_too(records: DatabaseRecords) -> None:
    await queue(
        records,
        *[("backup", job(number, "alice")) for number in range(1, 6)],
        ("backup", job(6, "bob")),
        ("restore", job(1, "carol")),
    )
    claimed = await records.claim("node-a", 4)
    assert [(one.kind, one.id) for one in claimed] == [
        ("backup", 1),
        ("backup", 6),
        ("restore", 1),
        ("backup", 2),
    ]
    # Alice had the last turn: with bob and carol done, she is next anyway.
    assert [(one.kind, one.id) for one in await records.claim("node-a", 9)] == [
        ("backup", 3),
        ("backup", 4),
        ("backup", 5),
    ]


async def test_a_user_joining_the_line_stands_behind_those_waiting(
    records: DatabaseRecords,
) -> None:
    await queue(records, *[("backup", job(number, "alice")) for number in (1, 2, 3)])
    assert users_of(await records.claim("node-a", 1)) == ["alice"]
    # Alice went to the back of the line after her turn, but bob joins behind her.
    await queue(records, ("backup", job(4, "bob")))
    order = []
    while claimed := await records.claim("node-a", 1):
        order += [(claimed[0].record["user"], claimed[0].id)]
    assert order == [("alice", 2), ("bob", 4), ("alice", 3)]


async def test_a_users_jobs_start_in_queue_order_not_id_order(records: DatabaseRecords) -> None:
    await queue(
        records,
        ("backup", job(10, "alice", sequence=3)),
        ("backup", job(20, "alice", sequence=1)),
        ("restore", job(5, "alice", sequence=2)),
    )
    claimed = await records.claim("node-a", 3)
    assert [(one.kind, one.id) for one in claimed] == [
        ("backup", 20),
        ("restore", 5),
        ("backup", 10),
    ]


async def test_a_claimed_job_is_running_on_its_node(
    records: DatabaseRecords, database: Database
) -> None:
    await queue(records, ("backup", job(1, "alice", extra="queued", pid=None)))
    assert await records.claim("node-a", 0) == []
    [claimed] = await records.claim("node-a", 2)
    stored = await records.read("backup", 1)
    assert stored == claimed.record
    assert stored is not None
    assert stored["status"] == "running"
    assert stored["attempts"] == 1
    assert stored["extra"] == ""
    assert stored["started_at"].endswith("Z")
    assert await node_of(database, "backup", 1) == "node-a"
    assert set(await records.live("backup")) == {"1"}


async def test_a_claim_skips_jobs_another_node_holds(
    nodes: list[DatabaseRecords], database_url: str
) -> None:
    await queue(nodes[0], *[("backup", job(number, "alice")) for number in (1, 2, 3)])
    async with Database(database_url) as other, other.transaction() as connection:
        # Another node is in the middle of claiming alice's first job.
        await connection.execute("SELECT 1 FROM jobs WHERE id = 1 FOR UPDATE")
        # Not blocked by it (the claim would hang), and not taking it.
        claimed = await asyncio.wait_for(nodes[1].claim("node-b", 1), timeout=20)
        assert [one.id for one in claimed] == [2]
    assert [one.id for one in await nodes[2].claim("node-c", 5)] == [1, 3]


async def test_nodes_claiming_at_once_never_take_the_same_job(
    nodes: list[DatabaseRecords], database: Database
) -> None:
    users = ["alice", "bob", "carol", "dave", "erin"]
    await nodes[0].write(
        Put("backup", str(number), job(number, users[number % 5])) for number in range(1, 151)
    )
    claims: list[tuple[str, list[Job]]] = []

    async def claim_until_empty(records: DatabaseRecords, name: str) -> None:
        while claimed := await records.claim(name, 2):
            claims.append((name, claimed))

    await asyncio.gather(
        *(claim_until_empty(records, f"node-{n}") for n, records in enumerate(nodes))
    )
    taken = Counter(one.id for _, claimed in claims for one in claimed)
    assert sorted(taken) == list(range(1, 151))
    assert set(taken.values()) == {1}
    assert all(len(claimed) <= 2 for _, claimed in claims)
    for name, claimed in claims[:20]:
        for one in claimed:
            assert await node_of(database, "backup", one.id) == name
    assert await nodes[1].counts("backup") == {"running": 150}


async def test_jobs_of_a_dead_node_run_again_or_fail(
    records: DatabaseRecords, database: Database
) -> None:
    await records.heartbeat("node-a")
    await records.heartbeat("node-b")
    await queue(
        records,
        ("backup", job(1, "alice")),
        ("backup", job(2, "alice")),
        ("restore", job(3, "bob")),
        ("backup", job(4, "carol", attempts=1)),
    )
    assert len(await records.claim("node-a", 1)) == 1  # backup 1
    assert len(await records.claim("node-b", 3)) == 3  # restore 3, backups 2 and 4
    # A job found running with no node: imported from a single node that stopped.
    await records.write([Put("backup", "5", job(5, "dave", status="running", attempts=1))])

    assert await records.requeue_dead(LEASE, max_attempts=2) == [
        Job("backup", 5, await records.read("backup", 5) or {})
    ]
    await age_heartbeat(database, "node-b", 60)
    changed = {(one.kind, one.id): one.record for one in await records.requeue_dead(LEASE, 2)}
    assert set(changed) == {("backup", 2), ("restore", 3), ("backup", 4)}
    for key, record in changed.items():
        assert await records.read(*key) == record
        assert record["pid"] is None

    # The attempt counts; a backup looks for the snapshot the attempt may have left.
    assert changed["backup", 2]["status"] == "pending"
    assert changed["backup", 2]["attempts"] == 1
    assert changed["backup", 2]["unsettled"] is True
    assert "runs again" in changed["backup", 2]["extra"]
    assert changed["restore", 3]["status"] == "pending"
    assert "unsettled" not in changed["restore", 3]
    assert changed["backup", 4]["status"] == "failed"
    assert changed["backup", 4]["attempts"] == 2
    assert changed["backup", 4]["finished_at"].endswith("Z")
    assert "not tried again" in changed["backup", 4]["extra"]
    assert await node_of(database, "backup", 2) is None
    # The live node's job is left alone, and nothing is requeued twice.
    assert (await records.read("backup", 1) or {})["status"] == "running"
    assert await records.requeue_dead(LEASE, 2) == []

    # The jobs put back are claimed again, by a live node.
    again = await records.claim("node-a", 5)
    assert sorted((one.kind, one.id) for one in again) == [
        ("backup", 2),
        ("backup", 5),
        ("restore", 3),
    ]
    assert {one.id: one.record["attempts"] for one in again} == {2: 2, 5: 2, 3: 2}


async def test_nodes_requeueing_at_once_change_each_job_once(
    nodes: list[DatabaseRecords],
) -> None:
    await nodes[0].write(
        Put("backup", str(number), job(number, "alice", status="running", attempts=1))
        for number in range(1, 101)
    )
    results = await asyncio.gather(*(records.requeue_dead(LEASE, 2) for records in nodes))
    changed = Counter(one.id for result in results for one in result)
    assert sorted(changed) == list(range(1, 101))
    assert set(changed.values()) == {1}
    assert await nodes[0].counts("backup") == {"pending": 100}


async def test_a_user_whose_turn_another_claim_is_taking_gets_no_second_one_meanwhile(
    records: DatabaseRecords, database_url: str
) -> None:
    # Alice posted 1 and 3, Bob 2. Another node's claim is under way: it has locked the
    # first job of each user it looked at (alice's 1, bob's 2) and will take one of them.
    await queue(
        records, ("backup", job(1, "alice")), ("backup", job(2, "bob")), ("backup", job(3, "alice"))
    )
    async with await psycopg.AsyncConnection.connect(database_url) as other:
        async with other.transaction():
            await other.execute("SELECT 1 FROM jobs WHERE id IN (1, 2) FOR UPDATE")
            # Alice has her turn there, and bob's job may be left: no slot goes to alice.
            assert await records.claim("node-b", 1) == []
        async with other.transaction():
            await other.execute("SELECT 1 FROM jobs WHERE id = 1 FOR UPDATE")
            # Only alice's first job taken there: bob is next.
            assert [(job.id, users_of([job])) for job in await records.claim("node-b", 1)] == [
                (2, ["bob"])
            ]
        async with other.transaction():
            await other.execute("SELECT 1 FROM jobs WHERE id = 1 FOR UPDATE")
            # Nobody else waits: the free slot is not wasted, alice's next job takes it.
            assert [job.id for job in await records.claim("node-b", 1)] == [3]
