# mypy: disable-error-code="comparison-overlap,unreachable"
# (a record's status changes across awaits, by other tasks: mypy's narrowing cannot know)
"""Two nodes of a cluster in one process (SPEC §10): JobServices on one real PostgreSQL, each
with its own fake restic, its claims, cancels and exclusive work through the database.

What a real cluster adds (processes, SIGKILL, the real restic) is in
tests/integration/test_cluster_nodes.py; here the job layer's rules, in about a second each.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest

from fa_restic.cluster.store import DatabaseStore
from fa_restic.jobs.errors import Busy, JobConflict
from fa_restic.jobs.intake import Caller
from fa_restic.jobs.models import BackupRecord
from fa_restic.jobs.records import LAYOUT
from fa_restic.jobs.scheduler import ExclusiveWork
from fa_restic.jobs.service import JobService
from fa_restic.metrics import Metrics
from fa_restic.names import JobKind, JobStatus, home_of
from tests.jobs.conftest import options_for, until
from tests.jobs.fake_restic import FakeRestic, Gate

pytestmark = pytest.mark.timeout(30)

ALICE = Caller("alice")
BOB = Caller("bob")
ROOT = Caller("root", admin=True)
LEASE = 2.0
WAIT = 8.0
"""Claims and cancels pass through the nodes' one-second loops."""


@dataclass
class Node:
    name: str
    service: JobService
    restic: FakeRestic
    store: DatabaseStore

    async def backup(self, caller: Caller, backup_id: int, data_root: Path) -> BackupRecord:
        folder = home_of(data_root, caller.user) / "docs"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "a.txt").write_text("a\n")
        return await self.service.submit_backup(caller, backup_id, folder)

    async def status(self, kind: JobKind, job_id: int) -> JobStatus:
        record = await self.service.records.get((kind, job_id))
        assert record is not None
        return record.status

    def runs(self, job_id: int) -> bool:
        return self.service.scheduler.task_of((JobKind.BACKUP, job_id)) is not None


NodeMaker = Callable[..., Awaitable[Node]]


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = (tmp_path / "data").resolve()
    (root / "users").mkdir(parents=True)
    return root


@pytest.fixture
async def make_node(database_url: str, data_root: Path) -> AsyncIterator[NodeMaker]:
    made: list[Node] = []

    async def make(name: str, **options: object) -> Node:
        store = DatabaseStore(
            database_url, layout=LAYOUT, node=name, counts_delay=0.01, lease_seconds=LEASE
        )
        restic = FakeRestic()
        service = JobService(
            options_for(data_root, lease_seconds=LEASE, **options),
            store,
            restic,
            Metrics(str(restic.version)),
            store.coordination,
        )
        service.load(await store.start())
        await service.start()
        node = Node(name, service, restic, store)
        made.append(node)
        await until(lambda: service.scheduler.exclusive_name != "startup", "start-up", WAIT)
        return node

    yield make
    for node in made:
        await node.service.stop()


async def wait_for(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"not reached: {what}"
        await asyncio.sleep(0.02)


def held(nodes: list[Node], key: str) -> list[Gate]:
    return [node.restic.hold(key) for node in nodes]


def release(gates: dict[int, list[Gate]]) -> None:
    for node_gates in gates.values():
        for gate in node_gates:
            gate.release()


async def held_running(node: Node, backup_id: int, data_root: Path) -> Gate:
    """Posts alice's backup `backup_id` on `node` and returns the gate holding its restic,
    once it runs there (the test gives no other node a slot)."""
    (gate,) = held([node], f"backup:{backup_id}")
    await node.backup(ALICE, backup_id, data_root)
    await until(gate.entered.is_set, f"backup {backup_id} runs on {node.name}", WAIT)
    return gate


async def test_a_job_posted_on_one_node_is_seen_and_run_by_the_cluster(
    make_node: NodeMaker, data_root: Path
) -> None:
    a, b = await make_node("a"), await make_node("b")
    record = await a.backup(ALICE, 1, data_root)
    assert record.status is JobStatus.PENDING
    seen = await b.service.get(ALICE, JobKind.BACKUP, 1)
    assert (seen.id, seen.user, seen.status) == (1, "alice", JobStatus.PENDING)

    await wait_for(lambda: _is(b, 1, JobStatus.SUCCESS), "backup 1 succeeded, as any node sees it")
    assert (await a.status(JobKind.BACKUP, 1)) is JobStatus.SUCCESS
    ran = a.restic.backed_up() + b.restic.backed_up()
    assert ran == [1], "exactly one node ran it, once"


async def _is(node: Node, job_id: int, status: JobStatus) -> bool:
    return (await node.status(JobKind.BACKUP, job_id)) is status


async def test_one_id_posted_on_two_nodes_at_once_is_accepted_once(
    make_node: NodeMaker, data_root: Path
) -> None:
    a, b = await make_node("a"), await make_node("b")
    results = await asyncio.gather(
        a.backup(ALICE, 7, data_root), b.backup(BOB, 7, data_root), return_exceptions=True
    )
    accepted = [r for r in results if isinstance(r, BackupRecord)]
    refused = [r for r in results if isinstance(r, JobConflict)]
    assert len(accepted) == 1 and len(refused) == 1, results
    winner = accepted[0].user
    assert (await b.service.records.backup(7)).user == winner  # type: ignore[union-attr]


async def test_each_node_claims_at_most_its_slots_and_every_node_takes_some(
    make_node: NodeMaker, data_root: Path
) -> None:
    a, b = await make_node("a", max_running=1), await make_node("b", max_running=1)
    gates = {job_id: held([a, b], f"backup:{job_id}") for job_id in (1, 2, 3)}
    for job_id, caller in ((1, ALICE), (2, BOB), (3, ALICE)):
        await a.backup(caller, job_id, data_root)
    await until(lambda: a.service.scheduler.running_count == 1, "a runs one", WAIT)
    await until(lambda: b.service.scheduler.running_count == 1, "b runs one", WAIT)
    await asyncio.sleep(1.5)  # a few loops of both nodes: neither takes a second job
    assert (a.service.scheduler.running_count, b.service.scheduler.running_count) == (1, 1)
    assert (await a.status(JobKind.BACKUP, 3)) is JobStatus.PENDING
    # Fair between users: alice's second job waits for bob's first.
    running = {job_id for job_id in (1, 2, 3) if a.runs(job_id) or b.runs(job_id)}
    assert running == {1, 2}
    release(gates)
    for job_id in (1, 2, 3):
        await wait_for(partial(_is, a, job_id, JobStatus.SUCCESS), f"backup {job_id} ok")


async def test_a_job_running_on_one_node_is_cancelled_from_the_other(
    make_node: NodeMaker, data_root: Path
) -> None:
    a, b = await make_node("a"), await make_node("b", max_running=0)
    gate = await held_running(a, 1, data_root)

    started = asyncio.get_running_loop().time()
    cancelled = await b.service.cancel(ALICE, JobKind.BACKUP, 1)
    took = asyncio.get_running_loop().time() - started
    assert cancelled.status is JobStatus.CANCEL and cancelled.extra == "cancelled by alice"
    assert gate.interrupted and took < 5.0, took
    await until(lambda: not a.runs(1), "backup 1's task ended on a")


async def test_a_pending_job_is_cancelled_from_any_node_and_never_runs(
    make_node: NodeMaker, data_root: Path
) -> None:
    a = await make_node("a", max_running=1)
    b = await make_node("b", max_running=0)
    gate = await held_running(a, 1, data_root)
    await b.backup(ALICE, 2, data_root)  # waits: a's one slot is taken, b has none

    cancelled = await b.service.cancel(ALICE, JobKind.BACKUP, 2)
    assert cancelled.status is JobStatus.CANCEL
    assert cancelled.extra == "cancelled by alice before it started"
    gate.release()
    await wait_for(lambda: _is(a, 1, JobStatus.SUCCESS), "backup 1 ok")
    await asyncio.sleep(1.2)
    assert a.restic.backed_up() == [1]
    with pytest.raises(JobConflict):
        await a.service.cancel(ALICE, JobKind.BACKUP, 1)


async def test_cancel_all_reaches_every_node_and_only_the_callers_jobs(
    make_node: NodeMaker, data_root: Path
) -> None:
    a, b = await make_node("a", max_running=1), await make_node("b", max_running=1)
    gates = {job_id: held([a, b], f"backup:{job_id}") for job_id in (1, 2, 3, 4)}
    for job_id, caller in ((1, ALICE), (2, ALICE), (3, ALICE), (4, BOB)):
        await a.backup(caller, job_id, data_root)
    await until(lambda: a.service.scheduler.running_count == 1, "a runs one", WAIT)
    await until(lambda: b.service.scheduler.running_count == 1, "b runs one", WAIT)

    cancelled = await b.service.cancel_all(ALICE, JobKind.BACKUP)
    statuses = {job_id: await a.status(JobKind.BACKUP, job_id) for job_id in (1, 2, 3, 4)}
    assert all(statuses[job_id] is JobStatus.CANCEL for job_id in (1, 2, 3)), statuses
    assert sorted(cancelled) == [1, 2, 3]
    assert statuses[4] is not JobStatus.CANCEL
    release(gates)
    await wait_for(lambda: _is(b, 4, JobStatus.SUCCESS), "bob's backup ok")


async def test_cancel_all_on_the_running_node_leaves_its_freed_slot_nothing_to_claim(
    make_node: NodeMaker, data_root: Path
) -> None:
    """The cluster's queue is emptied before this node's jobs stop: else the slot the
    stopped job frees claims a waiting job, which nobody asks this node to cancel."""
    a = await make_node("a", max_running=1)
    b = await make_node("b", max_running=0)
    await held_running(a, 1, data_root)
    await b.backup(BOB, 2, data_root)  # waits for a's one slot; would succeed at once

    cancelled = await a.service.cancel_all(ROOT, JobKind.BACKUP)

    assert sorted(cancelled) == [1, 2]
    await asyncio.sleep(1.5)  # a's loops would have claimed it by now
    assert (await b.status(JobKind.BACKUP, 2)) is JobStatus.CANCEL
    assert a.restic.backed_up() == [1], "backup 2 never ran"


async def test_exclusive_work_waits_for_the_jobs_of_every_node(
    make_node: NodeMaker, data_root: Path
) -> None:
    a, b = await make_node("a"), await make_node("b", max_running=0)
    gate = await held_running(a, 1, data_root)

    ran: list[bool] = []

    async def work() -> None:
        ran.append(a.runs(1))  # True: it overlapped the job on a

    waiting = b.service.scheduler.request(ExclusiveWork("check", work))
    await asyncio.sleep(1.5)
    assert ran == [], "exclusive work began while a job ran on another node"
    gate.release()
    await asyncio.wait_for(waiting, WAIT)
    assert ran == [False]
    await a.backup(ALICE, 2, data_root)  # claims go on once it is over
    await wait_for(lambda: _is(a, 2, JobStatus.SUCCESS), "backup 2 ok")


async def test_a_dead_nodes_job_runs_again_elsewhere_after_its_lease(
    make_node: NodeMaker, data_root: Path
) -> None:
    a, b = await make_node("a", max_running=1), await make_node("b", max_running=1)
    gates = held([a, b], "backup:1")
    await a.backup(ALICE, 1, data_root)
    await until(lambda: any(gate.entered.is_set() for gate in gates), "backup 1 runs", WAIT)
    dead, alive = (a, b) if gates[0].entered.is_set() else (b, a)
    gates[1 if dead is a else 0].release()  # the survivor's run will not be held
    # The node dies: its loop, its job and its database connections stop without a word.
    assert dead.service.node is not None
    await dead.service.node.stop()
    task = dead.service.scheduler.task_of((JobKind.BACKUP, 1))
    assert task is not None
    await dead.store.stop()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)

    await wait_for(lambda: _is(alive, 1, JobStatus.SUCCESS), "backup 1 ran again elsewhere")
    record = await alive.service.records.backup(1)
    assert record is not None and record.attempts == 2
    assert alive.restic.backed_up() == [1]


async def test_a_browse_and_another_nodes_exclusive_work_keep_apart(
    make_node: NodeMaker, data_root: Path
) -> None:
    a, b = await make_node("a", max_running=0), await make_node("b")
    for backup_id in (1, 2):
        await b.backup(ALICE, backup_id, data_root)
        await wait_for(partial(_is, b, backup_id, JobStatus.SUCCESS), f"backup {backup_id} ok")
    assert b.service.node is not None
    b.service.node.read_wait = 0.5

    # While a node does exclusive work a browse on another waits, then answers busy.
    async with a.store.coordination.exclusive():
        with pytest.raises(Busy, match="busy with maintenance on another node"):
            await b.service.files(ALICE, 1, "", after=None, limit=10)
    assert b.restic.calls_of("ls") == []
    await b.service.files(ALICE, 1, "", after=None, limit=10)
    assert len(b.restic.calls_of("ls")) == 1, "read once the exclusive work ended"

    # While a browse reads the repository no node begins exclusive work.
    gate = b.restic.hold("ls")
    reading = asyncio.create_task(b.service.files(ALICE, 2, "", after=None, limit=10))
    await until(gate.entered.is_set, "the browse's ls runs", WAIT)
    entered = asyncio.Event()

    async def exclusive() -> None:
        async with a.store.coordination.exclusive():
            entered.set()

    taking = asyncio.create_task(exclusive())
    await asyncio.sleep(0.8)
    assert not entered.is_set(), "exclusive work began during a read on another node"
    gate.release()
    assert (await reading).path == ""
    await asyncio.wait_for(taking, WAIT)
