"""The only place that starts restic.

Each restic runs without a shell in its own process group, dies with the
service (PR_SET_PDEATHSIG), and is stopped politely: SIGINT (restic removes its
lock), then SIGTERM, then SIGKILL after a grace period. stderr is kept as a
bounded tail for error messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("fa_restic.restic")

STDERR_TAIL_LINES = 40
LINE_LIMIT = 1 << 20
_PR_SET_PDEATHSIG = 1
# Inherited variables that must not reach restic: ours, and restic's own settings
# (a stray RESTIC_PASSWORD would silently override the configured one).
_WITHHELD_PREFIXES = ("RESTIC_", "FA_")

LineHandler = Callable[[str], None]
StartHandler = Callable[[int], Awaitable[None]]


@dataclass(frozen=True)
class Completed:
    """How a restic run ended."""

    exit_code: int
    stdout: str
    stderr_tail: tuple[str, ...]


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    libc = ctypes.CDLL(None, use_errno=True)

    def prepare() -> None:  # runs in the child between fork and exec
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGINT, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return prepare


def child_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """Returns this process's environment without our and restic's settings, plus `extra`."""
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith(_WITHHELD_PREFIXES)
    }
    environment.update(extra)
    return environment


def stat_fields(stat_file: str | Path) -> list[str] | None:
    """Returns the fields of a /proc stat file (`/proc/<pid>/stat`, or a thread's) after
    the command's name, the state first and the parent's pid next; None if it is gone."""
    try:
        stat = Path(stat_file).read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses; fields after it are fixed.
    return stat.rsplit(")", 1)[1].split()


def process_start_ticks(pid: int) -> int | None:
    """Returns a process's start time in clock ticks since boot (to tell a pid reused), or None."""
    fields = stat_fields(f"/proc/{pid}/stat")
    if fields is None or fields[0] == "Z":  # gone, or dead and waiting to be reaped
        return None
    return int(fields[19])


def kill_leftover(pid: int, start_ticks: int | None) -> bool:
    """SIGKILLs the process group of a restic a dead predecessor left; returns True if it did."""
    if start_ticks is None or process_start_ticks(pid) != start_ticks:
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
        return True
    return False


async def _pump(
    stream: asyncio.StreamReader, handler: LineHandler | None, tail: deque[str] | None
) -> None:
    while True:
        try:
            raw = await stream.readline()
        except ValueError:  # a line beyond LINE_LIMIT: skip it rather than fail the job
            await stream.read(LINE_LIMIT)
            continue
        if not raw:
            return
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if tail is not None:
            tail.append(line)
        if handler is not None:
            handler(line)


class ResticProcess:
    """A started restic; `wait` returns how it ended, `stop` interrupts it."""

    def __init__(self, process: asyncio.subprocess.Process, grace_seconds: float) -> None:
        self._process = process
        self._grace_seconds = grace_seconds

    @property
    def pid(self) -> int:
        return self._process.pid

    async def stop(self) -> bool:
        """Interrupts restic: SIGINT, then SIGTERM and SIGKILL if it outlives the grace period.

        Returns True if it took more than SIGINT (restic then may have left its lock).
        """
        forced = False
        for sig, wait in (
            (signal.SIGINT, self._grace_seconds),
            (signal.SIGTERM, 1.0),
            (signal.SIGKILL, 5.0),
        ):
            if self._process.returncode is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, sig)
            log.info("restic pid=%d sent %s", self._process.pid, sig.name)
            forced = sig is not signal.SIGINT
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._process.wait(), wait)
        return forced


async def _spawn(
    argv: Sequence[str], environment: Mapping[str, str], cwd: Path | None
) -> asyncio.subprocess.Process:
    """Starts restic without a shell, in its own session, dying with the service."""
    log.debug("restic start: %s", " ".join(argv))
    return await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
        env=child_environment(environment),
        start_new_session=True,
        preexec_fn=_die_with_parent(os.getpid()),
        limit=LINE_LIMIT,
    )


async def run(
    argv: Sequence[str],
    environment: Mapping[str, str],
    *,
    cwd: Path | None = None,
    on_stdout: LineHandler | None = None,
    on_stderr: LineHandler | None = None,
    on_start: StartHandler | None = None,
    grace_seconds: float = 3.0,
    after_forced_stop: Callable[[], Awaitable[None]] | None = None,
) -> Completed:
    """Runs restic to its end and returns how it ended.

    stdout goes line by line to `on_stdout`, or is collected into `Completed.stdout`
    when there is no handler. Cancelling the caller stops restic (SIGINT first) and
    waits for it before the CancelledError goes on; if restic had to be killed,
    `after_forced_stop` runs first (to remove the lock it left). Raises OSError if
    restic cannot be started.
    """
    process = await _spawn(argv, environment, cwd)
    handle = ResticProcess(process, grace_seconds)
    assert process.stdout is not None and process.stderr is not None
    tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
    collected: list[bytes] = []

    async def collect(stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(1 << 16):
            collected.append(chunk)

    readers = asyncio.gather(
        _pump(process.stdout, on_stdout, None) if on_stdout else collect(process.stdout),
        _pump(process.stderr, on_stderr, tail),
    )
    try:
        if on_start is not None:
            await on_start(process.pid)
        await readers
        exit_code = await process.wait()
    except BaseException:
        forced = await asyncio.shield(handle.stop())
        readers.cancel()
        with contextlib.suppress(BaseException):
            await readers
        if forced and after_forced_stop is not None:
            log.warning("restic pid=%d needed more than SIGINT to stop", process.pid)
            await asyncio.shield(after_forced_stop())
        raise
    log.debug("restic pid=%d exit=%d", process.pid, exit_code)
    return Completed(
        exit_code=exit_code,
        stdout=b"".join(collected).decode("utf-8", errors="replace"),
        stderr_tail=tuple(tail),
    )
