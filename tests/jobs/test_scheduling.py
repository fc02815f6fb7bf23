# mypy: disable-error-code="comparison-overlap,unreachable"
# (a record's status changes across awaits, by the event loop: mypy's narrowing cannot know)
"""Scheduling through the service: max_running, fairness between users, the per-user cap
(SPEC §9 "Jobs are taken fairly between users")."""

from __future__ import annotations

import asyncio

import pytest

from fa_restic.jobs.errors import JobConflict, UnknownJob
from fa_restic.jobs.intake import Caller
from fa_restic.names import JobKind, JobStatus
from tests.jobs.conftest import ServiceMaker, until

pytestmark = pytest.mark.timeout(5)


async def turns() -> None:
    """Gives the scheduler and the jobs a few turns of the event loop."""
    for _ in range(20):
        await asyncio.sleep(0)


async def test_max_running_is_respected(make_service: ServiceMaker) -> None:
    harness = await make_service(max_running=2)
    restic, scheduler = harness.restic, harness.service.scheduler
    gates = {job_id: restic.hold(f"backup:{job_id}") for job_id in range(1, 6)}
    records = [await harness.backup(f"user{job_id % 2}", job_id) for job_id in range(1, 6)]

    await until(lambda: len(restic.backed_up()) == 2, "two started")
    await turns()
    assert scheduler.running_count == 2 and len(restic.backed_up()) == 2
    assert sum(record.status is JobStatus.PENDING for record in records) == 3
    assert harness.service.health().pending == 3

    first = restic.backed_up()[0]
    gates[first].release()
    await until(lambda: len(restic.backed_up()) == 3, "a third started in the freed slot")
    await turns()
    assert scheduler.running_count == 2 and len(restic.backed_up()) == 3

    for gate in gates.values():
        gate.release()
    for record in records:
        await harness.ended(record)
    assert all(record.status is JobStatus.SUCCESS for record in records)
    assert restic.most_at_once == 2
    assert sorted(restic.backed_up()) == [1, 2, 3, 4, 5]


async def test_a_user_with_one_job_is_not_starved_by_one_with_fifty(
    make_service: ServiceMaker,
) -> None:
    """bob queues 50, then alice 1: alice waits for at most one more of bob's jobs.

    The next free slot goes to the user who has waited longest for a turn: bob had his last
    turn when bob's first job started, before alice came; so bob's second job, then alice's.
    """
    harness = await make_service(max_running=1)
    restic = harness.restic
    first, second = restic.hold("backup:1"), restic.hold("backup:2")
    bobs = [await harness.backup("bob", job_id) for job_id in range(1, 51)]
    await until(first.entered.is_set, "bob's first job runs")
    alices = await harness.backup("alice", 100)

    first.release()
    await until(second.entered.is_set, "the next slot")
    second.release()
    await harness.ended(alices)
    assert restic.backed_up()[:3] == [1, 2, 100]
    for record in bobs:
        await harness.ended(record)
    # First in, first out within a user.
    assert restic.backed_up() == [1, 2, 100, *range(3, 51)]
    assert restic.most_at_once == 1


async def test_users_take_turns(make_service: ServiceMaker) -> None:
    harness = await make_service(max_running=1)
    restic = harness.restic
    blocker = restic.hold("backup:1")
    await harness.backup("carol", 1)
    await until(blocker.entered.is_set)
    # While carol's job runs, three users queue in this order.
    for job_id in (10, 11, 12):
        await harness.backup("alice", job_id)
    for job_id in (20, 21):
        await harness.backup("bob", job_id)
    await harness.backup("dave", 30)
    blocker.release()
    await until(lambda: len(restic.backed_up()) == 7, "all ran")
    await harness.idle()
    assert restic.backed_up() == [1, 10, 20, 30, 11, 21, 12]


async def test_per_user_cap_refuses_with_too_many_pending(make_service: ServiceMaker) -> None:
    harness = await make_service(max_running=1, max_pending_per_user=3)
    service, restic = harness.service, harness.restic
    blocker = restic.hold("backup:1")
    await harness.backup("carol", 1)
    await until(blocker.entered.is_set)

    for job_id in (10, 11, 12):
        await harness.backup("alice", job_id)
    with pytest.raises(JobConflict, match="too many pending jobs"):
        await harness.backup("alice", 13)
    with pytest.raises(UnknownJob):
        await service.get_backup(Caller("alice"), 13)  # a refused job leaves no record
    assert await harness.stored("backup", 13) is None

    # Others have caps of their own; an admin has none.
    await harness.backup("bob", 20)
    for job_id in range(30, 40):
        await harness.backup("root", job_id, admin=True)

    # A cancelled pending job frees its place.
    await service.cancel(Caller("alice"), JobKind.BACKUP, 10)
    await harness.backup("alice", 13)
    with pytest.raises(JobConflict, match="too many pending jobs"):
        await harness.backup("alice", 14)
    assert service.health().pending == 3 + 1 + 10
    blocker.release()


async def test_concurrent_posts_do_not_overshoot_the_cap(make_service: ServiceMaker) -> None:
    harness = await make_service(max_running=1, max_pending_per_user=3)
    blocker = harness.restic.hold("backup:1")
    await harness.backup("carol", 1)
    await until(blocker.entered.is_set)
    hold = asyncio.Event()
    harness.store.holds.extend([hold] * 6)  # every write waits: the POSTs overlap
    posts = [asyncio.create_task(harness.backup("alice", job_id)) for job_id in range(10, 16)]
    await turns()
    hold.set()
    results = await asyncio.gather(*posts, return_exceptions=True)
    accepted = [result for result in results if not isinstance(result, BaseException)]
    refused = [result for result in results if isinstance(result, JobConflict)]
    assert (len(accepted), len(refused)) == (3, 3), results
    blocker.release()
