"""What runs when: shared repository work (backups, restores) up to `max_running` at
once, and exclusive work (forget, prune, unlock, destroy) only when none runs.

Jobs are taken fairly between users (SPEC §9): the next free slot goes to the user
who has waited longest for a turn, and each user's jobs start first in, first out.
Users with queued jobs stand in one line; the user at its head gets the slot and
goes to its back if more of their jobs wait. A user who had nothing queued joins at
the back. So a user who queues one job waits for at most one job of each other
waiting user, however many those queued. Queuing, taking and removing a job are
O(1) (the job layer queues in ascending sequence), so queuing or cancelling 50,000
jobs costs 50,000 small steps, not 50,000².

Exclusive maintenance never starves users: when a job is waiting, preemptible
maintenance (prune) is interrupted and runs again later.

Shared reads outside the queue (browsing a backup's tree with `restic ls`) go through
`reading`: they wait for exclusive work as a job would, and keep it from starting while
they read, so a browse never meets a prune's exclusive lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("fa_restic.jobs")

JobKey = tuple[str, int]
"""(kind, id) of a backup or restore."""


@dataclass(frozen=True)
class ExclusiveWork:
    """One piece of work that needs the repository to itself."""

    name: str
    run: Callable[[], Coroutine[Any, Any, None]]
    preemptible: bool = False
    still_wanted: Callable[[], bool] | None = None
    """Asked again just before the work runs in a cluster, once the state the nodes share
    is read afresh (another node may have done it meanwhile); None: always wanted."""
    cluster_wide: bool = True
    """In a cluster: needs the repository to itself on every node, not on this one only."""


MaintenancePicker = Callable[[], ExclusiveWork | None]
JobRunner = Callable[[JobKey], Coroutine[Any, Any, None]]
Gate = Callable[[ExclusiveWork], Coroutine[Any, Any, None]]
"""Runs exclusive work once every other node lets it (a cluster, jobs.node); a single
node runs it as it is."""


async def _ungated(work: ExclusiveWork) -> None:
    await work.run()


class _UserQueue:
    """One user's queued jobs in ascending sequence: key -> sequence."""

    __slots__ = ("jobs",)

    def __init__(self) -> None:
        self.jobs: OrderedDict[JobKey, int] = OrderedDict()

    def add(self, key: JobKey, sequence: int) -> None:
        """Adds a job in its place by sequence: O(1) when it is the newest, as it is
        when the job layer enqueues; otherwise O(jobs queued after it)."""
        jobs = self.jobs
        later: list[tuple[JobKey, int]] = []
        while jobs and next(reversed(jobs.values())) > sequence:
            later.append(jobs.popitem(last=True))
        jobs[key] = sequence
        for other, other_sequence in reversed(later):
            jobs[other] = other_sequence


class Scheduler:
    """Starts queued jobs and maintenance; knows nothing of restic or records."""

    def __init__(
        self,
        max_running: int,
        run_job: JobRunner,
        pick_maintenance: MaintenancePicker,
        idle_poll_seconds: float = 30.0,
        gate: Gate = _ungated,
    ) -> None:
        self._max_running = max_running
        self.gate = gate
        self.slot_freed: Callable[[], None] = lambda: None
        """Told when a job ended (a cluster's node claims the next one at once)."""
        self._run_job = run_job
        self._pick_maintenance = pick_maintenance
        self._idle_poll_seconds = idle_poll_seconds
        self._line: OrderedDict[str, _UserQueue] = OrderedDict()
        """Users with queued jobs, the one who has waited longest for a turn first."""
        self._queued: dict[JobKey, str] = {}
        """Every queued job -> its user."""
        self._running: dict[JobKey, asyncio.Task[None]] = {}
        self._exclusive: tuple[ExclusiveWork, asyncio.Task[None]] | None = None
        self._requests: list[tuple[ExclusiveWork, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._paused = False
        self._holds = 0
        self._readers = 0
        """Shared reads in progress (`reading`)."""
        self._reader_waits: list[asyncio.Future[None]] = []
        """Shared reads waiting for exclusive work to end."""

    # -- what the job layer tells it ------------------------------------------------

    def enqueue(self, key: JobKey, sequence: int, user: str) -> None:
        """Queues a job of `user`; a user's jobs start in ascending `sequence`, users take
        turns. A job already queued or running is left as it is."""
        if key in self._queued or key in self._running:
            return
        queue = self._line.get(user)
        if queue is None:
            queue = self._line[user] = _UserQueue()  # joins the line at its back
        queue.add(key, sequence)
        self._queued[key] = user
        self.wake()

    def start_now(self, key: JobKey) -> None:
        """Starts a job at once, outside the line (a cluster's claim: the database gave it
        its turn, and this node has the slot); one already running is left as it is.

        Not queued, so that exclusive work this node is asked for meanwhile cannot hold it
        back while it counts as running for every node (the cluster's gate waits for it)."""
        if key not in self._running:
            self._start_job(key)

    def dequeue(self, key: JobKey) -> bool:
        """Removes a job that has not started; returns False if it was not queued."""
        user = self._queued.pop(key, None)
        if user is None:
            return False
        queue = self._line[user]
        del queue.jobs[key]
        if not queue.jobs:
            del self._line[user]
        return True

    def task_of(self, key: JobKey) -> asyncio.Task[None] | None:
        """Returns the task of a running job, or None."""
        return self._running.get(key)

    @property
    def queued_count(self) -> int:
        return len(self._queued)

    def queued_of(self, user: str) -> int:
        """Returns how many jobs of `user` wait in the queue."""
        queue = self._line.get(user)
        return len(queue.jobs) if queue is not None else 0

    @property
    def running_count(self) -> int:
        return len(self._running)

    @property
    def free_slots(self) -> int:
        """Returns how many more jobs could start now, counting those queued."""
        return max(self._max_running - len(self._running) - len(self._queued), 0)

    @property
    def accepts_jobs(self) -> bool:
        """True when a queued job would start now: no exclusive work runs or waits, no
        hold, not stopped."""
        return not (self._paused or self._holds or self._exclusive or self._requests)

    @property
    def exclusive_name(self) -> str | None:
        return self._exclusive[0].name if self._exclusive else None

    def wake(self) -> None:
        """Makes the loop look again (after new work or a finished job)."""
        self._wake.set()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Starts no job and no maintenance while inside; running work goes on.

        A cancel-all that gives the event loop back between its steps holds the
        scheduler, so that none of the jobs it is about to cancel starts meanwhile.
        """
        self._holds += 1
        try:
            yield
        finally:
            self._holds -= 1
            self.wake()

    def request(self, work: ExclusiveWork) -> asyncio.Future[None]:
        """Queues `work` to run once no job or maintenance runs; new jobs wait meanwhile.

        Returns a future that ends as the work does.
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._requests.append((work, future))
        self.wake()
        return future

    async def exclusive(self, work: ExclusiveWork) -> None:
        """Runs `work` as `request` does and waits for it; raises what the work raised."""
        await self.request(work)

    @contextlib.asynccontextmanager
    async def reading(self) -> AsyncIterator[None]:
        """Shared repository work outside the queue (a browse's `restic ls`).

        Waits while exclusive work runs or is requested (interrupting preemptible
        maintenance, as a waiting job does), then keeps exclusive work from starting
        until the block ends.
        """
        if self._exclusive is None and not self._requests:
            self._readers += 1
        else:
            waiting: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._reader_waits.append(waiting)
            self.wake()
            try:
                await waiting  # `_step` counts this read in as it lets it go
            except BaseException:
                if waiting in self._reader_waits:
                    self._reader_waits.remove(waiting)
                elif not waiting.cancelled():  # let go, then cancelled before it resumed
                    self._readers -= 1
                    self.wake()
                raise
        try:
            yield
        finally:
            self._readers -= 1
            self.wake()

    # -- the loop ---------------------------------------------------------------------

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name="scheduler")

    async def stop(self) -> None:
        """Stops starting work (running work is the caller's to stop)."""
        self._paused = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task

    async def stop_exclusive(self) -> None:
        """Interrupts running maintenance and waits for it."""
        if self._exclusive is not None:
            task = self._exclusive[1]
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self) -> None:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancel
        # that lands as the wake-up does, and `stop` then waited for the idle poll.
        while not self._paused:
            self._wake.clear()
            self._step()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._idle_poll_seconds):
                    await self._wake.wait()

    def _step(self) -> None:
        if self._paused:
            return
        if self._exclusive is not None:
            work, task = self._exclusive
            waiting = self._queued or self._reader_waits
            if waiting and work.preemptible and not task.cancelling():
                log.info("maintenance %s interrupted: a job is waiting", work.name)
                task.cancel()
            return
        if self._requests:
            if not self._running and not self._readers:
                work, future = self._requests.pop(0)
                self._start_exclusive(work, future)
            return
        for waiting_read in self._reader_waits:
            if not waiting_read.done():
                self._readers += 1
                waiting_read.set_result(None)
        self._reader_waits.clear()
        if self._holds:
            return
        while self._line and len(self._running) < self._max_running:
            self._start_job(self._take_turn())
        if not self._running and not self._queued and not self._readers:
            maintenance = self._pick_maintenance()
            if maintenance is not None:
                self._start_exclusive(maintenance, None)

    def _take_turn(self) -> JobKey:
        """Removes and returns the oldest job of the user at the head of the line, who
        goes to the back of the line if more of their jobs wait."""
        user, queue = next(iter(self._line.items()))
        key, _ = queue.jobs.popitem(last=False)
        del self._queued[key]
        if queue.jobs:
            self._line.move_to_end(user)
        else:
            del self._line[user]
        return key

    def _start_job(self, key: JobKey) -> None:
        task = asyncio.create_task(self._run_job(key), name=f"{key[0]}-{key[1]}")
        self._running[key] = task

        def done(_: asyncio.Task[None]) -> None:
            if self._running.get(key) is task:
                del self._running[key]
            self.wake()
            self.slot_freed()

        task.add_done_callback(done)

    def _start_exclusive(self, work: ExclusiveWork, future: asyncio.Future[None] | None) -> None:
        task = asyncio.create_task(self.gate(work), name=f"exclusive-{work.name}")
        self._exclusive = (work, task)

        def done(finished: asyncio.Task[None]) -> None:
            self._exclusive = None
            if future is not None and not future.done():
                if finished.cancelled():
                    future.cancel()
                elif (error := finished.exception()) is not None:
                    future.set_exception(error)
                else:
                    future.set_result(None)
            elif not finished.cancelled() and (error := finished.exception()) is not None:
                log.error("maintenance %s failed: %s", work.name, error)
            self.wake()

        task.add_done_callback(done)
