"""`cluster` (issue 10): several nodes on one database and one repository (SPEC §10).

Real nodes (`python -m fa_restic serve`, each with its own config, port, log and restic
cache) share a throwaway durable PostgreSQL (bench.database's), one repository (one
password file) and one data_root. Random data (BENCH_CLUSTER_MB, default 400 MB) in 1 MiB
files is made once in the homes of four users; a fifth user's home holds hard links to all
of it (one backup of four times the data, made in no time).

- Throughput: the same four backups (one per user, POSTed round the nodes) on (a) two nodes
  with `jobs.max_running = 1` each, and (b) one node with `max_running = 2`, also with
  `[cluster]` on a fresh database of its own: the only difference is the number of nodes.
  Each run has a fresh database and a fresh repository (initialised, not timed); time = the
  last record's `finished_at` minus the moment the first POST was sent. BENCH_TRIALS (2)
  trials, (a) first in odd trials and (b) first in even ones; every run starts after an
  `os.sync()`, with the data read once beforehand so that it is in the page cache for all.
  `throughput_ratio` = the geometric mean of the trials' (b time / a time), in which the cost
  of coming first or second cancels out. Goal >= 0.95: two nodes on the same two cores do
  the work of one node with two slots.
- Takeover: two nodes with `lease_seconds = 5` and `max_running = 1`; one backup of the
  fifth user (~10 s). The node that starts it ("backup 1: started (attempt 1)" in its log)
  is SIGKILLed 3 s later. Measured from the kill: until the record is `running` again, its
  `started_at` set by the other node when it claimed it; until that node's log says
  "started (attempt 2)" (its restic starts then, after the cut-short attempt's snapshots
  were settled); and until `success`. Goal: death -> running elsewhere <= lease + 10 s.
  The snapshots tagged `fa:id=1` are counted at the end (one: the cut-short attempt's were
  settled).

Before each run the benchmark waits until the nodes have run no restic for 1 s: a node
answers healthz before its start-up work (`restic unlock`, settling) is done.

Exit code 0 when every part was measured, PASS or MISS; 1 when one could not be (a node
that would not start, a backup that failed), saying why.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench import (
    API,
    NOISE_NOTE,
    Repo,
    Service,
    cpu_times,
    free_port,
    get_data,
    log,
    make_repo,
    median,
    parents,
    parse_time,
    post,
    restic_binary,
    restic_version,
    say,
    temporary_folder,
    write_config,
    write_results,
)
from bench.database import DurablePostgres, create_database, start_postgres
from tests.helpers import make_random_tree

TRIALS = int(os.environ.get("BENCH_TRIALS", 2))
"""Even by default: each setup comes first in half the trials."""
MEGABYTES = int(os.environ.get("BENCH_CLUSTER_MB", 400))
USERS = ("ann", "bob", "cyd", "dee")
TAKER = "tom"
"""The takeover's user: hard links to all four users' data."""
LEASE_SECONDS = 5.0
RUN_BEFORE_KILL = 3.0
"""Seconds the takeover's backup runs on its first node before that node is killed."""
GOAL_THROUGHPUT_RATIO = 0.95
GOAL_TAKEOVER_SLACK = 10.0
"""Death -> running elsewhere within lease_seconds + this."""
POLL_SECONDS = 0.5
"""Polling only tells when to look: the times come from the records."""
TAKEOVER_POLL_SECONDS = 0.05
STARTED = re.compile(r"backup (\d+): started \(attempt (\d+)\)")
LOG_LINE_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*", re.MULTILINE)
SETUPS = {"a": "two nodes, max_running 1 each", "b": "one node, max_running 2"}
FINISHED = ("success", "failed", "cancel")


class NotMeasured(Exception):
    """A part that could not be measured (a node would not start, a job failed)."""


# -- the nodes -------------------------------------------------------------------------


@dataclass
class Node:
    name: str
    service: Service

    def started_lines(self) -> list[tuple[int, int]]:
        """Returns (backup id, attempt) of every "backup N: started (attempt M)" logged."""
        try:
            text = self.service.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return []
        return [(int(found[1]), int(found[2])) for found in STARTED.finditer(text)]

    def logged_at(self, line: str) -> float | None:
        """Returns the Unix time of the first log line containing `line` (the log's local
        time, to the millisecond), or None."""
        try:
            text = self.service.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
        for found in LOG_LINE_TIME.finditer(text):
            if line in found[0]:
                return datetime.strptime(found[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        return None


@dataclass
class Cluster:
    """Nodes sharing one database, one repository (and its password) and one data_root;
    each node has its own folder: config, log, restic cache."""

    folder: Path
    repo: Repo
    database_url: str
    nodes: list[Node] = field(default_factory=list)

    def add(
        self,
        name: str,
        data_root: Path,
        binary: str,
        max_running: int,
        lease_seconds: float | None = None,
    ) -> Node:
        folder = self.folder / name
        folder.mkdir(parents=True)
        port = free_port()
        config = write_config(
            folder,
            data_root=data_root,
            repo=replace(self.repo, cache=folder / "cache"),
            binary=binary,
            port=port,
            max_running=max_running,
            state_file=folder / "state.json",  # not used with [cluster]
        )
        lease = "" if lease_seconds is None else f"lease_seconds = {lease_seconds}\n"
        with config.open("a", encoding="utf-8") as text:
            text.write(
                f'\n[cluster]\ndatabase_url = "{self.database_url}"\nnode_name = "{name}"\n{lease}'
            )
        node = Node(name, Service(config, port))
        self.nodes.append(node)
        return node

    def start(self) -> None:
        """Starts every node, then waits for each to answer healthz; raises NotMeasured with
        the log's last line of a node that exits or never gets healthy."""
        for node in self.nodes:
            node.service.start()
        for node in self.nodes:
            try:
                asyncio.run(node.service.wait_healthy())
            except RuntimeError:
                last = node.service.tail(1).strip() or "(no log)"
                raise NotMeasured(f"{node.name} did not start: {last}") from None

    def stop(self) -> dict[str, int]:
        """Stops every node still running; returns their exit codes (-9: killed)."""
        return {node.name: node.service.stop() for node in self.nodes}

    def wait_quiet(self, quiet: float = 1.0, limit: float = 60.0) -> float:
        """Waits until no node has run a child process (restic) for `quiet` seconds; returns
        the seconds waited. A node answers healthz before its start-up work (`restic unlock`,
        settling snapshots) is done: with two nodes, twice that work would fall into the
        measurement of setup (a), though a real node does it once in its life."""
        started = time.monotonic()
        calm_since = started
        while time.monotonic() - started < limit:
            if any(descendants(node.service.pid) for node in self.nodes):
                calm_since = time.monotonic()
            elif time.monotonic() - calm_since >= quiet:
                break
            time.sleep(0.05)
        return time.monotonic() - started


def make_cluster(server: DurablePostgres, folder: Path, database: str, binary: str) -> Cluster:
    """A fresh database and a fresh, initialised repository, with no node yet."""
    url = asyncio.run(create_database(server, database))
    return Cluster(folder, make_repo(folder / "shared", binary), url)


# -- throughput ------------------------------------------------------------------------


@dataclass
class Run:
    seconds: float
    ran_on: dict[str, int]
    """Backups started per node (from their logs)."""
    restic_cpu_seconds: float
    """CPU time of the restic processes the nodes ran (reaped children)."""
    job_times: list[dict[str, Any]]


async def four_backups(nodes: list[Node]) -> tuple[float, list[dict[str, Any]]]:
    """POSTs one backup per user, round the nodes, and waits for all four; returns (seconds
    from the first POST to the last finished_at, each job's times); raises NotMeasured if
    one does not succeed."""
    urls = {}
    async with aiohttp.ClientSession() as session:
        first = time.time()
        for number, user in enumerate(USERS, start=1):
            base = nodes[(number - 1) % len(nodes)].service.base
            await post(session, f"{base}{API}/backup", {"id": number, "path": "data"}, user)
            urls[user] = f"{base}{API}/backup/{number}"
        done: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + 1800
        while len(done) < len(USERS) and time.monotonic() < deadline:
            await asyncio.sleep(POLL_SECONDS)
            for user, url in urls.items():
                data = await get_data(session, url, user)
                if user not in done and data is not None and data["status"] in FINISHED:
                    done[user] = data
    for user in USERS:
        data = done.get(user)
        if data is None or data["status"] != "success":
            state = "not finished" if data is None else f"{data['status']}: {data['extra']}"
            raise NotMeasured(f"backup of {user}: {state}")
    times: list[dict[str, Any]] = [
        {
            "user": user,
            "started": parse_time(done[user]["started_at"]) - first,
            "finished": parse_time(done[user]["finished_at"]) - first,
        }
        for user in USERS
    ]
    return max(float(job["finished"]) for job in times), times


def one_run(
    setup: str, server: DurablePostgres, folder: Path, data_root: Path, binary: str, trial: int
) -> Run:
    """Runs the four backups on setup "a" (two nodes) or "b" (one node); removes its
    folder (and repository) at the end."""
    cluster = make_cluster(server, folder, f"throughput_{trial}_{setup}", binary)
    if setup == "a":
        cluster.add("node-a", data_root, binary, max_running=1)
        cluster.add("node-b", data_root, binary, max_running=1)
    else:
        cluster.add("node-solo", data_root, binary, max_running=2)
    try:
        cluster.start()
        settled = cluster.wait_quiet()
        before = sum(cpu_times(node.service.pid).children for node in cluster.nodes)
        os.sync()
        seconds, job_times = asyncio.run(four_backups(cluster.nodes))
        restic_cpu = sum(cpu_times(node.service.pid).children for node in cluster.nodes) - before
        ran_on = {node.name: len(node.started_lines()) for node in cluster.nodes}
    finally:
        cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)
        os.sync()
    log(
        f"trial {trial} ({setup}) {SETUPS[setup]}: {seconds:.2f} s, started per node {ran_on}"
        f" (nodes idle {settled:.1f} s after healthz)"
    )
    return Run(seconds, ran_on, restic_cpu, job_times)


def throughput(
    server: DurablePostgres, scratch: Path, data_root: Path, binary: str
) -> dict[str, Any]:
    """Runs the trials, the order of the setups flipped each trial."""
    runs: dict[str, list[Run]] = {"a": [], "b": []}
    refused: dict[str, str] = {}
    for trial in range(1, TRIALS + 1):
        order = ("a", "b") if trial % 2 == 1 else ("b", "a")
        for setup in order:
            if setup in refused:
                continue
            folder = scratch / f"throughput-{trial}-{setup}"
            try:
                runs[setup].append(one_run(setup, server, folder, data_root, binary, trial))
            except NotMeasured as error:
                # The other setup still runs: its numbers say whether this benchmark works.
                refused[setup] = str(error)
                say(f"throughput ({setup}) {SETUPS[setup]}: NOT MEASURED: {error}")
    for setup, seconds in ((setup, [run.seconds for run in runs[setup]]) for setup in runs):
        if seconds:
            listed = ", ".join(f"{value:.2f}" for value in seconds)
            say(f"throughput ({setup}) {SETUPS[setup]}: [{listed}] s")
    if refused:
        raise NotMeasured("; ".join(f"({setup}) {reason}" for setup, reason in refused.items()))
    pairs = [b.seconds / a.seconds for a, b in zip(runs["a"], runs["b"], strict=True)]
    ratio = math.exp(sum(math.log(pair) for pair in pairs) / len(pairs))
    return {
        "throughput_ratio": ratio,
        "goal": GOAL_THROUGHPUT_RATIO,
        "pass": ratio >= GOAL_THROUGHPUT_RATIO,
        "per_trial_ratio": pairs,
        "median_seconds": {setup: median([run.seconds for run in runs[setup]]) for setup in runs},
        "runs": {setup: [vars(run) for run in runs[setup]] for setup in runs},
    }


def print_throughput(result: dict[str, Any]) -> None:
    runs = result["runs"]
    say(f"{'trial':<6}{'order':<7}{'(a) two nodes':>15}{'(b) one node':>14}{'b/a':>8}")
    for index, pair in enumerate(result["per_trial_ratio"]):
        order = "a b" if index % 2 == 0 else "b a"
        a_run, b_run = runs["a"][index], runs["b"][index]
        say(
            f"{index + 1:<6}{order:<7}{a_run['seconds']:>13.2f} s{b_run['seconds']:>12.2f} s"
            f"{pair:>8.3f}"
        )
    cpu = {setup: median([run["restic_cpu_seconds"] for run in runs[setup]]) for setup in runs}
    say(
        f"  restic CPU per run (median): (a) {cpu['a']:.1f} s, (b) {cpu['b']:.1f} s; "
        f"backups started per node: (a) {[run['ran_on'] for run in runs['a']]}"
    )


# -- takeover --------------------------------------------------------------------------


@dataclass
class Takeover:
    victim: str
    survivor: str
    ran_before_kill: float
    running_again: float
    """Seconds from the kill to the record's started_at set by the survivor."""
    seen_running_again: float
    """Seconds from the kill until a poll saw it running again (<= running_again + poll)."""
    restic_again: float
    """Seconds from the kill to the survivor's "started (attempt 2)" (after it settled the
    cut-short attempt's snapshots: its restic starts then)."""
    success: float
    survivor_attempt: int
    restic_gone: float | None
    """Seconds from the kill until the victim's restic had exited (None: not seen)."""
    snapshots: int


def descendants(pid: int) -> list[int]:
    """Returns the pids of the processes below `pid` (restic and its helper)."""
    children: dict[int, list[int]] = {}
    for child, parent in parents().items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found.extend(below)
        todo.extend(below)
    return found


def any_alive(pids: list[int]) -> bool:
    return any(Path(f"/proc/{pid}").exists() for pid in pids)


async def wait_for_starter(cluster: Cluster, backup_id: int) -> Node:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for node in cluster.nodes:
            if (backup_id, 1) in node.started_lines():
                return node
        await asyncio.sleep(TAKEOVER_POLL_SECONDS)
    raise NotMeasured(f"no node started backup {backup_id} within 60 s")


async def kill_and_watch(cluster: Cluster) -> Takeover:
    """POSTs the backup, SIGKILLs the node that starts it, and watches the other."""
    async with aiohttp.ClientSession() as session:
        await post(
            session,
            f"{cluster.nodes[0].service.base}{API}/backup",
            {"id": 1, "path": "data"},
            TAKER,
        )
        victim = await wait_for_starter(cluster, 1)
        started = time.monotonic()
        survivor = next(node for node in cluster.nodes if node is not victim)
        url = f"{survivor.service.base}{API}/backup/1"
        await asyncio.sleep(RUN_BEFORE_KILL)
        data = await get_data(session, url, TAKER)
        if data is None or data["status"] != "running":
            raise NotMeasured(f"backup 1 was not running {RUN_BEFORE_KILL} s in: {data}")
        below = descendants(victim.service.pid)
        assert victim.service.process is not None
        killed, killed_wall = time.monotonic(), time.time()
        victim.service.process.send_signal(signal.SIGKILL)
        ran_before_kill = killed - started
        victim.service.process.wait()
        restic_gone, seen = None, None
        deadline = killed + 600
        while time.monotonic() < deadline:
            now = time.monotonic()
            if restic_gone is None and not any_alive(below):
                restic_gone = now - killed
            data = await get_data(session, url, TAKER)
            if (
                data is not None
                and seen is None
                and data["status"] == "running"
                and parse_time(data["started_at"]) > killed_wall
            ):
                seen = now - killed
            if data is not None and data["status"] in FINISHED:
                break
            await asyncio.sleep(TAKEOVER_POLL_SECONDS)
    if data is None or data["status"] != "success":
        raise NotMeasured(f"backup 1 after the kill: {data}")
    attempt = max((tried for backup, tried in survivor.started_lines() if backup == 1), default=0)
    logged = survivor.logged_at(f"backup 1: started (attempt {attempt})")
    return Takeover(
        victim=victim.name,
        survivor=survivor.name,
        ran_before_kill=ran_before_kill,
        running_again=parse_time(data["started_at"]) - killed_wall,
        seen_running_again=seen if seen is not None else math.nan,
        restic_again=math.nan if logged is None else logged - killed_wall,
        success=parse_time(data["finished_at"]) - killed_wall,
        survivor_attempt=attempt,
        restic_gone=restic_gone,
        snapshots=0,
    )


def tagged_snapshots(repo: Repo, binary: str, backup_id: int) -> int:
    done = subprocess.run(
        [
            binary,
            "--cache-dir",
            str(repo.cache),
            "snapshots",
            "--json",
            "--tag",
            f"fa:id={backup_id}",
        ],
        env=repo.environment(),
        capture_output=True,
        text=True,
        check=True,
    )
    return len(json.loads(done.stdout) or [])


def takeover(server: DurablePostgres, scratch: Path, data_root: Path, binary: str) -> Takeover:
    folder = scratch / "takeover"
    cluster = make_cluster(server, folder, "takeover", binary)
    for name in ("node-a", "node-b"):
        cluster.add(name, data_root, binary, max_running=1, lease_seconds=LEASE_SECONDS)
    try:
        cluster.start()
        cluster.wait_quiet()
        os.sync()
        result = asyncio.run(kill_and_watch(cluster))
    finally:
        cluster.stop()
    result.snapshots = tagged_snapshots(cluster.repo, binary, 1)
    shutil.rmtree(folder, ignore_errors=True)
    return result


def print_takeover(result: Takeover) -> None:
    gone = "not seen" if result.restic_gone is None else f"{result.restic_gone:.2f} s"
    say(
        f"takeover: {result.victim} SIGKILLed {result.ran_before_kill:.2f} s into the backup; "
        f"running on {result.survivor} (attempt {result.survivor_attempt}) "
        f"{result.running_again:.2f} s later (a poll saw it after "
        f"{result.seen_running_again:.2f} s; its restic started after "
        f"{result.restic_again:.2f} s); success {result.success:.2f} s after the kill; "
        f"the killed node's restic gone after {gone}; snapshots tagged fa:id=1: "
        f"{result.snapshots}; lease {LEASE_SECONDS:g} s"
    )


# -- the run ---------------------------------------------------------------------------


def make_data(data_root: Path) -> None:
    """Random data in each user's `data` (in the page cache for every run: it was just
    written); the taker's `data` hard-links all of it."""
    taker = data_root / "users" / TAKER / "data"
    for user in USERS:
        source = make_random_tree(data_root / "users" / user / "data", MEGABYTES << 20)
        for path in sorted(source.rglob("*.bin")):
            link = taker / user / path.relative_to(source)
            link.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, link)
    os.sync()


def goals_table(results: dict[str, Any]) -> None:
    say(f"{'goal':<44}{'value':>10}  {'target':<10}result")
    part = results.get("throughput")
    if isinstance(part, dict):
        verdict = "PASS" if part["pass"] else "MISS"
        value = f"{part['throughput_ratio']:.3f}"
    else:
        verdict, value = "NOT MEASURED", "-"
    say(f"{'throughput_ratio (b time / a time)':<44}{value:>10}  {'>= 0.95':<10}{verdict}")
    part = results.get("takeover")
    limit = LEASE_SECONDS + GOAL_TAKEOVER_SLACK
    if isinstance(part, dict):
        verdict = "PASS" if part["pass"] else "MISS"
        value = f"{part['running_again']:.2f} s"
    else:
        verdict, value = "NOT MEASURED", "-"
    say(
        f"{'takeover: death -> running elsewhere':<44}{value:>10}  {f'<= {limit:g} s':<10}{verdict}"
    )


def main() -> int:
    binary = restic_binary()
    version = restic_version(binary)
    say(
        f"== cluster: two nodes vs one on one repository, and a takeover (restic {version}, "
        f"{len(USERS)} x {MEGABYTES} MB, {TRIALS} trials)"
    )
    say(NOISE_NOTE)
    results: dict[str, Any] = {}
    server = start_postgres()
    try:
        with temporary_folder("cluster") as scratch:
            folder = Path(scratch)
            data_root = folder / "data"
            started = time.monotonic()
            make_data(data_root)
            log(f"data made in {time.monotonic() - started:.1f} s")
            try:
                part = throughput(server, folder, data_root, binary)
                results["throughput"] = part
                print_throughput(part)
            except NotMeasured as error:
                results["throughput"] = f"not measured: {error}"
                say(f"throughput: NOT MEASURED: {error}")
            try:
                moved = takeover(server, folder, data_root, binary)
                limit = LEASE_SECONDS + GOAL_TAKEOVER_SLACK
                results["takeover"] = {**vars(moved), "pass": moved.running_again <= limit}
                print_takeover(moved)
            except NotMeasured as error:
                results["takeover"] = f"not measured: {error}"
                say(f"takeover: NOT MEASURED: {error}")
    finally:
        server.stop()
        shutil.rmtree(server.folder, ignore_errors=True)
    goals_table(results)
    write_results(
        "cluster",
        {
            "restic": {"binary": binary, "version": version},
            "size_mb_per_user": MEGABYTES,
            "trials": TRIALS,
            "lease_seconds": LEASE_SECONDS,
            "goals": {
                "throughput_ratio": GOAL_THROUGHPUT_RATIO,
                "takeover_seconds": LEASE_SECONDS + GOAL_TAKEOVER_SLACK,
            },
            **results,
        },
    )
    measured = all(isinstance(part, dict) for part in results.values())
    return 0 if measured else 1


if __name__ == "__main__":
    raise SystemExit(main())
