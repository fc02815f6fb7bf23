"""The cluster's gate held shared for reads (a browse's `restic ls`) against a real PostgreSQL:
every read under way on one node shares one connection (SPEC §9: one user opening many
browses must not use up the server's connections), and exclusive work on another node still
waits for the last of them, and only for as long as they last."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from fa_restic.cluster.coordination import DatabaseCoordination
from fa_restic.cluster.database import Database, DatabaseUnavailable
from fa_restic.cluster.records import GATE_LOCK, DatabaseRecords
from tests.helpers import eventually, free_port

pytestmark = pytest.mark.timeout(30)

LEASE = 30.0
READS = 20


@pytest.fixture
async def node_a(
    database: Database, records: DatabaseRecords, database_url: str
) -> DatabaseCoordination:
    return DatabaseCoordination(database, records, "node-a", database_url, LEASE)


@pytest.fixture
async def node_b(database_url: str) -> AsyncIterator[DatabaseCoordination]:
    """Another node: a pool of its own on the same database."""
    async with Database(database_url) as other:
        yield DatabaseCoordination(other, DatabaseRecords(other), "node-b", database_url, LEASE)


async def read_connections(database: Database, node: str = "node-a") -> list[int]:
    """Returns the server pids of `node`'s connections for reads, seen from another one."""
    async with database.connection() as connection:
        cursor = await connection.execute(
            "SELECT pid FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = %s ORDER BY pid",
            (f"fa-restic {node} read",),
        )
        return [int(pid) for (pid,) in await cursor.fetchall()]


async def none_left(database: Database) -> None:
    """Waits until node-a has no connection for reads left (a closed session leaves
    pg_stat_activity a moment after its client went)."""
    await eventually(lambda: read_connections(database), lambda pids: pids == [], timeout=2)


class Reads:
    """Reads on one node that stay inside until let out; how each ended is kept."""

    def __init__(self, coordination: DatabaseCoordination) -> None:
        self.coordination = coordination
        self.inside = 0
        self.tasks: list[asyncio.Task[bool]] = []

    def start(self, count: int = 1, wait: float = 10.0) -> list[asyncio.Event]:
        """Starts `count` reads waiting up to `wait` seconds; returns what lets each out."""
        exits = [asyncio.Event() for _ in range(count)]
        self.tasks += [asyncio.create_task(self._read(wait, out)) for out in exits]
        return exits

    async def _read(self, wait: float, out: asyncio.Event) -> bool:
        async with self.coordination.reading(wait) as held:
            if held:
                self.inside += 1
                try:
                    await out.wait()
                finally:
                    self.inside -= 1
            return held

    async def all_inside(self, count: int) -> None:
        await eventually(lambda: asyncio.sleep(0, self.inside), lambda n: n == count, timeout=3)


async def entered(coordination: DatabaseCoordination, inside: asyncio.Event) -> None:
    """Holds `coordination`'s exclusive lock until cancelled, saying when it has it."""
    async with coordination.exclusive():
        inside.set()
        await asyncio.sleep(60)


async def stop(exclusive: asyncio.Task[None]) -> None:
    """Ends an `entered` block, waiting until it let go of the lock."""
    exclusive.cancel()
    with pytest.raises(asyncio.CancelledError):
        await exclusive


async def test_reads_under_way_on_a_node_share_one_connection(
    node_a: DatabaseCoordination, database: Database
) -> None:
    reads = Reads(node_a)
    # Half start together (they wait for one attempt), half come once it is held (they join).
    exits = reads.start(READS // 2)
    await reads.all_inside(READS // 2)
    exits += reads.start(READS - READS // 2)
    await reads.all_inside(READS)

    pids = await read_connections(database)
    assert len(pids) == 1, pids
    async with database.connection() as connection:
        cursor = await connection.execute(
            "SELECT pid, mode, granted FROM pg_locks WHERE locktype = 'advisory'"
            " AND objid = (%s::bigint & 4294967295) AND database = (SELECT oid FROM"
            " pg_database WHERE datname = current_database())",
            (GATE_LOCK,),
        )
        assert await cursor.fetchall() == [(pids[0], "ShareLock", True)]

    for out in exits:
        out.set()
    assert await asyncio.wait_for(asyncio.gather(*reads.tasks), timeout=5) == [True] * READS
    await none_left(database)


async def test_exclusive_work_waits_for_the_last_read_and_then_goes_at_once(
    node_a: DatabaseCoordination, node_b: DatabaseCoordination, database: Database
) -> None:
    reads = Reads(node_a)
    exits = reads.start(READS)
    await reads.all_inside(READS)

    inside = asyncio.Event()
    exclusive = asyncio.create_task(entered(node_b, inside))
    try:
        for out in exits[:-1]:
            out.set()
            await asyncio.sleep(0.01)
        await reads.all_inside(1)
        # Well past a try of the gate (every 0.2 s): one read inside still keeps it out.
        await asyncio.sleep(0.5)
        assert not inside.is_set()
        assert len(await read_connections(database)) == 1

        loop = asyncio.get_running_loop()
        left = loop.time()
        exits[-1].set()
        await asyncio.wait_for(inside.wait(), timeout=3)
        waited = loop.time() - left
        assert waited < 1.0, waited
    finally:
        await stop(exclusive)
    assert await asyncio.gather(*reads.tasks) == [True] * READS
    await none_left(database)


async def test_reads_wait_for_exclusive_work_each_until_its_own_deadline(
    node_a: DatabaseCoordination, node_b: DatabaseCoordination, database: Database
) -> None:
    loop = asyncio.get_running_loop()
    inside = asyncio.Event()
    exclusive = asyncio.create_task(entered(node_b, inside))
    await asyncio.wait_for(inside.wait(), timeout=3)

    # A read alone gives up after its wait, holding nothing.
    began = loop.time()
    async with node_a.reading(0.3) as held:
        assert held is False
    assert 0.3 <= loop.time() - began < 1.0
    await none_left(database)

    # Two waiting at once, on one connection: the shorter gives up, the other waits on.
    reads = Reads(node_a)
    reads.start(wait=0.3)
    [out] = reads.start(wait=5.0)
    short, long = reads.tasks
    await asyncio.sleep(0.1)
    assert len(await read_connections(database)) == 1
    assert await asyncio.wait_for(short, timeout=2) is False
    await asyncio.sleep(0.3)
    assert not long.done() and reads.inside == 0

    # node-b's work ends within the other's wait: that read gets the gate.
    await stop(exclusive)
    await reads.all_inside(1)
    out.set()
    assert await long is True
    await none_left(database)


async def test_cancelled_reads_leave_nothing_held(
    node_a: DatabaseCoordination, node_b: DatabaseCoordination, database: Database
) -> None:
    inside = asyncio.Event()
    exclusive = asyncio.create_task(entered(node_b, inside))
    await asyncio.wait_for(inside.wait(), timeout=3)
    # Cancelled while waiting for node-b's work to end.
    reads = Reads(node_a)
    reads.start(wait=10.0)
    await eventually(lambda: read_connections(database), lambda pids: len(pids) == 1, timeout=2)
    reads.tasks[0].cancel()
    with pytest.raises(asyncio.CancelledError):
        await reads.tasks[0]
    await none_left(database)
    await stop(exclusive)

    # Cancelled while inside, beside one that ends as usual and one that raises.
    reads = Reads(node_a)
    reads.start(2)
    await reads.all_inside(2)

    async def raising() -> None:
        async with node_a.reading(1.0) as held:
            assert held
            raise RuntimeError("inside")

    with pytest.raises(RuntimeError, match="inside"):
        await raising()
    reads.tasks[0].cancel()
    with pytest.raises(asyncio.CancelledError):
        await reads.tasks[0]
    assert len(await read_connections(database)) == 1, "one read is still inside"
    reads.tasks[1].cancel()
    with pytest.raises(asyncio.CancelledError):
        await reads.tasks[1]

    inside.clear()
    exclusive = asyncio.create_task(entered(node_b, inside))
    await asyncio.wait_for(inside.wait(), timeout=1)
    await stop(exclusive)
    await none_left(database)
    # And the node reads again afterwards.
    async with node_a.reading(1.0) as held:
        assert held is True


async def test_a_read_after_the_connection_was_lost_takes_a_new_one(
    node_a: DatabaseCoordination, node_b: DatabaseCoordination, database: Database
) -> None:
    reads = Reads(node_a)
    exits = reads.start()
    await reads.all_inside(1)
    [lost] = await read_connections(database)
    async with database.connection() as connection:
        await connection.execute("SELECT pg_terminate_backend(%s)", (lost,))
    await none_left(database)

    # The lock went with the session: a new read takes the gate again on a connection of
    # its own rather than join the lost one, and keeps node-b's exclusive work out.
    exits += reads.start()
    await reads.all_inside(2)
    [new] = await read_connections(database)
    assert new != lost
    inside = asyncio.Event()
    exclusive = asyncio.create_task(entered(node_b, inside))
    await asyncio.sleep(0.5)
    assert not inside.is_set()

    for out in exits:
        out.set()
    assert await asyncio.gather(*reads.tasks) == [True, True]
    await asyncio.wait_for(inside.wait(), timeout=1)
    await stop(exclusive)
    await none_left(database)


async def test_reads_on_an_unreachable_database_are_database_unavailable(
    database: Database, records: DatabaseRecords
) -> None:
    url = f"postgresql://fa@127.0.0.1:{free_port()}/x"
    nowhere = DatabaseCoordination(database, records, "node-a", url, LEASE)

    async def read() -> bool:
        async with nowhere.reading(1.0) as held:
            return held

    results = await asyncio.gather(*(read() for _ in range(3)), return_exceptions=True)
    assert all(isinstance(result, DatabaseUnavailable) for result in results), results
    # Nothing kept from the failed attempt: the next read tries again (and fails again)
    # rather than wait for an attempt that is over.
    with pytest.raises(DatabaseUnavailable):
        await asyncio.wait_for(read(), timeout=5)
