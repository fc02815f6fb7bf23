"""Watching a running restic's stderr for the moments the service must step in.

restic can keep running after it has given up: 0.18 hangs for good after a failed pack
upload (a full disk, a backend that stayed down), and restic >= 0.17 retries a backend
operation for 15 minutes with nothing on its command line to shorten that. A Go panic
prints its reason first and then a stack longer than the stderr tail kept for messages.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from fa_restic.restic.errors import (
    GAVE_UP,
    GO_CRASH_PREFIXES,
    RECOVERED,
    RETRYING,
    VANISHED_LOCK,
    ErrorKind,
    ResticError,
    classify,
    clean_line,
)
from fa_restic.restic.messages import ExitError, parse_stderr_line

log = logging.getLogger("fa_restic.restic")

LineHandler = Callable[[str], None]


def is_final_line(line: str) -> bool:
    """True for a stderr line after which restic only cleans up and exits."""
    if GAVE_UP.match(line) or "Fatal: " in line:
        return True
    return isinstance(parse_stderr_line(line), ExitError)


class StderrWatcher:
    """Called with each stderr line of one restic run; stops the run when restic is stuck.

    `watch(task)` names the run to stop. When restic said it gave up (a "failed:" backend
    operation, a "Fatal:" line, an exit_error) and still runs `finish_grace` seconds
    later, or retries a backend for longer than `backend_wait` seconds, the task is
    cancelled and `reason` says why. `crash` keeps a Go panic's first line. `close` ends
    the timers.
    """

    def __init__(
        self, finish_grace: float | None, backend_wait: float, forward: LineHandler | None
    ) -> None:
        self._finish_grace = finish_grace
        self._backend_wait = backend_wait
        self._forward = forward
        self._task: asyncio.Future[Any] | None = None
        self._final_line: str | None = None
        self._retrying_line = ""
        self._final_timer: asyncio.TimerHandle | None = None
        self._backend_timer: asyncio.TimerHandle | None = None
        self.crash: str | None = None
        self.reason: ResticError | None = None

    def watch(self, task: asyncio.Future[Any]) -> None:
        self._task = task

    def __call__(self, line: str) -> None:
        if self.crash is None and line.startswith(GO_CRASH_PREFIXES):
            self.crash = line
        if self._finish_grace is not None and self._final_line is None and is_final_line(line):
            self._final_line = line
            self._final_timer = self._later(self._finish_grace, self._gave_up)
        if VANISHED_LOCK.match(line):
            # Not an outage: the lock is gone for good. Run again, restic lists the locks
            # anew (LOCKED is retried by the job layer).
            log.info("restic stopped: it keeps reading a lock file that was removed")
            message = "a lock file was removed while restic read it; trying again"
            self._stop(ResticError(ErrorKind.LOCKED, message, None))
        elif self._backend_wait > 0 and RETRYING in line:
            self._retrying_line = line
            if self._backend_timer is None:
                self._backend_timer = self._later(self._backend_wait, self._backend_down)
        elif RECOVERED in line and self._backend_timer is not None:
            self._backend_timer.cancel()
            self._backend_timer = None
        if self._forward is not None:
            self._forward(line)

    def close(self) -> None:
        for timer in (self._final_timer, self._backend_timer):
            if timer is not None:
                timer.cancel()

    @staticmethod
    def _later(delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        return asyncio.get_running_loop().call_later(delay, callback)

    def _stop(self, reason: ResticError) -> None:
        if self._task is not None and not self._task.done() and self.reason is None:
            self.reason = reason
            self._task.cancel()

    def _gave_up(self) -> None:
        line = self._final_line or ""
        log.warning(
            "restic still running %.0fs after it gave up, stopped: %s",
            self._finish_grace or 0,
            clean_line(line),
        )
        given = classify(1, [line])
        self._stop(ResticError(given.kind, given.message, None))

    def _backend_down(self) -> None:
        message = clean_line(
            f"backend unreachable for {self._backend_wait:.0f}s: {self._retrying_line}"
        )
        log.warning("restic stopped: %s", message)
        self._stop(ResticError(ErrorKind.BACKEND, message, None))
