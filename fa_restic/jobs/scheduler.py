"""What runs when: shared repository work (backups, restores) up to `max_running` at
once, and exclusive work (forget, prune, unlock, destroy) only when none runs.

Exclusive maintenance never starves users: when a job is waiting, preemptible
maintenance (prune) is interrupted and runs again later.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
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


@dataclass(order=True)
class _Queued:
    sequence: int
    key: JobKey = field(compare=False)


MaintenancePicker = Callable[[], ExclusiveWork | None]
JobRunner = Callable[[JobKey], Coroutine[Any, Any, None]]


class Scheduler:
    """Starts queued jobs and maintenance; knows nothing of restic or records."""

    def __init__(
        self,
        max_running: int,
        run_job: JobRunner,
        pick_maintenance: MaintenancePicker,
        idle_poll_seconds: float = 30.0,
    ) -> None:
        self._max_running = max_running
        self._run_job = run_job
        self._pick_maintenance = pick_maintenance
        self._idle_poll_seconds = idle_poll_seconds
        self._queue: list[_Queued] = []
        self._queued: set[JobKey] = set()
        self._running: dict[JobKey, asyncio.Task[None]] = {}
        self._exclusive: tuple[ExclusiveWork, asyncio.Task[None]] | None = None
        self._requests: list[tuple[ExclusiveWork, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._paused = False

    # -- what the job layer tells it ------------------------------------------------

    def enqueue(self, key: JobKey, sequence: int) -> None:
        """Queues a job; it starts when a slot is free, in ascending `sequence`."""
        if key in self._queued or key in self._running:
            return
        heapq.heappush(self._queue, _Queued(sequence, key))
        self._queued.add(key)
        self.wake()

    def dequeue(self, key: JobKey) -> bool:
        """Removes a job that has not started; returns False if it was not queued."""
        if key not in self._queued:
            return False
        self._queued.discard(key)
        self._queue = [item for item in self._queue if item.key != key]
        heapq.heapify(self._queue)
        return True

    def task_of(self, key: JobKey) -> asyncio.Task[None] | None:
        """Returns the task of a running job, or None."""
        return self._running.get(key)

    @property
    def queued_count(self) -> int:
        return len(self._queued)

    @property
    def running_count(self) -> int:
        return len(self._running)

    @property
    def exclusive_name(self) -> str | None:
        return self._exclusive[0].name if self._exclusive else None

    def wake(self) -> None:
        """Makes the loop look again (after new work or a finished job)."""
        self._wake.set()

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
        while True:
            self._wake.clear()
            self._step()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._idle_poll_seconds)

    def _step(self) -> None:
        if self._paused:
            return
        if self._exclusive is not None:
            work, task = self._exclusive
            if self._queued and work.preemptible and not task.cancelling():
                log.info("maintenance %s interrupted: a job is waiting", work.name)
                task.cancel()
            return
        if self._requests:
            if not self._running:
                work, future = self._requests.pop(0)
                self._start_exclusive(work, future)
            return
        while self._queue and len(self._running) < self._max_running:
            item = heapq.heappop(self._queue)
            self._queued.discard(item.key)
            self._start_job(item.key)
        if not self._running and not self._queued:
            maintenance = self._pick_maintenance()
            if maintenance is not None:
                self._start_exclusive(maintenance, None)

    def _start_job(self, key: JobKey) -> None:
        task = asyncio.create_task(self._run_job(key), name=f"{key[0]}-{key[1]}")
        self._running[key] = task

        def done(_: asyncio.Task[None]) -> None:
            if self._running.get(key) is task:
                del self._running[key]
            self.wake()

        task.add_done_callback(done)

    def _start_exclusive(self, work: ExclusiveWork, future: asyncio.Future[None] | None) -> None:
        task = asyncio.create_task(work.run(), name=f"exclusive-{work.name}")
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
