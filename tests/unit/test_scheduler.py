"""The scheduler alone, with tiny fake jobs: fairness, FIFO, slots, exclusive work (ms each)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from fa_restic.jobs.scheduler import ExclusiveWork, JobKey, Scheduler


class FakeJobs:
    """Jobs that record when they start and end when the test lets them."""

    def __init__(self) -> None:
        self.started: list[JobKey] = []
        self.running: set[JobKey] = set()
        self.most_at_once = 0
        self._release: dict[JobKey, asyncio.Event] = {}

    async def run(self, key: JobKey) -> None:
        self.started.append(key)
        self.running.add(key)
        self.most_at_once = max(self.most_at_once, len(self.running))
        try:
            await self._event(key).wait()
        finally:
            self.running.discard(key)

    def _event(self, key: JobKey) -> asyncio.Event:
        return self._release.setdefault(key, asyncio.Event())

    def finish(self, key: JobKey) -> None:
        self._event(key).set()

    def finish_all(self) -> None:
        for key in list(self.running):
            self.finish(key)

    async def until(self, check: Callable[[], bool], limit: float = 2.0) -> None:
        """Waits until `check()` holds; fails after `limit` seconds."""
        deadline = time.monotonic() + limit
        while not check():
            assert time.monotonic() < deadline, f"not reached; started {self.started}"
            await asyncio.sleep(0.001)


def make(
    max_running: int = 1, maintenance: Callable[[], ExclusiveWork | None] = lambda: None
) -> tuple[Scheduler, FakeJobs]:
    jobs = FakeJobs()
    return Scheduler(max_running, jobs.run, maintenance), jobs


async def settle() -> None:
    """Lets the scheduler loop and the fake jobs take every step they can."""
    for _ in range(10):
        await asyncio.sleep(0)


def exclusive_name(scheduler: Scheduler) -> str | None:
    """`scheduler.exclusive_name`, read through a call: mypy keeps a property's narrowing from
    one assert to the next even across an await, where the scheduler changes it."""
    return scheduler.exclusive_name


async def finish_and_wait(jobs: FakeJobs, key: JobKey) -> None:
    jobs.finish(key)
    await jobs.until(lambda: key not in jobs.running)


async def run_one_at_a_time(scheduler: Scheduler, jobs: FakeJobs, count: int) -> list[JobKey]:
    """Finishes the running job `count` times over; returns the start order."""
    for _ in range(count):
        await jobs.until(lambda: len(jobs.running) == 1)
        (key,) = jobs.running
        await finish_and_wait(jobs, key)
    return jobs.started


async def test_a_user_with_one_job_waits_for_at_most_one_of_anothers_thousand() -> None:
    scheduler, jobs = make(max_running=1)
    for number in range(1000):
        scheduler.enqueue(("backup", number), number, "bob")
    scheduler.enqueue(("backup", 5000), 5000, "alice")
    scheduler.start()
    try:
        started = await run_one_at_a_time(scheduler, jobs, 3)
        assert started[:2] == [("backup", 0), ("backup", 5000)]
        assert started[2] == ("backup", 1)
    finally:
        await scheduler.stop()
        jobs.finish_all()


async def test_users_take_turns_in_the_order_they_began_to_wait() -> None:
    scheduler, jobs = make(max_running=1)
    sequence = 0
    for user, count in (("carol", 3), ("bob", 2), ("alice", 1)):
        for _ in range(count):
            sequence += 1
            scheduler.enqueue(("backup", sequence), sequence, user)
    scheduler.start()
    try:
        started = await run_one_at_a_time(scheduler, jobs, 6)
    finally:
        await scheduler.stop()
        jobs.finish_all()
    # carol 1 2 3, bob 4 5, alice 6: one each in turn, each user's own in order.
    assert [key[1] for key in started] == [1, 4, 6, 2, 5, 3]


async def test_a_user_who_comes_back_joins_the_back_of_the_line() -> None:
    scheduler, jobs = make(max_running=1)
    scheduler.enqueue(("backup", 1), 1, "alice")
    scheduler.enqueue(("backup", 2), 2, "bob")
    scheduler.enqueue(("backup", 3), 3, "bob")
    scheduler.start()
    try:
        await jobs.until(lambda: jobs.started == [("backup", 1)])
        # alice had her turn and nothing else waited: she is behind bob now.
        scheduler.enqueue(("backup", 4), 4, "alice")
        await run_one_at_a_time(scheduler, jobs, 4)
    finally:
        await scheduler.stop()
        jobs.finish_all()
    assert [key[1] for key in jobs.started] == [1, 2, 4, 3]


async def test_fifo_within_a_user_by_sequence_even_if_queued_out_of_order() -> None:
    scheduler, jobs = make(max_running=1)
    for sequence in (10, 11, 13, 12, 14):
        scheduler.enqueue(("restore", sequence), sequence, "alice")
    scheduler.enqueue(("restore", 1), 1, "alice")
    assert scheduler.queued_of("alice") == 6
    scheduler.start()
    try:
        started = await run_one_at_a_time(scheduler, jobs, 6)
    finally:
        await scheduler.stop()
        jobs.finish_all()
    assert [key[1] for key in started] == [1, 10, 11, 12, 13, 14]


async def test_enqueue_twice_and_dequeue() -> None:
    scheduler, jobs = make(max_running=1)
    scheduler.enqueue(("backup", 1), 1, "alice")
    scheduler.enqueue(("backup", 1), 1, "alice")
    scheduler.enqueue(("backup", 2), 2, "alice")
    scheduler.enqueue(("restore", 2), 3, "bob")
    assert scheduler.queued_count == 3
    assert (scheduler.queued_of("alice"), scheduler.queued_of("bob")) == (2, 1)
    assert scheduler.dequeue(("backup", 2))
    assert not scheduler.dequeue(("backup", 2))
    assert scheduler.dequeue(("restore", 2))
    assert not scheduler.dequeue(("restore", 99))
    assert (scheduler.queued_of("alice"), scheduler.queued_of("bob")) == (1, 0)
    scheduler.start()
    try:
        await jobs.until(lambda: jobs.started == [("backup", 1)])
        assert scheduler.queued_count == 0
        assert not scheduler.dequeue(("backup", 1)), "a started job is not queued"
        scheduler.enqueue(("backup", 1), 1, "alice")  # running: left as it is
        assert scheduler.queued_count == 0
        jobs.finish(("backup", 1))
        await jobs.until(lambda: scheduler.running_count == 0)
        await settle()
        assert jobs.started == [("backup", 1)]
    finally:
        await scheduler.stop()
        jobs.finish_all()


async def test_no_more_than_max_running_at_once() -> None:
    scheduler, jobs = make(max_running=3)
    for number in range(10):
        scheduler.enqueue(("backup", number), number, f"user{number % 4}")
    scheduler.start()
    try:
        await jobs.until(lambda: len(jobs.running) == 3)
        await settle()
        assert scheduler.running_count == 3 and scheduler.queued_count == 7
        while len(jobs.started) < 10 or jobs.running:
            jobs.finish_all()
            await settle()
        assert jobs.most_at_once == 3
        assert sorted(key[1] for key in jobs.started) == list(range(10))
    finally:
        await scheduler.stop()
        jobs.finish_all()


async def test_held_starts_nothing_until_released() -> None:
    scheduler, jobs = make(max_running=2)
    scheduler.start()
    try:
        with scheduler.held():
            scheduler.enqueue(("backup", 1), 1, "alice")
            await settle()
            assert jobs.started == []
        await jobs.until(lambda: jobs.started == [("backup", 1)])
    finally:
        await scheduler.stop()
        jobs.finish_all()


async def test_exclusive_work_waits_for_running_jobs_and_holds_new_ones() -> None:
    scheduler, jobs = make(max_running=2)
    ran: list[str] = []
    release = asyncio.Event()

    async def work() -> None:
        ran.append("start")
        assert not jobs.running, "exclusive work began while a job ran"
        await release.wait()
        ran.append("end")

    scheduler.enqueue(("backup", 1), 1, "alice")
    scheduler.start()
    try:
        await jobs.until(lambda: jobs.started == [("backup", 1)])
        done = scheduler.request(ExclusiveWork("forget", work))
        scheduler.enqueue(("backup", 2), 2, "bob")
        await settle()
        assert ran == [] and jobs.started == [("backup", 1)], "a free slot is not taken"
        jobs.finish(("backup", 1))
        await jobs.until(lambda: ran == ["start"])
        assert scheduler.exclusive_name == "forget"
        await settle()
        assert jobs.started == [("backup", 1)], "a job started beside exclusive work"
        release.set()
        await done
        assert ran == ["start", "end"]
        await jobs.until(lambda: jobs.started == [("backup", 1), ("backup", 2)])
    finally:
        await scheduler.stop()
        jobs.finish_all()


async def test_exclusive_work_raises_what_the_work_raised() -> None:
    scheduler, _jobs = make()

    async def broken() -> None:
        raise RuntimeError("no")

    scheduler.start()
    try:
        with pytest.raises(RuntimeError, match="no"):
            await scheduler.exclusive(ExclusiveWork("unlock", broken))
    finally:
        await scheduler.stop()


async def test_preemptible_maintenance_is_interrupted_when_a_job_is_queued() -> None:
    interrupted = asyncio.Event()
    picked: list[str] = []

    async def prune() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            interrupted.set()
            raise

    def pick() -> ExclusiveWork | None:
        if picked:
            return None
        picked.append("prune")
        return ExclusiveWork("prune", prune, preemptible=True)

    scheduler, jobs = make(maintenance=pick)
    scheduler.start()
    try:
        await settle()
        assert scheduler.exclusive_name == "prune"
        scheduler.enqueue(("backup", 1), 1, "alice")
        await asyncio.wait_for(interrupted.wait(), 2)
        await jobs.until(lambda: jobs.started == [("backup", 1)])
    finally:
        await scheduler.stop()
        jobs.finish_all()


async def test_other_maintenance_is_not_interrupted_by_a_job() -> None:
    release = asyncio.Event()
    finished: list[str] = []

    async def forget() -> None:
        await release.wait()
        finished.append("forget")

    picked: list[str] = []

    def pick() -> ExclusiveWork | None:
        if picked:
            return None
        picked.append("forget")
        return ExclusiveWork("forget", forget)

    scheduler, jobs = make(maintenance=pick)
    scheduler.start()
    try:
        await settle()
        assert scheduler.exclusive_name == "forget"
        scheduler.enqueue(("backup", 1), 1, "alice")
        await settle()
        assert jobs.started == [] and scheduler.exclusive_name == "forget"
        release.set()
        await jobs.until(lambda: jobs.started == [("backup", 1)])
        assert finished == ["forget"]
    finally:
        await scheduler.stop()
        jobs.finish_all()


async def test_a_read_waits_for_exclusive_work_and_holds_off_the_next() -> None:
    """A browse's `restic ls` never meets an exclusive lock (the fuzz run's 500)."""
    scheduler, _jobs = make()
    order: list[str] = []
    release = asyncio.Event()

    async def forget() -> None:
        order.append("forget start")
        await release.wait()
        order.append("forget end")

    async def read(name: str, hold: asyncio.Event) -> None:
        async with scheduler.reading():
            order.append(f"{name} start")
            assert scheduler.exclusive_name is None, "a read beside exclusive work"
            await hold.wait()
            order.append(f"{name} end")

    scheduler.start()
    try:
        first = scheduler.request(ExclusiveWork("forget", forget))
        await settle()
        assert order == ["forget start"]
        go_on = asyncio.Event()
        reader = asyncio.create_task(read("read", go_on))
        await settle()
        assert order == ["forget start"], "the read did not wait for the forget"
        release.set()
        await first
        await settle()
        assert order == ["forget start", "forget end", "read start"]
        second = scheduler.request(ExclusiveWork("prune", forget))
        await settle()
        assert order[-1] == "read start", "exclusive work started beside a read"
        go_on.set()
        await reader
        await second
        assert order[-3:] == ["read end", "forget start", "forget end"]
    finally:
        await scheduler.stop()


async def test_a_waiting_read_interrupts_a_prune_and_a_cancelled_one_counts_out() -> None:
    interrupted = asyncio.Event()
    picked: list[str] = []

    async def prune() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            interrupted.set()
            raise

    def pick() -> ExclusiveWork | None:
        if len(picked) == 2:
            return None
        picked.append("prune")
        return ExclusiveWork("prune", prune, preemptible=True)

    scheduler, _jobs = make(maintenance=pick)
    scheduler.start()
    try:
        await settle()
        assert exclusive_name(scheduler) == "prune"
        async with asyncio.timeout(2):
            async with scheduler.reading():
                assert interrupted.is_set() and exclusive_name(scheduler) is None
                await settle()
                assert exclusive_name(scheduler) is None, "maintenance picked during a read"
        await settle()
        assert exclusive_name(scheduler) == "prune", "maintenance not picked after the read"
        # A read cancelled while it waits leaves no count behind: maintenance runs again.
        interrupted.clear()
        waiting = asyncio.create_task(_read_forever(scheduler))
        await asyncio.wait_for(interrupted.wait(), 2)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        await settle()
        assert scheduler._readers == 0
    finally:
        await scheduler.stop()


async def _read_forever(scheduler: Scheduler) -> None:
    async with scheduler.reading():
        await asyncio.Event().wait()


def test_queue_and_dequeue_of_fifty_thousand_is_linear() -> None:
    """Dequeue used to rebuild a heap: a cancel-all of 50,000 took 50,000² steps."""

    async def never(_: JobKey) -> None:
        raise AssertionError("nothing starts: the scheduler is not started")

    scheduler = Scheduler(1, never, lambda: None)
    count = 50_000
    keys = [("backup", number) for number in range(count)]
    started = time.process_time()
    for number, key in enumerate(keys):
        scheduler.enqueue(key, number, f"user{number % 500}")
    assert scheduler.queued_count == count and scheduler.queued_of("user7") == 100
    for key in keys:
        assert scheduler.dequeue(key)
    took = time.process_time() - started
    assert scheduler.queued_count == 0 and scheduler.queued_of("user7") == 0
    # Linear is ~0.1 s even on a busy machine; the old heap rebuild took many minutes.
    assert took < 5, f"{took:.2f}s of CPU for {count} enqueues and dequeues"


@pytest.mark.parametrize("steps", [0, 1, 2, 3])
async def test_stop_is_prompt_when_a_wake_up_lands_with_it(steps: int) -> None:
    """On Python 3.11, asyncio.wait_for could swallow this cancel: stop then took 30 s."""
    scheduler, _jobs = make()
    scheduler.start()
    await settle()
    scheduler.wake()
    for _ in range(steps):
        await asyncio.sleep(0)
    started = time.monotonic()
    stopping = asyncio.create_task(scheduler.stop())
    await asyncio.wait({stopping}, timeout=1)
    assert stopping.done(), "stop waited for the idle poll"
    assert time.monotonic() - started < 1
