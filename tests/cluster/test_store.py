"""DatabaseStore: the job layer's Store in PostgreSQL for a node of a cluster, against a
real server.

What the job layer relies on (start, durable writes in order, fetch, pages, counts) is
also run through the whole job layer by tests/jobs on every store; here: what only this
store has (the nodes' locks, this node's jobs at start, outages, counts read in the
background)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
import pytest

from fa_restic.cluster import store as store_module
from fa_restic.cluster.database import DatabaseUnavailable
from fa_restic.cluster.store import DatabaseInUse, DatabaseStore, redact
from fa_restic.jobs.records import LAYOUT
from fa_restic.store import Clear, Delete, Put, StateError, Update
from tests.helpers import free_port
from tests.pg import PostgresServer

pytestmark = pytest.mark.timeout(60)


def job(job_id: int, user: str = "alice", status: str = "pending", **more: Any) -> dict[str, Any]:
    return {"id": job_id, "user": user, "status": status, "sequence": job_id, **more}


def make_store(url: str, node: str = "node-a", **options: Any) -> DatabaseStore:
    return DatabaseStore(url, layout=LAYOUT, node=node, **options)


async def until(check: Callable[[], bool], what: str, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, f"not reached within {limit}s: {what}"
        await asyncio.sleep(0.01)


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[DatabaseStore]:
    started = make_store(database_url, counts_delay=0.05, whole_counts_every=0.0)
    await started.start()
    yield started
    await started.stop()


async def test_start_returns_what_this_node_keeps_in_memory(database_url: str) -> None:
    first = make_store(database_url)
    assert await first.start() == {"backup": {}, "restore": {}, "forget": {}, "meta": {}}
    await first.write(
        [
            Put("backup", "1", job(1, status="success")),
            Put("backup", "2", job(2)),
            Put("backup", "3", job(3)),
            Put("restore", "1", job(1)),
            Put("forget", "ab12", {"snapshot_id": "ab12", "backup_id": 9}),
            Put("meta", "repository", {"destroyed": False}),
        ]
    )
    await first.coordination.beat()
    claimed = {(kind, job_id): record for kind, job_id, record in await first.coordination.claim(3)}
    assert set(claimed) == {("backup", 2), ("backup", 3), ("restore", 1)}
    # One ends with an attempt to settle: still this node's to settle after a restart.
    await first.write([Update("backup", "3", {"status": "failed", "unsettled": True})])
    await first.write([Put("backup", "4", job(4))])  # pending: no node's until claimed
    await first.stop()

    again = make_store(database_url)
    loaded = await again.start()
    try:
        # As StateStore.load with the job layer's layout, for this node's jobs and those of
        # no node (the pending one: a node of a cluster leaves it to the claims); finished
        # jobs stay in the database.
        assert loaded == {
            "backup": {
                "2": claimed[("backup", 2)],
                "3": {**claimed[("backup", 3)], "status": "failed", "unsettled": True},
                "4": job(4),
            },
            "restore": {"1": claimed[("restore", 1)]},
            "forget": {"ab12": {"snapshot_id": "ab12", "backup_id": 9}},
            "meta": {"repository": {"destroyed": False}},
        }
        assert await again.fetch("backup", "1") == job(1, status="success")
        assert await again.fetch("backup", "4") == job(4)
        assert await again.fetch("backup", "5") is None
        assert await again.fetch("backup", "not a number") is None
        # Counts are read at start: a GET /metrics right after it sees every record.
        assert again.counts("backup") == {"success": 1, "running": 1, "failed": 1, "pending": 1}
        assert again.counts("restore") == {"running": 1}

        # Another node loads none of node-a's, only the pending one of no node.
        other = make_store(database_url, node="node-b")
        assert await other.start() == {
            "backup": {"4": job(4)},
            "restore": {},
            "forget": loaded["forget"],
            "meta": loaded["meta"],
        }
        await other.stop()
    finally:
        await again.stop()


async def test_writes_apply_in_order_and_pages_go_newest_first(store: DatabaseStore) -> None:
    await store.write([Put("backup", str(n), job(n, user="ab"[n % 2])) for n in range(1, 8)])
    await store.write(
        [
            Update("backup", "2", {"status": "success"}),
            Update("backup", "99", {"status": "success"}),  # a missing record stays missing
            Delete("backup", "3"),
            Update("backup", "4", {"status": "running"}),
        ]
    )
    assert await store.fetch("backup", "99") is None
    assert [value["id"] for value in await store.fetch_page("backup")] == [7, 6, 5, 4, 2, 1]
    page = await store.fetch_page("backup", owner="b", before=7, limit=2)
    assert [value["id"] for value in page] == [5, 1]
    assert [value["id"] for value in await store.fetch_page("backup", label="success")] == [2]
    # Counts follow shortly after the writes, read in the background.
    await until(
        lambda: store.counts("backup") == {"pending": 4, "success": 1, "running": 1},
        "counts after the writes",
    )
    await store.write([Clear("backup")])
    assert await store.fetch_page("backup") == []
    await until(lambda: store.counts("backup") == {}, "counts after the clear")

    # Many writes at once from many tasks commit in the order they were asked for.
    await asyncio.gather(
        *(store.write([Put("meta", "order", {"n": n})]) for n in range(30)),
    )
    assert await store.fetch("meta", "order") == {"n": 29}


async def test_a_cancelled_writer_does_not_cut_its_write_short(store: DatabaseStore) -> None:
    writing = asyncio.create_task(store.write([Put("backup", "1", job(1))]))
    await asyncio.sleep(0)
    writing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writing
    # The transaction went on by itself: committed whole, or (had it failed) not at all.
    await until(lambda: not store._writes, "the write ended")
    assert await store.fetch("backup", "1") == job(1)


@pytest.fixture
def quick_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused start tries its locks again after 0.05 s, not 0.5 s (the tests stay fast)."""
    monkeypatch.setattr(store_module, "LOCK_RETRY_SECONDS", 0.05)


@pytest.mark.usefixtures("quick_refusal")
async def test_nodes_of_other_names_share_a_database_one_name_runs_once(
    database_url: str,
) -> None:
    # A password in the URL (the throwaway server trusts 127.0.0.1 and ignores it) must not
    # show in the refusal.
    secret_url = database_url.replace("postgresql://fa@", "postgresql://fa:s3cret-pw@")
    first = make_store(secret_url, node="node-a")
    await first.start()
    await first.write([Put("backup", "1", job(1))])
    other = make_store(secret_url, node="node-b")
    await other.start()
    try:
        # Both write, and each reads what the other wrote.
        await other.write([Put("backup", "2", job(2))])
        assert await first.fetch("backup", "2") == job(2)
        assert await other.fetch("backup", "1") == job(1)

        # A second process under a name in use would run that node's jobs as its own.
        twin = make_store(secret_url, node="node-a")
        with pytest.raises(DatabaseInUse) as refused:
            await twin.start()
        message = str(refused.value)
        assert isinstance(refused.value, StateError), "the start stops as on a bad state file"
        assert "node name 'node-a' is in use by fa-restic node-a at " in message, message
        assert "\n" not in message and "s3cret" not in message and "fa:***@" in message
        assert refused.value.holder.startswith("fa-restic node-a at ")
        # The refused process left nothing open, and the nodes go on.
        assert twin._lock is None and twin.database.pool.closed
        await first.write([Put("backup", "3", job(3))])
        assert await other.fetch("backup", "3") == job(3)
    finally:
        await other.stop()

    await first.stop()
    again = make_store(secret_url, node="node-a")
    await again.start()
    await again.stop()


@pytest.mark.usefixtures("quick_refusal")
async def test_work_alone_is_refused_while_a_node_runs_and_keeps_nodes_out(
    database_url: str,
) -> None:
    node = make_store(database_url, node="node-a")
    await node.start()
    try:
        # rebuild-state's store: every running node holds the nodes' lock shared.
        rebuild = make_store(database_url, node="node-a rebuild-state", alone=True)
        with pytest.raises(DatabaseInUse) as refused:
            await rebuild.start()
        assert str(refused.value).startswith("a node (fa-restic node-a at "), refused.value
        assert refused.value.holder.startswith("fa-restic node-a at ")
        assert rebuild._lock is None
    finally:
        await node.stop()

    alone = make_store(database_url, node="node-a rebuild-state", alone=True)
    await alone.start()
    try:
        # A node started meanwhile is refused, and told who holds the database.
        late = make_store(database_url, node="node-b")
        with pytest.raises(DatabaseInUse) as kept_out:
            await late.start()
        assert "fa-restic node-a rebuild-state at " in str(kept_out.value), kept_out.value
        assert "alone" in str(kept_out.value)
    finally:
        await alone.stop()
    late = make_store(database_url, node="node-b")
    await late.start()
    await late.stop()


async def test_an_unreachable_database_stops_the_start_in_one_line() -> None:
    port = free_port()  # nothing listens there
    refused = make_store(f"postgresql://fa:s3cret-pw@127.0.0.1:{port}/x", timeout=1.0)
    with pytest.raises(StateError) as error:
        await refused.start()
    message = str(error.value)
    assert message.startswith(f"database postgresql://fa:***@127.0.0.1:{port}/x: database ")
    assert "\n" not in message and "s3cret" not in message
    assert refused.database.pool.closed


def test_redact_hides_every_spelling_of_a_password() -> None:
    assert redact("postgresql://fa:pw@db:5432/x") == "postgresql://fa:***@db:5432/x"
    assert redact("postgresql://fa@db/x?password=pw&sslmode=require") == (
        "postgresql://fa@db/x?password=***&sslmode=require"
    )
    assert redact("host=db password='p w' dbname=x") == "host=db password=*** dbname=x"
    assert redact("postgresql://fa@db/x") == "postgresql://fa@db/x"


async def test_an_outage_fails_writes_and_the_node_takes_its_lock_again(
    postgres_server: PostgresServer, database_url: str
) -> None:
    node = make_store(database_url, timeout=1.0, watch_seconds=0.1)
    await node.start()
    try:
        await node.write([Put("backup", "1", job(1))])
        assert node.database_state == "ok"
        postgres_server.stop()
        try:
            with pytest.raises(DatabaseUnavailable) as failed:
                await node.write([Put("backup", "1", job(1, status="running"))])
            assert isinstance(failed.value, OSError)
            assert node.database_state.startswith("database unavailable")
            assert "127.0.0.1" not in node.database_state
        finally:
            postgres_server.start()
        # The session that held the node's locks died with the server: the node takes them
        # again, and says so.
        await until(lambda: node.database_state == "ok", "healthy again", limit=20.0)
        await until(lambda: node._lock is not None, "the locks are held again", limit=20.0)
        twin = make_store(database_url, node="node-a")
        with pytest.raises(DatabaseInUse):
            await twin.start()
        # Nothing of the failed write was committed.
        assert await node.fetch("backup", "1") == job(1)
    finally:
        await node.stop()


async def test_a_node_whose_place_was_taken_refuses_to_write(database_url: str) -> None:
    node = make_store(database_url, watch_seconds=0.1)
    await node.start()
    try:
        # Its locks' session ends (an administrator's pg_terminate_backend, a network cut)
        # and another process of its name starts meanwhile: the first must stop writing.
        intruder = make_store(database_url, node="node-a")
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as admin:
            assert node._lock is not None
            await admin.execute("SELECT pg_terminate_backend(%s)", (node._lock.info.backend_pid,))
            await intruder.start()
        try:
            await until(lambda: node.database_state != "ok", "the node notices", limit=10.0)
            assert "another node took this node's place" in node.database_state
            with pytest.raises(DatabaseUnavailable):
                await node.write([Put("backup", "1", job(1))])
            assert await intruder.fetch("backup", "1") is None
        finally:
            await intruder.stop()
        # Once the other process has gone, the locks are this node's again.
        await until(lambda: node.database_state == "ok", "the lock is back", limit=10.0)
        await node.write([Put("backup", "1", job(1))])
    finally:
        await node.stop()


async def test_finished_records_are_counted_now_and_then_live_ones_at_once(
    database_url: str,
) -> None:
    store = make_store(database_url, counts_delay=0.05, whole_counts_every=60.0)
    await store.start()  # counts every status: the next such count is a minute away
    try:
        await store.write([Put("backup", "1", job(1)), Put("backup", "2", job(2))])
        await until(lambda: store.counts("backup") == {"pending": 2}, "pending counted")
        await store.write([Update("backup", "1", {"status": "success"})])
        # The live count follows at once; the finished one waits for its turn.
        await until(lambda: store.counts("backup") == {"pending": 1}, "pending counted again")
        await asyncio.sleep(0.3)
        assert store.counts("backup") == {"pending": 1}
    finally:
        await store.stop()
    again = make_store(database_url, whole_counts_every=60.0)
    await again.start()
    try:
        assert again.counts("backup") == {"pending": 1, "success": 1}
    finally:
        await again.stop()
