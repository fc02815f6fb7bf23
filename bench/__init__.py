"""Benchmarks of fa-restic against plain restic (see bench/README.md).

Shared parts: a real service started as a subprocess on a temporary config, raw
restic runs with the same environment the service gives restic, CPU accounting
from /proc, percentiles, and the result file. Every benchmark measures its ratio
side by side in one run, so that a busy machine slows both sides alike.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import jwt

from fa_restic.config import ResticSettings
from fa_restic.names import snapshot_tags
from fa_restic.restic.commands import Argv, Binary, backup_command, restore_command
from fa_restic.restic.features import parse_version
from fa_restic.restic.runner import stat_fields

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
API = "/fa/api/v0"
USER = "alice"
JWT_SECRET = "bench-secret-" + "0123456789abcdef" * 4  # a throwaway local secret
PROGRESS_FPS = ResticSettings().progress_fps
"""The service's default `restic.progress_fps`; raw restic gets the same RESTIC_PROGRESS_FPS."""
TICKS = os.sysconf("SC_CLK_TCK")
NOISE_NOTE = (
    "note: 2 shared cores, other work running on this machine: absolute numbers are noisy; "
    "the ratios are measured side by side to cancel most of it"
)


# -- small helpers ---------------------------------------------------------------------


def say(text: str) -> None:
    print(text, flush=True)


def log(text: str) -> None:
    """Progress chatter (stderr), kept apart from the results on stdout."""
    print(f"  .. {text}", file=sys.stderr, flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """Returns the nearest-rank percentile `q` (0-100) of `values`."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100), at least 1
    return ordered[int(rank) - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def size_mb(default: int = 600) -> int:
    return int(os.environ.get("BENCH_SIZE_MB", default))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def token(user: str = USER, *, admin: bool = False) -> str:
    return jwt.encode({"username": user, "admin": admin}, JWT_SECRET, "HS256")


def headers(user: str = USER, *, admin: bool = False) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(user, admin=admin)}"}


def temporary_folder(name: str) -> tempfile.TemporaryDirectory[str]:
    """A scratch folder on disk (BENCH_TMPDIR, else the system's temp folder)."""
    return tempfile.TemporaryDirectory(prefix=f"fa-restic-bench-{name}-", dir=_tmp_base())


def _tmp_base() -> str | None:
    return os.environ.get("BENCH_TMPDIR") or None


CPU_LATENCY_FILE = "/dev/cpu_dma_latency"


@contextmanager
def latency_tuned(server_pids: Sequence[int]) -> Iterator[str | None]:
    """Holds the machine still for a latency measurement, as tuned's latency-performance
    profile and cyclictest do.

    - A CPU wake-up latency of 0 (PM QoS, CPU_LATENCY_FILE): idle CPUs poll instead of
      halting, so a reply does not wait for its client's CPU to wake.
    - This process (the client) on the first CPU, `server_pids` and all their threads on
      the others: client and server neither share a CPU nor move between CPUs.

    Yields None once both hold, else why not (not root, one CPU), with nothing changed.
    Both are undone at the end.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        yield "one CPU: the client and the servers cannot be apart"
        return
    try:
        request = os.open(CPU_LATENCY_FILE, os.O_WRONLY)
    except OSError as error:
        yield f"{CPU_LATENCY_FILE}: {error.strerror}"
        return
    before: dict[int, set[int]] = {}
    own = os.sched_getaffinity(0)
    try:
        os.write(request, struct.pack("i", 0))  # held while the file is open
        os.sched_setaffinity(0, cpus[:1])
        for thread in (thread for pid in server_pids for thread in threads_of(pid)):
            with suppress(OSError):  # a thread that ended meanwhile; new ones inherit
                before[thread] = os.sched_getaffinity(thread)
                os.sched_setaffinity(thread, cpus[1:])
        yield None
    finally:
        os.close(request)
        os.sched_setaffinity(0, own)
        for thread, affinity in before.items():
            with suppress(OSError):
                os.sched_setaffinity(thread, affinity)


def threads_of(pid: int) -> list[int]:
    """Returns the thread ids of `pid` (sched_setaffinity sets one thread), from /proc."""
    try:
        return [int(entry.name) for entry in Path(f"/proc/{pid}/task").iterdir()]
    except OSError:
        return []  # gone


def write_results(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    data = {
        "benchmark": name,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "python": platform.python_version(),
        },
        "note": NOISE_NOTE,
        "tree": tree_state(),
        **data,
    }
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    say(f"results: {path.relative_to(ROOT)}")
    return path


def tree_state() -> dict[str, Any]:
    """The commit measured, and whether fa_restic/ had uncommitted changes then."""
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    dirty = subprocess.run(
        ["git", "diff", "--quiet", "HEAD", "--", "fa_restic"], cwd=ROOT, check=False
    )
    return {"head": head.stdout.strip(), "fa_restic_uncommitted_changes": dirty.returncode != 0}


# -- restic ----------------------------------------------------------------------------


def restic_binary() -> str:
    """BENCH_RESTIC, else the newest restic scripts/setup linked into .venv/bin."""
    return os.environ.get("BENCH_RESTIC") or str(ROOT / ".venv" / "bin" / "restic")


def restic_version(binary: str) -> str:
    output = subprocess.run([binary, "version"], capture_output=True, text=True, check=True)
    return output.stdout.split()[1]


def backup_argv(binary: str, cache: Path, backup_id: int) -> Argv:
    """The argv the service runs for a backup of a folder (`.` from inside it), built by
    the service's own code, so the raw run does the same work."""
    restic = Binary(binary, parse_version(f"restic {restic_version(binary)}"), cache)
    return backup_command(restic, snapshot_tags(backup_id, USER), ["."]).argv


def restore_argv(binary: str, cache: Path, target: Path) -> Argv:
    """The service's restore argv, with `latest` in place of the snapshot id."""
    restic = Binary(binary, parse_version(f"restic {restic_version(binary)}"), cache)
    return restore_command(restic, "latest", target).argv


@dataclass(frozen=True)
class Repo:
    """A local restic repository with its password file and a cache of its own."""

    path: Path
    password_file: Path
    cache: Path

    def environment(self, fps: float = PROGRESS_FPS) -> dict[str, str]:
        """The environment the service gives restic (runner.child_environment + Repository)."""
        environment = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("RESTIC_", "FA_"))
        }
        environment["RESTIC_REPOSITORY"] = str(self.path)
        environment["RESTIC_PASSWORD_FILE"] = str(self.password_file)
        environment["RESTIC_PROGRESS_FPS"] = f"{fps:g}"
        return environment


def make_repo(folder: Path, binary: str) -> Repo:
    """Creates and initialises a repository in `folder` (as the service would find one)."""
    folder.mkdir(parents=True, exist_ok=True)
    password_file = folder / "repo.password"
    password_file.write_text("bench-password\n", encoding="utf-8")
    password_file.chmod(0o600)
    repo = Repo(folder / "repo", password_file, folder / "cache")
    subprocess.run(
        [binary, "--cache-dir", str(repo.cache), "init"],
        env=repo.environment(),
        capture_output=True,
        check=True,
    )
    return repo


@dataclass(frozen=True)
class RawRun:
    seconds: float
    cpu_seconds: float
    """restic's user + system time (wait4 rusage of that one child)."""
    exit_code: int


def run_raw(argv: Sequence[str], environment: dict[str, str], cwd: Path, log_to: Path) -> RawRun:
    """Runs restic to its end (stdout+stderr to a file, as a pipe reader would drain them)."""
    with log_to.open("wb") as output:
        started = time.monotonic()
        process = subprocess.Popen(
            argv, cwd=cwd, env=environment, stdin=subprocess.DEVNULL, stdout=output, stderr=output
        )
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.monotonic() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    return RawRun(seconds, usage.ru_utime + usage.ru_stime, process.returncode)


# -- the service -----------------------------------------------------------------------


def write_config(
    folder: Path,
    *,
    data_root: Path,
    repo: Repo,
    binary: str,
    port: int,
    max_running: int = 2,
    state_file: Path | None = None,
) -> Path:
    """Writes a config for a service living in `folder`; every path is absolute."""
    state = state_file or folder / "state.json"
    text = f"""
[server]
host = "127.0.0.1"
port = {port}

[paths]
data_root = "{data_root}"
state_file = "{state}"

[repository]
url = "{repo.path}"
password_file = "{repo.password_file}"

[restic]
binary = "{binary}"
cache_dir = "{repo.cache}"
progress_fps = {PROGRESS_FPS}

[jobs]
max_running = {max_running}

[auth]
jwt_secret = "{JWT_SECRET}"
"""
    path = folder / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


@dataclass(frozen=True)
class CpuTimes:
    own: float
    """The process's own user + system seconds (all its threads)."""
    children: float
    """User + system seconds of its children that it has reaped (restic)."""


def parents() -> dict[int, int]:
    """Returns each process's parent pid, from /proc (a process gone meanwhile is left out)."""
    found: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        fields = stat_fields(entry / "stat") if entry.name.isdigit() else None
        if fields is not None:
            found[int(entry.name)] = int(fields[1])
    return found


def cpu_times(pid: int) -> CpuTimes:
    """Returns a process's CPU times; raises ProcessLookupError if it is gone."""
    fields = stat_fields(f"/proc/{pid}/stat")
    if fields is None:
        raise ProcessLookupError(pid)
    utime, stime, cutime, cstime = (int(value) for value in fields[11:15])
    return CpuTimes((utime + stime) / TICKS, (cutime + cstime) / TICKS)


def rss_bytes(pid: int) -> int:
    """Returns a process's resident memory (VmRSS); raises OSError if it is gone."""
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def child_pids(pid: int) -> list[int]:
    """Returns the processes whose parent is `pid` (a service's restic runs), from /proc."""
    return [child for child, parent in parents().items() if parent == pid]


class Service:
    """`fa-restic serve` as a subprocess; log in <folder>/service.log."""

    def __init__(self, config: Path, port: int) -> None:
        self.config = config
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = config.parent / "service.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        environment = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("RESTIC_", "FA_"))
        }
        with self.log_path.open("ab") as log_file:
            self.started_at = time.monotonic()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "fa_restic", "serve", "--config", str(self.config)],
                cwd=ROOT,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
            )

    async def wait_healthy(self, limit: float = 60.0) -> tuple[float, float]:
        """Polls healthz every 5 ms until it answers 2001.

        Returns (seconds from process start until the port took the request that
        succeeded, seconds until that healthz answered).
        """
        deadline = time.monotonic() + limit
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise RuntimeError(f"service exited ({self.process.returncode}): {self.tail()}")
                sent = time.monotonic()
                try:
                    async with session.get(f"{self.base}{API}/healthz") as response:
                        body = await response.json()
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.005)
                    continue
                done = time.monotonic()
                if body.get("code") == 2001:
                    return sent - self.started_at, done - self.started_at
                await asyncio.sleep(0.005)
        raise RuntimeError(f"service not healthy within {limit}s: {self.tail()}")

    def stop(self, limit: float = 20.0) -> int:
        """SIGTERM, then SIGKILL after `limit` seconds; returns the exit code."""
        process = self.process
        if process is None:
            return 0
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(limit)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.process = None
        return int(process.returncode)

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


async def get_data(
    session: aiohttp.ClientSession, url: str, user: str = USER
) -> dict[str, Any] | None:
    async with session.get(url, headers=headers(user)) as response:
        body = await response.json()
    return body.get("data") if body.get("code") == 2001 else None


async def post(
    session: aiohttp.ClientSession, url: str, payload: Any, user: str = USER
) -> dict[str, Any]:
    async with session.post(url, json=payload, headers=headers(user)) as response:
        body: dict[str, Any] = await response.json()
    if body.get("code") != 2001:
        raise RuntimeError(f"POST {url} {payload}: {body}")
    return body


def parse_time(text: str) -> float:
    """Returns the Unix time of an RFC 3339 time with a Z."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
