"""SIGKILL and SIGTERM of the real service with the real restic (issue 4)."""

from __future__ import annotations

import json
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fa_restic.jobs.records import LAYOUT
from fa_restic.store import StateStore
from tests.faults.service_process import ServiceProcess, wait_no_restic
from tests.helpers import make_home, make_random_tree, make_small_tree, run_restic

TERMINAL = {"success", "failed", "cancel"}


@pytest.fixture
def service(tmp_path: Path, restic_binary: str) -> Iterator[ServiceProcess]:
    process = ServiceProcess(tmp_path / "service", restic_binary)
    process.folder.mkdir()
    yield process
    process.stop()


def assert_repository_clean(service: ServiceProcess) -> None:
    locks = run_restic(service.restic_binary, service.folder, "list", "locks", "--no-lock")
    assert locks.returncode == 0 and locks.stdout.strip() == "", locks.stdout + locks.stderr
    check = run_restic(service.restic_binary, service.folder, "check")
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing(service: ServiceProcess) -> None:
    home = make_home(service.folder / "data", "alice")
    make_random_tree(home / "data", 60 * 1024 * 1024)
    make_small_tree(home / "small")
    chooser = random.Random(20261127)  # noqa: S311 - a repeatable schedule, not a secret
    acknowledged: dict[int, bool] = {}  # backup id -> should exist
    next_id = 1
    service.start()
    for iteration in range(20):
        moment = ("after-ack", "during-backup", "during-delete")[iteration % 3]
        if moment == "during-delete":
            done = [i for i, alive in acknowledged.items() if alive]
            finished = [i for i in done if service.job("backup", i)["data"]["status"] in TERMINAL]
            if finished:
                victim = chooser.choice(finished)
                _, body = service.call("DELETE", f"/backup/{victim}")
                if body["code"] == 2001:
                    acknowledged[victim] = False
                time.sleep(chooser.uniform(0, 1.0))
                moment = "after-delete"
        if moment != "after-delete":
            path = "data" if moment == "during-backup" else "small"
            _, body = service.call("POST", "/backup", {"id": next_id, "path": path})
            assert body["code"] == 2001, body
            acknowledged[next_id] = True
            if moment == "during-backup":
                service.wait_status("backup", next_id, {"running", *TERMINAL})
                time.sleep(chooser.uniform(0, 1.5))
            next_id += 1
        assert service.kill(signal.SIGKILL) == -signal.SIGKILL
        wait_no_restic(service.folder / "repo", timeout=5.0)
        service.start()
        for backup_id, alive in acknowledged.items():
            code = service.job("backup", backup_id)["code"]
            assert code == (2001 if alive else 4001), (iteration, backup_id, code)
    for backup_id, alive in acknowledged.items():
        if alive:
            final = service.wait_status("backup", backup_id, TERMINAL, timeout=300)
            assert final["status"] in {"success", "failed"}, final
            if final["status"] == "failed":
                assert final["extra"].startswith("interrupted"), final
    # Let the queued forgets run, then look at the repository as an operator would.
    deleted = [i for i, alive in acknowledged.items() if not alive]
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        left = [i for i in deleted if snapshots_of(service, i)]
        if not left:
            break
        time.sleep(1)
    assert not left, f"snapshots of deleted backups still there: {left}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        _, health = service.call("GET", "/healthz", user=None)
        if health["data"]["pending"] == 0 and health["data"]["running"] == 0:
            break
        time.sleep(0.2)
    time.sleep(2)
    assert service.kill(signal.SIGTERM) == 0
    assert_repository_clean(service)


def snapshots_of(service: ServiceProcess, backup_id: int) -> list[object]:
    listed = run_restic(
        service.restic_binary,
        service.folder,
        "snapshots",
        "--no-lock",
        "--json",
        "--tag",
        f"fa:id={backup_id}",
    )
    assert listed.returncode == 0, listed.stderr
    return list(json.loads(listed.stdout))


def test_sigterm_with_two_running_backups_exits_cleanly_and_resumes(
    service: ServiceProcess,
) -> None:
    home = make_home(service.folder / "data", "alice")
    make_random_tree(home / "one", 150 * 1024 * 1024)
    make_random_tree(home / "two", 150 * 1024 * 1024)
    service.start()
    for backup_id, path in ((1, "one"), (2, "two")):
        _, body = service.call("POST", "/backup", {"id": backup_id, "path": path})
        assert body["code"] == 2001
    for backup_id in (1, 2):
        assert (
            service.wait_status("backup", backup_id, {"running", *TERMINAL})["status"] == "running"
        )
    started = time.monotonic()
    assert service.kill(signal.SIGTERM) == 0
    assert time.monotonic() - started < 10
    wait_no_restic(service.folder / "repo", timeout=1.0)
    locks = sorted((service.folder / "repo" / "locks").iterdir())
    assert locks == [], "SIGINT lets restic remove its own lock"
    # What a restart reads (the state file, its index and the journal, as the service does).
    store = StateStore(service.folder / "state.json", LAYOUT)
    try:
        live = store.load().get("backup", {})
    finally:
        store.close()
    statuses = {key: value["status"] for key, value in live.items()}
    assert statuses == {"1": "pending", "2": "pending"}
    service.start()
    for backup_id in (1, 2):
        final = service.wait_status("backup", backup_id, TERMINAL, timeout=300)
        assert final["status"] == "success", final
    assert_repository_clean(service)
