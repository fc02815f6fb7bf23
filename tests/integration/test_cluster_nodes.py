"""Many nodes, one repository (SPEC §10, issue 10): three real `fa-restic serve` processes on
one PostgreSQL database, one data root and one repository, with the real restic on every
version under test (the harness: tests/integration/cluster_nodes.py).

What a platform sees of a cluster: nodes started together on no repository make one;
records shared at once and ids unique across nodes;
every node runs at most its own `max_running` and claims work when it has a slot; a cancel
works from any node; a node SIGKILLed mid-backup loses its restic and another node re-runs
the job after the lease; forget and prune never overlap a backup or restore on any node;
the database going away and coming back; a single node's records moved in with
`fa-restic import-state`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from fa_restic.restic.runner import process_start_ticks
from tests.helpers import TERMINAL, assert_same_tree, make_random_tree, make_small_tree
from tests.integration.cluster_nodes import (
    CLUSTERS,
    Cluster,
    Node,
    Run,
    Sampler,
    at_once,
    command_line,
    journaled_runs,
    register_log_tails,
    timed_restic,
)
from tests.pg import PostgresServer

NODES = ("node-a", "node-b", "node-c")
LEASE_SECONDS = 3.0
BIG_TREE_BYTES = 240 << 20
"""Enough random data for a backup that still runs a few seconds after it started (restic
reads some 100 MB/s here, less with three nodes on two CPUs). make_random_tree puts 16 files
of 1 MiB in each folder; `linked_copy(..., folders=n)` takes the first n of them."""

MakeCluster = Callable[..., Cluster]


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One large random tree per module; tests hard-link it into a home (no copy cost)."""
    return make_random_tree(tmp_path_factory.mktemp("big") / "tree", BIG_TREE_BYTES)


def linked_copy(source: Path, target: Path, folders: int | None = None) -> Path:
    """Returns `target`, a copy of `source` (its first `folders` folders, or all) made of hard
    links: the same bytes, no copying."""
    target.mkdir(parents=True)
    for folder in sorted(source.iterdir())[:folders]:
        shutil.copytree(folder, target / folder.name, copy_function=os.link)
    return target


@pytest.fixture
def make_cluster(
    tmp_path: Path, database_url: str, request: pytest.FixtureRequest
) -> Iterator[MakeCluster]:
    """Returns a factory of clusters: the repository made by hand first (unless
    `initialise=False`: nodes started together on no repository), `nodes` started at once
    (unless `start=False`). Every node is SIGKILLed at teardown and its restic processes
    waited for; a failed test's report shows every node's log tail."""
    register_log_tails(request.config)
    made: list[Cluster] = []
    request.node.stash[CLUSTERS] = made

    def make(
        restic_binary: str,
        *,
        nodes: tuple[str, ...] = NODES,
        max_running: int = 2,
        lease_seconds: float = LEASE_SECONDS,
        start: bool = True,
        initialise: bool = True,
        restic_for_nodes: str | None = None,
        **options: Any,
    ) -> Cluster:
        cluster = Cluster(tmp_path / f"cluster{len(made)}", restic_binary, database_url)
        made.append(cluster)
        if initialise:
            cluster.initialise()
        for name in nodes:
            cluster.add(
                name,
                max_running=max_running,
                lease_seconds=lease_seconds,
                restic_binary=restic_for_nodes,
                **options,
            )
        if start:
            cluster.start()
        return cluster

    yield make
    for cluster in made:
        cluster.kill_all()


def posted(node: Node, kind: str, body: dict[str, Any], user: str = "alice") -> None:
    answer = node.call("POST", f"/{kind}", body, user=user)
    assert answer.pair() == (200, 2001), (node.name, body, answer)


def restore_body(restore_id: int, backup_id: int, dst: str) -> dict[str, Any]:
    return {"restore_id": restore_id, "backup_id": backup_id, "dst_path": dst}


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Returns the first truthy `check()`; fails naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout}s (last: {last!r})")


def files_under(*roots: Path) -> int:
    """Returns how many files there are below `roots` (missing ones count none)."""
    return sum(len(files) for root in roots for _, _, files in os.walk(root))


def database_row(database_url: str, kind: str, job_id: int) -> dict[str, Any]:
    """Returns a job's record as the database holds it (read beside the nodes)."""
    with psycopg.connect(database_url) as connection:
        row = connection.execute(
            "SELECT record FROM jobs WHERE kind = %s AND id = %s", (kind, job_id)
        ).fetchone()
    assert row is not None, (kind, job_id)
    return dict(row[0])


# -- 1. records shared, ids unique -----------------------------------------------------------------


@pytest.mark.timeout(180)
def test_records_are_shared_at_once_and_ids_are_unique_across_nodes(
    make_cluster: MakeCluster, restic_binary: str
) -> None:
    # The nodes come up together on a repository that does not exist yet: SPEC §3, it is
    # made on first use, and §10, nodes joining need no other step (one repository, one key).
    cluster = make_cluster(restic_binary, initialise=False)
    a, b, c = (cluster[name] for name in NODES)
    users = ("alice", "bob", "carol")
    sources = {user: make_small_tree(cluster.home(user) / "project") for user in users}

    for node in (a, b, c):
        health = wait_until(
            lambda node=node: (h := node.health())["nodes_alive"] == 3 and h,  # type: ignore[misc]
            2 * LEASE_SECONDS + 5,
            f"{node.name}: healthz nodes_alive 3",
        )
        assert (health["node"], health["database"]) == (node.name, "ok"), health

    # A POST answered 2001 on A is there on B and C at once: GET and the listing page.
    posted(a, "backup", {"id": 1, "path": "project"})
    for node in (b, c):
        answer = node.call("GET", "/backup/1")
        assert answer.pair() == (200, 2001), (node.name, answer)
        assert answer.data["path"] == str(sources["alice"]), (node.name, answer)
        assert answer.data["status"] in {"pending", "running", "success"}, answer
        page = node.call("GET", "/backup")
        assert [item["id"] for item in page.data["items"]] == [1], (node.name, page)
        assert node.call("GET", "/backup/1", user="bob").code == 4001, "not bob's"

    # Ten ids, each POSTed at once to all three nodes by three users: exactly one 2001.
    winners: dict[int, str] = {}
    for backup_id in range(101, 111):
        answers = at_once(
            [
                lambda node=node, user=user, backup_id=backup_id: node.call(  # type: ignore[misc]
                    "POST", "/backup", {"id": backup_id, "path": "project"}, user=user
                )
                for node, user in zip((a, b, c), users, strict=True)
            ]
        )
        won = [user for user, answer in zip(users, answers, strict=True) if answer.code == 2001]
        assert len(won) == 1, (backup_id, answers)
        for answer in answers:
            if answer.code != 2001:
                assert answer.pair() == (400, 400), (backup_id, answer)
                assert answer.body["message"].startswith("err when backup file: "), answer
        winners[backup_id] = won[0]
    for backup_id, winner in winners.items():
        for node in (a, b, c):
            answer = node.call("GET", f"/backup/{backup_id}", user=winner)
            assert answer.code == 2001, (node.name, backup_id, winner, answer)
            assert answer.data["path"] == str(sources[winner]), (node.name, answer)
            for other in users:
                if other != winner:
                    assert node.call("GET", f"/backup/{backup_id}", user=other).code == 4001

    for backup_id in (1, *winners):
        done = cluster.wait_status("backup", backup_id, timeout=90)
        assert done["status"] == "success", done
        assert len(done["snapshot_id"]) == 64, done
    posted(b, "restore", restore_body(1, 1, "early"))
    assert c.call("GET", "/restore/1").pair() == (200, 2001), "a restore POSTed on B, on C"
    assert c.wait_status("restore", 1)["status"] == "success"
    assert_same_tree(sources["alice"], cluster.home("alice") / "early")
    started = {node.name: node.started() for node in (a, b, c)}
    for node in (a, b, c):  # SPEC §5: no user names, paths or ids in the metrics' labels
        text = node.metrics()
        assert not [word for word in (*users, "/users/", 'id="') if word in text], text
    assert sorted(i for ids in started.values() for i in ids) == [1, *winners], started

    # Restores of a backup each node made, on another node (C, or B for C's own), POSTed at
    # once: they run side by side, on whichever nodes claim them.
    restores: dict[int, tuple[Node, int, str]] = {}
    for number, runner in enumerate((a, b, c), start=11):
        made_here = [i for i in started[runner.name] if i in winners]
        if made_here:
            restores[number] = (b if runner is c else c, made_here[0], winners[made_here[0]])
    assert restores, started
    at_once(
        [
            lambda number=number, node=node, backup_id=backup_id, owner=owner: posted(  # type: ignore[misc]
                node, "restore", restore_body(number, backup_id, f"restored-{number}"), owner
            )
            for number, (node, backup_id, owner) in restores.items()
        ]
    )
    for number, (node, _, owner) in restores.items():
        done = node.wait_status("restore", number)
        assert done["status"] == "success", (number, cluster.runners("restore", number), done)
        assert_same_tree(sources[owner], cluster.home(owner) / f"restored-{number}")
    keys = cluster.restic("list", "keys", "--no-lock")
    assert len(keys.stdout.split()) == 1, keys.stdout + keys.stderr
    check = cluster.restic("check")
    assert check.returncode == 0, check.stdout + check.stderr

    # Every node answers finished records from its memory now; a change made on one node is
    # still seen on the others at once: a restore's id used again, a backup deleted.
    for node in (a, b, c):
        assert node.call("GET", "/restore/1").data["status"] == "success", node.name
    posted(a, "restore", restore_body(1, 1, "again"))
    for node in (b, c):
        again = node.call("GET", "/restore/1").data
        assert again["dst_path"].endswith("/again"), (node.name, again)
        assert again["status"] in {"pending", "running", "success"}, (node.name, again)
    doomed, owner = next(iter(winners.items()))
    for node in (a, b, c):
        assert node.call("GET", f"/backup/{doomed}", user=owner).code == 2001, node.name
    assert c.call("DELETE", f"/backup/{doomed}", user=owner).code == 2001
    for node in (a, b):
        assert node.call("GET", f"/backup/{doomed}", user=owner).code == 4001, node.name
    assert c.wait_status("restore", 1)["status"] == "success"


# -- 2. claims spread, slots respected -------------------------------------------------------------


@pytest.mark.timeout(180)
def test_every_node_claims_work_and_never_runs_more_than_its_slots(
    make_cluster: MakeCluster, restic_binary: str, big_tree: Path
) -> None:
    cluster = make_cluster(restic_binary, max_running=1)
    users = ("alice", "bob", "carol")
    for user in users:
        linked_copy(big_tree, cluster.home(user) / "big", folders=6)

    def sample() -> dict[str, tuple[int, int]]:
        """Each node's healthz `running` and how many restic backups/restores it runs."""
        found = {}
        for node in cluster.nodes:
            running = node.health()["running"]
            working = [
                pid
                for pid in node.restic_children()
                if {"backup", "restore"} & set(command_line(pid).split())
            ]
            found[node.name] = (running, len(working))
        return found

    entries = cluster.nodes
    with Sampler(sample, interval=0.05) as sampler:
        for number in range(6):
            user = users[number % 3]
            posted(entries[number % 3], "backup", {"id": number + 1, "path": "big"}, user=user)
        for backup_id in range(1, 7):
            done = cluster.wait_status("backup", backup_id, timeout=120)
            assert done["status"] == "success", done

        # A restore POSTed on a node whose one slot is taken runs on another node, side by
        # side with the first (restic < 0.17 restores through a staging folder in the shared
        # data root: one node's restore must not lose the other's).
        posted(entries[0], "restore", restore_body(1, 1, "back"))
        first = cluster.wait_runner("restore", 1)
        wait_until(
            lambda: files_under(
                cluster.data_root / ".fa-restic-staging", cluster.home("alice") / "back"
            ),
            10,
            "restore 1 writing files (staged or straight into dst)",
            interval=0.02,
        )
        other = next(node for node in entries if node is not first)
        posted(other, "restore", restore_body(2, 2, "back"), user="bob")
        second = cluster.wait_runner("restore", 2)
        assert first.record("restore", 1)["status"] == "running", "restore 1 ended too soon"  # type: ignore[index]
        assert second is not first, "a node whose one slot is taken claimed a job"
        for restore_id, user in ((1, "alice"), (2, "bob")):
            done = cluster.wait_status("restore", restore_id, timeout=60)
            assert done["status"] == "success", (cluster.runners("restore", restore_id), done)
            assert_same_tree(cluster.home(user) / "big", cluster.home(user) / "back")
    assert not sampler.errors, sampler.errors[:5]
    assert len(sampler.samples) > 20, len(sampler.samples)
    for name in NODES:
        most = max(sample[name][0] for sample in sampler.samples)
        assert most <= 1, f"{name}: healthz running reached {most} with max_running = 1"
        processes = max(sample[name][1] for sample in sampler.samples)
        assert processes <= 1, f"{name}: ran {processes} restic jobs at once"
    ran = {node.name: node.started() for node in cluster.nodes}
    assert sorted(i for ids in ran.values() for i in ids) == [1, 2, 3, 4, 5, 6], ran
    assert all(ran.values()), f"a node with a free slot claimed nothing: {ran}"


# -- 3. cancel from another node -------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_cancel_and_cancel_all_from_a_node_that_does_not_run_the_job(
    make_cluster: MakeCluster, restic_binary: str, big_tree: Path
) -> None:
    cluster = make_cluster(restic_binary, max_running=1)
    users = ("alice", "bob", "carol")
    for user in users:
        linked_copy(big_tree, cluster.home(user) / "big")
        for copy in ("1", "2", "3"):  # still running when cancel-all reaches every node
            linked_copy(big_tree, cluster.home(user) / "bigger" / copy)
        make_small_tree(cluster.home(user) / "small")

    # A running backup cancelled on a node that does not run it.
    posted(cluster["node-a"], "backup", {"id": 1, "path": "big"})
    runner = cluster.wait_runner("backup", 1)
    runner.wait_status("backup", 1, {"running"}, timeout=10)
    wait_until(runner.restic_children, 10, f"{runner.name}: its restic backup")
    other = next(node for node in cluster.nodes if node is not runner)
    asked = time.monotonic()
    answer = other.call("POST", "/backup/cancel", {"id": 1})
    assert answer.pair() == (200, 2001), answer
    done = other.wait_status("backup", 1, TERMINAL, timeout=5)
    assert done["status"] == "cancel", done
    took = time.monotonic() - asked
    assert took <= 5, took
    wait_until(lambda: not runner.restic_children(), 5, f"{runner.name}: restic ended")
    wait_until(lambda: not cluster.restic_processes(), 5, "no restic on the repository")
    assert runner.record("backup", 1) == other.record("backup", 1)

    # Every node busy with one backup; two more wait, pending.
    for backup_id, (node, user) in enumerate(zip(cluster.nodes, users, strict=True), start=2):
        posted(node, "backup", {"id": backup_id, "path": "bigger"}, user=user)
    busy = {backup_id: cluster.wait_runner("backup", backup_id) for backup_id in (2, 3, 4)}
    assert len({node.name for node in busy.values()}) == 3, busy
    posted(cluster["node-a"], "backup", {"id": 5, "path": "small"})
    posted(cluster["node-b"], "backup", {"id": 6, "path": "small"}, user="bob")
    for backup_id in (2, 3, 4):
        cluster.wait_status("backup", backup_id, {"running"}, timeout=10)
    # SPEC §10: the progress of a job running on another node is at most 2 s old.
    remote = next(i for i, node in busy.items() if node is not cluster["node-a"])
    wait_until(
        lambda: cluster["node-a"].record("backup", remote)["progress"]["bytes_done"] > 0,  # type: ignore[index]
        4,
        f"node-a shows the progress of backup {remote} running on {busy[remote].name}",
    )
    assert cluster["node-c"].record("backup", 5)["status"] == "pending"  # type: ignore[index]
    # A pending job cancelled from any node: `cancel` at once.
    answer = cluster["node-c"].call("POST", "/backup/cancel", {"id": 5})
    assert answer.pair() == (200, 2001), answer
    for node in cluster.nodes:
        record = node.record("backup", 5)
        assert record is not None and record["status"] == "cancel", (node.name, record)

    # cancel-all on one node (admin): every pending and running backup, on every node.
    asked = time.monotonic()
    answer = cluster["node-a"].call("POST", "/backup/cancel-all", user="root", admin=True)
    assert answer.pair() == (200, 2001), answer
    for backup_id in (2, 3, 4, 6):
        done = cluster["node-a"].wait_status("backup", backup_id, TERMINAL, timeout=6)
        assert done["status"] == "cancel", (backup_id, done)
    took = time.monotonic() - asked
    assert took <= 5.5, took
    wait_until(lambda: not cluster.restic_processes(), 8, "no restic on the repository")
    assert cluster.runners("backup", 6) == [], "cancelled while pending: never started"
    assert cluster.locks() == []


# -- 4. SIGKILL of a node mid-backup ---------------------------------------------------------------


@pytest.mark.timeout(180)
def test_a_node_killed_mid_backup_loses_its_restic_and_another_node_runs_the_job(
    make_cluster: MakeCluster, restic_binary: str, big_tree: Path, database_url: str
) -> None:
    cluster = make_cluster(restic_binary, max_running=1)
    source = linked_copy(big_tree, cluster.home("alice") / "big", folders=10)
    posted(cluster["node-b"], "backup", {"id": 1, "path": "big"})
    victim = cluster.wait_runner("backup", 1)
    wait_until(
        lambda: (victim.record("backup", 1) or {}).get("progress", {}).get("bytes_done", 0) > 0,
        10,
        "restic reading",
    )
    restics = {pid: process_start_ticks(pid) for pid in victim.restic_children()}
    assert restics, f"{victim.name} runs no restic"

    killed_at = time.monotonic()
    victim.kill()
    wait_until(
        lambda: all(process_start_ticks(pid) != ticks for pid, ticks in restics.items()),
        5,
        f"the restic of the killed {victim.name} ended (PR_SET_PDEATHSIG)",
    )
    survivors = [node for node in cluster.nodes if node is not victim]
    done = survivors[0].wait_status("backup", 1, TERMINAL, timeout=LEASE_SECONDS + 10 + 60)
    took = time.monotonic() - killed_at
    assert done["status"] == "success", done
    runners = cluster.runners("backup", 1)
    assert len(runners) == 2 and runners[0] == victim.name, runners
    assert runners[1] != victim.name, runners
    rerun = cluster[runners[1]]
    assert rerun.log_lines(r"backup 1: started \(attempt 2\)"), rerun.log_tail()
    assert database_row(database_url, "backup", 1)["attempts"] == 2
    for node in survivors:
        assert wait_until(
            lambda node=node: node.health()["nodes_alive"] == 2,  # type: ignore[misc]
            LEASE_SECONDS + 5,
            f"{node.name}: nodes_alive 2",
        )

    # One snapshot for the id, the record's; no lock of the dead node's restic.
    tagged = cluster.restic("snapshots", "--json", "--no-lock", "--tag", "fa:id=1")
    assert tagged.returncode == 0, tagged.stderr
    assert tagged.stdout.count('"id"') == 1 and done["snapshot_id"] in tagged.stdout, tagged.stdout
    wait_until(lambda: not cluster.restic_processes(), 10, "no restic on the repository")
    assert cluster.locks() == []

    restorer = survivors[1] if rerun is survivors[0] else survivors[0]
    posted(restorer, "restore", restore_body(1, 1, "back"))
    restored = restorer.wait_status("restore", 1, timeout=60)
    assert restored["status"] == "success", restored
    assert_same_tree(source, cluster.home("alice") / "back")
    print(f"takeover: success {took:.1f}s after the SIGKILL of {victim.name}")


# -- 5. exclusive work never overlaps a job --------------------------------------------------------


def overlapping(runs: list[Run], exclusive: set[str], jobs: set[str]) -> list[tuple[Run, Run]]:
    """Returns the pairs (exclusive run, job run) whose intervals overlap."""
    return [
        (first, second)
        for first in runs
        if first.subcommand in exclusive
        for second in runs
        if second.subcommand in jobs and first.start < second.end and second.start < first.end
    ]


@pytest.mark.timeout(240)
def test_forget_and_prune_never_overlap_a_backup_or_restore_on_any_node(
    make_cluster: MakeCluster, restic_binary: str, tmp_path: Path
) -> None:
    journal = tmp_path / "restic-runs.txt"
    wrapper = timed_restic(tmp_path / "wrapper", restic_binary, journal)
    cluster = make_cluster(restic_binary, restic_for_nodes=str(wrapper), max_running=2)
    users = ("alice", "bob", "carol")
    for user in users:
        make_small_tree(cluster.home(user) / "small")
        make_random_tree(cluster.home(user) / "medium", 16 << 20)
    owner: dict[int, str] = {}

    def backup(backup_id: int, node: Node, user: str, path: str) -> None:
        posted(node, "backup", {"id": backup_id, "path": path}, user=user)
        owner[backup_id] = user

    for backup_id in range(1, 7):
        backup(backup_id, cluster.nodes[backup_id % 3], users[backup_id % 3], "small")
    for backup_id in range(1, 7):
        assert cluster.wait_status("backup", backup_id, timeout=60)["status"] == "success"
    snapshots = {i: cluster.any_node().record("backup", i)["snapshot_id"] for i in owner}  # type: ignore[index]

    # Deletes (forgets, then prunes) queued while new backups and restores keep coming in,
    # on every node, twice over.
    next_id = 7
    restore_id = 1
    for round_ids in ((1, 2, 3), (4, 5)):
        for index, backup_id in enumerate(round_ids):
            node = cluster.nodes[index % 3]
            answer = node.call("DELETE", f"/backup/{backup_id}", user=owner[backup_id])
            assert answer.pair() == (200, 2001), answer
            backup(next_id, cluster.nodes[(index + 1) % 3], users[index % 3], "medium")
            next_id += 1
        dst = f"r{restore_id}"
        posted(cluster["node-c"], "restore", restore_body(restore_id, 6, dst), owner[6])
        restore_id += 1
        time.sleep(0.5)
    for backup_id in range(7, next_id):
        assert cluster.wait_status("backup", backup_id, timeout=120)["status"] == "success"
    for number in range(1, restore_id):
        assert cluster.wait_status("restore", number, timeout=60)["status"] == "success"

    gone = {snapshots[i] for i in (1, 2, 3, 4, 5)}
    wait_until(
        lambda: not gone & set(cluster.snapshot_ids()), 90, "the deleted snapshots forgotten"
    )
    wait_until(
        lambda: any(run.subcommand == "prune" for run in journaled_runs(journal)),
        60,
        "a prune after the forgets",
    )
    wait_until(lambda: not cluster.restic_processes(), 30, "the repository idle")
    runs = journaled_runs(journal)
    counts = {
        name: sum(run.subcommand == name for run in runs)
        for name in ("backup", "restore", "forget", "prune")
    }
    assert counts["forget"] >= 1 and counts["prune"] >= 1, counts
    assert counts["backup"] >= 11 and counts["restore"] >= 2, counts
    clashes = overlapping(runs, {"forget", "prune"}, {"backup", "restore"})
    assert clashes == [], clashes[:5]
    exclusive_pairs = [
        (first, second)
        for first in runs
        for second in runs
        if first is not second
        and first.subcommand in {"forget", "prune"}
        and second.subcommand in {"forget", "prune"}
        and first.start < second.end
        and second.start < first.end
    ]
    assert exclusive_pairs == [], f"forget/prune on two nodes at once: {exclusive_pairs[:3]}"
    assert cluster.locks() == []


# -- 6. the database away and back -----------------------------------------------------------------


@pytest.mark.timeout(180)
def test_nodes_answer_503_without_the_database_and_recover_by_themselves(
    make_cluster: MakeCluster, newest_restic: str, postgres_server: PostgresServer
) -> None:
    cluster = make_cluster(newest_restic)
    source = make_small_tree(cluster.home("alice") / "project")
    posted(cluster["node-a"], "backup", {"id": 1, "path": "project"})
    assert cluster.wait_status("backup", 1)["status"] == "success"

    postgres_server.stop()
    try:

        def refused(node: Node) -> dict[str, float]:
            """Checks one node without its database; returns how long each answer took."""
            took = {}
            asked = time.monotonic()
            answer = node.call("GET", "/backup/1")
            took["GET"] = time.monotonic() - asked
            assert answer.pair() == (503, 503), (node.name, answer)
            assert answer.data is None, answer
            assert answer.body["message"].startswith("err when load backup"), answer
            asked = time.monotonic()
            answer = node.call("POST", "/backup", {"id": 2, "path": "project"})
            took["POST"] = time.monotonic() - asked
            assert answer.pair() == (503, 503), (node.name, answer)
            asked = time.monotonic()
            health = wait_until(
                lambda: (h := node.health())["database"] != "ok" and h,
                10,
                f"{node.name}: healthz says the database is not ok",
            )
            took["healthz"] = time.monotonic() - asked
            assert health["node"] == node.name, health
            return took

        timings = at_once([lambda node=node: refused(node) for node in cluster.nodes])  # type: ignore[misc]
        print("answers without the database took", timings)
    finally:
        postgres_server.start()

    def every_node_answers() -> bool:
        return all(node.call("GET", "/backup/1").status == 200 for node in cluster.nodes)

    wait_until(every_node_answers, 15, "every node answers GET again")
    for node in cluster.nodes:
        wait_until(
            lambda node=node: node.health()["database"] == "ok",  # type: ignore[misc]
            15,
            f"{node.name}: healthz database ok",
        )
    assert cluster["node-c"].record("backup", 2) is None, "a POST answered 503 left a record"
    posted(cluster["node-b"], "backup", {"id": 2, "path": "project"})
    done = cluster["node-c"].wait_status("backup", 2, timeout=60)
    assert done["status"] == "success", done
    posted(cluster["node-c"], "restore", restore_body(1, 2, "back"))
    assert cluster["node-a"].wait_status("restore", 1)["status"] == "success"
    assert_same_tree(source, cluster.home("alice") / "back")


# -- 7. a single node's records moved in -----------------------------------------------------------


@pytest.mark.timeout(180)
def test_a_single_nodes_state_imported_is_served_by_every_node(
    make_cluster: MakeCluster, newest_restic: str, database_url: str
) -> None:
    cluster = make_cluster(newest_restic, start=False)
    single = cluster.add("single", cluster=False)
    sources = {
        "alice": make_small_tree(cluster.home("alice") / "project"),
        "bob": make_small_tree(cluster.home("bob") / "work"),
    }
    single.start()
    posted(single, "backup", {"id": 1, "path": "project"})
    posted(single, "backup", {"id": 2, "path": "work"}, user="bob")
    posted(single, "backup", {"id": 3, "path": "project"})
    for backup_id in (1, 2, 3):
        assert single.wait_status("backup", backup_id)["status"] == "success"
    posted(single, "restore", restore_body(1, 1, "first"))
    assert single.wait_status("restore", 1)["status"] == "success"
    before = {("backup", i): single.record("backup", i) for i in (1, 2, 3)} | {
        ("restore", 1): single.record("restore", 1)
    }
    assert single.stop() == 0, single.log_tail()
    state = single.folder / "state.json"
    assert state.exists()

    imported = subprocess.run(
        [sys.executable, "-m", "fa_restic", "import-state", "--from", str(state)],
        capture_output=True,
        text=True,
        env={**os.environ, "FA_DATABASE_URL": database_url},
        timeout=120,
        check=False,
    )
    assert imported.returncode == 0, imported.stdout + imported.stderr

    nodes = [cluster[name] for name in NODES]
    cluster.start(*nodes)
    for node in nodes:
        for (kind, job_id), record in before.items():
            assert node.record(kind, job_id) == record, (node.name, kind, job_id)
        page = node.call("GET", "/backup", user="root", admin=True)
        assert [item["id"] for item in page.data["items"]] == [3, 2, 1], (node.name, page)
        answer = node.call("POST", "/backup", {"id": 1, "path": "project"})
        assert answer.pair() == (400, 400), (node.name, "id 1 is in use", answer)

    posted(cluster["node-c"], "restore", restore_body(2, 2, "back"), user="bob")
    assert cluster["node-a"].wait_status("restore", 2)["status"] == "success"
    assert_same_tree(sources["bob"], cluster.home("bob") / "back")
    posted(cluster["node-b"], "backup", {"id": 4, "path": "project"})
    assert cluster["node-a"].wait_status("backup", 4)["status"] == "success"
