"""A cluster of real `fa-restic serve` processes (SPEC §10) for test_cluster_nodes.py.

Every node is its own process with its own folder (config, cache, log) under one test
folder; all of them share one PostgreSQL database, one data root (`<shared>/data`, the users'
homes) and one local repository (`<shared>/repo`, its password in `<shared>/repo.password`),
named by absolute paths in each node's config, as a real cluster names its shared file
system's mount.

What a test gets:
- `Cluster.add(name, ...)` writes a node's config; `Cluster.start(...)` starts nodes at once
  (as an operator's fleet comes up) and waits until each answers healthz.
- `Node.call(...)` is one HTTP request with a test JWT; every answer must be the SPEC's JSON
  envelope (a non-JSON answer fails the test, naming the node).
- `Node.kill()` (SIGKILL by default) / `Node.stop()` (SIGTERM), `Node.log()`,
  `Node.started()` ("backup N: started" lines: which node ran what), `Node.restic_children()`.
- `Cluster.restic(...)` runs restic by hand on the shared repository (an operator's view),
  `Cluster.locks()`, `Cluster.restic_processes()`.
- `Cluster.kill_all()` SIGKILLs every node and waits for every restic of the repository to
  end: the fixture's teardown. `Cluster.log_tails()` is what a failure report shows.
- `timed_restic(...)` writes an executable wrapper of the real restic that appends
  "<start> <end> <subcommand> <pid>" to a file for every run (the exclusive-work test).

The tests' fixture registers `LogTailsOnFailure` so that a failed test's report ends with
every node's log tail.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fa_restic.restic.runner import stat_fields
from tests.faults.service_process import restic_processes
from tests.helpers import (
    API,
    TERMINAL,
    auth,
    free_port,
    make_home,
    run_restic,
    write_config,
)

STARTED_LINE = re.compile(
    r"^(\S+ \S+) .*?\b(backup|restore) (\d+): started(?: \(attempt (\d+)\))?", re.M
)
"""The line a node logs when it starts a job (SPEC §10: learn which node ran what)."""

ADMIN = "root"


class NotAnEnvelope(AssertionError):
    """An answer that is not the SPEC §5 JSON envelope."""


@dataclass
class Answer:
    """One HTTP answer: its status and the envelope."""

    status: int
    body: dict[str, Any]

    @property
    def code(self) -> int:
        return int(self.body["code"])

    @property
    def data(self) -> Any:
        return self.body["data"]

    def pair(self) -> tuple[int, int]:
        return self.status, self.code


@dataclass
class Node:
    """One `fa-restic serve` process living in `folder`."""

    name: str
    folder: Path
    config: Path
    port: int
    process: subprocess.Popen[bytes] | None = None
    environment: dict[str, str] = field(default_factory=dict)

    @property
    def log_path(self) -> Path:
        return self.folder / "service.log"

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} is not running"
        return self.process.pid

    # -- start and stop ------------------------------------------------------------------

    def spawn(self) -> None:
        """Starts the process (returns at once; `wait_ready` waits for its healthz)."""
        assert self.process is None or self.process.poll() is not None, f"{self.name} runs"
        with self.log_path.open("ab") as log:
            log.write(f"--- test harness: {self.name} starting at {time.time():.3f}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "fa_restic", "serve", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.folder,
                env={**os.environ, **self.environment},
            )

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Waits until healthz answers 200; fails with the log if the process exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise AssertionError(f"{self.name} exited ({code}):\n{self.log_tail()}")
            with contextlib.suppress(OSError, NotAnEnvelope):
                if self.call("GET", "/healthz", user=None, timeout=5).status == 200:
                    return
            time.sleep(0.05)
        raise AssertionError(f"{self.name} did not answer within {timeout}s:\n{self.log_tail()}")

    def start(self, timeout: float = 60.0) -> None:
        self.spawn()
        self.wait_ready(timeout)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self, sig: signal.Signals = signal.SIGKILL, timeout: float = 20.0) -> int:
        """Sends `sig` to the process and returns its exit code once it ended."""
        assert self.process is not None, f"{self.name} was never started"
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            raise AssertionError(
                f"{self.name} still ran {timeout}s after {sig.name}:\n{self.log_tail()}"
            ) from None

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (a clean stop, SPEC §7); returns the exit code."""
        return self.kill(signal.SIGTERM, timeout)

    # -- calls -----------------------------------------------------------------------------

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        user: str | None = "alice",
        admin: bool = False,
        raw: bytes | None = None,
        timeout: float = 30.0,
    ) -> Answer:
        """One request to `/fa/api/v0<path>`; returns the status and the envelope. Raises
        NotAnEnvelope when the answer is not the JSON envelope, OSError when nothing answers."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        headers = auth(user, admin=admin) if user else {}
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{API}{path}", data=data, method=method, headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
                status, text = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, text = error.code, error.read()
        try:
            envelope = json.loads(text)
        except ValueError:
            envelope = None
        if not isinstance(envelope, dict) or not {"code", "message", "data"} <= set(envelope):
            raise NotAnEnvelope(
                f"{self.name}: {method} {path} answered {status} without the envelope: "
                f"{text[:300]!r}"
            )
        return Answer(status, envelope)

    def health(self) -> dict[str, Any]:
        answer = self.call("GET", "/healthz", user=None, timeout=10)
        assert answer.pair() == (200, 2001), (self.name, answer)
        return dict(answer.data)

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    def job(self, kind: str, job_id: int) -> Answer:
        """GET of a record with an admin token (it sees every user's)."""
        return self.call("GET", f"/{kind}/{job_id}", user=ADMIN, admin=True)

    def record(self, kind: str, job_id: int) -> dict[str, Any] | None:
        answer = self.job(kind, job_id)
        assert answer.status == 200 and answer.code in (2001, 4001), (self.name, answer)
        return None if answer.data is None else dict(answer.data)

    def wait_status(
        self, kind: str, job_id: int, statuses: Iterable[str] = TERMINAL, timeout: float = 60.0
    ) -> dict[str, Any]:
        """Returns the record once its status is one of `statuses`; fails after `timeout`."""
        wanted = set(statuses)
        deadline = time.monotonic() + timeout
        last: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            last = self.record(kind, job_id)
            if last is not None and last["status"] in wanted:
                return last
            time.sleep(0.1)
        raise AssertionError(
            f"{kind} {job_id} not {sorted(wanted)} within {timeout}s (asked {self.name}): {last}"
        )

    # -- what the node did -----------------------------------------------------------------

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def log_lines(self, pattern: str) -> list[str]:
        return [line for line in self.log().splitlines() if re.search(pattern, line)]

    def started(self, kind: str = "backup") -> list[int]:
        """Returns the ids of `kind` this node logged as started, once per attempt."""
        return [job_id for job_id, _, _ in self.starts(kind)]

    def starts(self, kind: str = "backup") -> list[tuple[int, int, str]]:
        """Returns (id, attempt, log time) of each start of `kind` this node logged."""
        return [
            (int(match.group(3)), int(match.group(4) or 0), match.group(1))
            for match in STARTED_LINE.finditer(self.log())
            if match.group(2) == kind
        ]

    def restic_children(self) -> list[int]:
        """Returns the pids of restic processes this node started that still run (its
        descendants whose program is restic, or the sandbox helper about to become it)."""
        if not self.alive():
            return []
        return [pid for pid in descendants(self.pid) if "restic" in command_line(pid)]


@dataclass
class Cluster:
    """Nodes on one database, one data root and one repository under `root`."""

    root: Path
    restic_binary: str
    database_url: str
    nodes: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.shared.mkdir(parents=True, exist_ok=True)
        self.data_root.mkdir(exist_ok=True)
        if not self.password_file.exists():
            descriptor = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                handle.write(secrets.token_urlsafe(24) + "\n")

    @property
    def shared(self) -> Path:
        return self.root / "shared"

    @property
    def data_root(self) -> Path:
        return self.shared / "data"

    @property
    def repository(self) -> Path:
        return self.shared / "repo"

    @property
    def password_file(self) -> Path:
        return self.shared / "repo.password"

    def home(self, user: str) -> Path:
        return make_home(self.data_root, user)

    def __getitem__(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    # -- nodes -------------------------------------------------------------------------------

    def cluster_table(self, name: str, lease_seconds: float) -> str:
        return (
            f'\n[cluster]\ndatabase_url = "{self.database_url}"\n'
            f'node_name = "{name}"\nlease_seconds = {lease_seconds}\n'
        )

    def add(
        self,
        name: str,
        *,
        max_running: int = 2,
        lease_seconds: float = 3.0,
        cluster: bool = True,
        restic_binary: str | None = None,
        extra: str = "",
        restic_extra: str = "",
        settings: dict[str, str] | None = None,
    ) -> Node:
        """Writes the config of a node `name` (in `<root>/<name>`) and returns it, not
        started. `cluster=False`: a single node (its records in its own state file) on the
        same data root and repository. `settings`: `key = value` lines replaced in the
        config as tests/helpers.write_config writes it (e.g. prune_interval_seconds)."""
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        port = free_port()
        table = self.cluster_table(name, lease_seconds) if cluster else ""
        config = write_config(
            folder,
            restic_binary or self.restic_binary,
            repository_url=str(self.repository),
            port=port,
            max_running=max_running,
            extra=table + extra,
            restic_extra=restic_extra,
        )
        replacements = {
            "data_root": f'"{self.data_root}"',
            "password_file": f'"{self.password_file}"',
            **(settings or {}),
        }
        text = config.read_text(encoding="utf-8")
        for key, value in replacements.items():
            text, count = re.subn(rf"(?m)^{re.escape(key)} = .*$", f"{key} = {value}", text)
            assert count == 1, f"write_config wrote {count} lines for {key}:\n{text}"
        config.write_text(text, encoding="utf-8")
        node = Node(name, folder, config, port)
        self.nodes.append(node)
        return node

    def start(self, *nodes: Node, timeout: float = 60.0) -> None:
        """Starts `nodes` (default: every node not running) at once; waits for each."""
        chosen = list(nodes) or [node for node in self.nodes if not node.alive()]
        for node in chosen:
            node.spawn()
        for node in chosen:
            node.wait_ready(timeout)

    def alive(self) -> list[Node]:
        return [node for node in self.nodes if node.alive()]

    def kill_all(self) -> None:
        """SIGKILLs every node, waits for them and for every restic of the repository."""
        for node in self.nodes:
            if node.alive():
                assert node.process is not None
                node.process.kill()
        for node in self.nodes:
            if node.process is not None:
                node.process.wait(timeout=30)
        deadline = time.monotonic() + 15
        while restic_processes(self.repository) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in restic_processes(self.repository):  # ours: started by our nodes
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def log_tails(self, lines: int = 40) -> str:
        return "\n".join(
            f"----- {node.name} (port {node.port}, {node.log_path}) -----\n{node.log_tail(lines)}"
            for node in self.nodes
        )

    # -- what the cluster did --------------------------------------------------------------

    def runners(self, kind: str, job_id: int) -> list[str]:
        """Returns the names of the nodes that logged starting `kind job_id`, one per attempt,
        in the order of the attempts."""
        found = [
            (attempt, when, node.name)
            for node in self.nodes
            for started, attempt, when in node.starts(kind)
            if started == job_id
        ]
        return [name for _, _, name in sorted(found)]

    def wait_runner(self, kind: str, job_id: int, timeout: float = 30.0) -> Node:
        """Waits until one node logged starting the job; returns that node."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            names = self.runners(kind, job_id)
            if names:
                assert len(names) == 1, f"{kind} {job_id} started on {names}"
                return self[names[0]]
            time.sleep(0.02)
        raise AssertionError(f"no node started {kind} {job_id} within {timeout}s")

    def any_node(self) -> Node:
        alive = self.alive()
        assert alive, "no node runs"
        return alive[0]

    def wait_status(
        self, kind: str, job_id: int, statuses: Iterable[str] = TERMINAL, timeout: float = 60.0
    ) -> dict[str, Any]:
        return self.any_node().wait_status(kind, job_id, statuses, timeout)

    def initialise(self) -> None:
        """Creates the repository by hand (`restic init`), as an operator may before the first
        node starts."""
        done = self.restic("init")
        assert done.returncode == 0, done.stdout + done.stderr

    def restic(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        """Runs restic by hand on the shared repository (the cluster's binary)."""
        return run_restic(
            self.restic_binary, self.shared, *arguments, repository_url=str(self.repository)
        )

    def locks(self) -> list[str]:
        """Returns the ids of the locks in the repository (`restic list locks`)."""
        done = self.restic("list", "locks", "--no-lock")
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout.split()

    def snapshot_ids(self) -> list[str]:
        done = self.restic("snapshots", "--json", "--no-lock")
        assert done.returncode == 0, done.stdout + done.stderr
        return [str(snapshot["id"]) for snapshot in json.loads(done.stdout or "[]")]

    def restic_processes(self) -> list[int]:
        """Returns the pids of every restic working on the shared repository."""
        return restic_processes(self.repository)


# -- processes -------------------------------------------------------------------------------------


def command_line(pid: int) -> str:
    """Returns a process's argv joined by spaces ("" once it is gone)."""
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def parent_of(pid: int) -> int | None:
    fields = stat_fields(f"/proc/{pid}/stat")
    return None if fields is None else int(fields[1])


def descendants(pid: int) -> list[int]:
    """Returns the pids of every live descendant of `pid`."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            parent = parent_of(int(entry))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry))
    found: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found


# -- sampling while a test acts --------------------------------------------------------------------


class Sampler:
    """Calls `probe` every `interval` seconds in a thread until stopped; keeps the results
    (and the errors, as text) for the test to check afterwards."""

    def __init__(self, probe: Callable[[], Any], interval: float = 0.05) -> None:
        self.probe = probe
        self.interval = interval
        self.samples: list[Any] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self.probe())
            except Exception as error:  # kept for the test to judge
                self.errors.append(repr(error))
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def at_once(calls: list[Callable[[], Any]]) -> list[Any]:
    """Runs `calls` in threads released together (a barrier); returns their results in order."""
    barrier = threading.Barrier(len(calls))

    def released(call: Callable[[], Any]) -> Any:
        barrier.wait(timeout=30)
        return call()

    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = [pool.submit(released, call) for call in calls]
        return [future.result() for future in futures]


# -- a restic that says when it ran ----------------------------------------------------------------

_TIMED_RESTIC = '''#!{python} -IS
"""restic, timed: runs {real} as a child and appends "<start> <end> <subcommand> <pid>" to
{journal} when it ends (a test's wrapper; the service's restic binary)."""
import os, signal, subprocess, sys, time

REAL = {real!r}
JOURNAL = {journal!r}
SUBCOMMANDS = {subcommands!r}
PARENT = os.getppid()

child = None


def forward(number, frame):
    # The service signals restic's whole process group, the real restic included: nothing
    # to forward then. A signal from PR_SET_PDEATHSIG (the node died) reaches this process
    # only: pass it on so that the real restic dies with the node as it would unwrapped.
    if child is not None and os.getppid() != PARENT:
        os.kill(child.pid, number)


for number in (signal.SIGINT, signal.SIGTERM):
    signal.signal(number, forward)
subcommand = next((word for word in sys.argv[1:] if word in SUBCOMMANDS), "?")
start = time.time()
child = subprocess.Popen([REAL, *sys.argv[1:]])
code = child.wait()
end = time.time()
with open(JOURNAL, "a") as journal:
    journal.write(f"{{start:.6f}} {{end:.6f}} {{subcommand}} {{child.pid}}\\n")
if code < 0:
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
'''

RESTIC_SUBCOMMANDS = (
    "backup",
    "restore",
    "forget",
    "prune",
    "unlock",
    "init",
    "snapshots",
    "ls",
    "cat",
    "stats",
    "check",
    "list",
    "version",
    "rebuild-index",
    "repair",
)


def timed_restic(folder: Path, real_binary: str, journal: Path) -> Path:
    """Writes an executable restic wrapper into `folder` that journals every run; returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "restic-timed"
    path.write_text(
        _TIMED_RESTIC.format(
            python=sys.executable,
            real=real_binary,
            journal=str(journal),
            subcommands=RESTIC_SUBCOMMANDS,
        ),
        encoding="utf-8",
    )
    path.chmod(0o755)
    return path


@dataclass(frozen=True)
class Run:
    """One restic run as the timed wrapper journaled it."""

    start: float
    end: float
    subcommand: str
    pid: int


def journaled_runs(journal: Path) -> list[Run]:
    if not journal.exists():
        return []
    runs = []
    for line in journal.read_text().splitlines():
        start, end, subcommand, pid = line.split()
        runs.append(Run(float(start), float(end), subcommand, int(pid)))
    return runs


# -- the failure report ----------------------------------------------------------------------------

CLUSTERS = pytest.StashKey[list[Cluster]]()


class LogTailsOnFailure:
    """A pytest plugin: a failed test that made clusters gets every node's log tail in its
    report (registered once by the tests' fixture)."""

    NAME = "fa-restic-cluster-log-tails"

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        clusters = item.stash.get(CLUSTERS, [])
        if report.failed and clusters:
            for index, cluster in enumerate(clusters):
                report.sections.append(
                    (f"cluster {index} node logs ({report.when})", cluster.log_tails())
                )
        return report


def register_log_tails(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin(LogTailsOnFailure.NAME):
        config.pluginmanager.register(LogTailsOnFailure(), LogTailsOnFailure.NAME)
