"""Cancel, delete, destroy and the repository's upkeep, with the real restic (issue 3)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from fa_restic.api.app import SERVICE_KEY
from fa_restic.jobs.service import JobService
from tests.conftest import Api
from tests.helpers import eventually, make_random_tree, make_small_tree, run_restic

BIG_BYTES = 300 * 1024 * 1024


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~300 MB of random data: several seconds of restic work on this machine."""
    return make_random_tree(tmp_path_factory.mktemp("big") / "big", BIG_BYTES)


def service_of(api: Api) -> JobService:
    service: JobService = api.client.app[SERVICE_KEY]
    return service


def link_big(api: Api, big_tree: Path, user: str = "alice", name: str = "big") -> str:
    """Puts the shared big tree into a user's home (a symlink would be refused: copy links)."""
    target = api.home(user) / name
    if not target.exists():
        target.mkdir()
        for folder in big_tree.iterdir():
            (target / folder.name).mkdir()
            for item in folder.iterdir():
                (target / folder.name / item.name).hardlink_to(item)
    return name


def lock_files(api: Api) -> list[Path]:
    return sorted((api.folder / "repo" / "locks").iterdir())


def snapshots_with_tag(api: Api, tag: str) -> list[dict[str, Any]]:
    listed = run_restic(api.restic_binary, api.folder, "snapshots", "--json", "--tag", tag)
    assert listed.returncode == 0, listed.stderr
    return list(json.loads(listed.stdout))


async def wait_running(api: Api, kind: str, job_id: int, user: str = "alice") -> dict[str, Any]:
    return await api.wait(kind, job_id, user, statuses={"running"}, timeout=60)


async def wait_idle(api: Api, timeout: float = 60) -> None:
    service = service_of(api)
    await eventually(
        lambda: _idle(service),
        bool,
        timeout=timeout,
    )


async def _idle(service: JobService) -> bool:
    health = service.health()
    return (
        health.pending == 0
        and health.running == 0
        and health.maintenance is None
        and not service.forgets
    )


async def test_cancel_running_backup_is_quick_and_leaves_no_lock(api: Api, big_tree: Path) -> None:
    path = link_big(api, big_tree)
    await api.call("POST", "/backup", json={"id": 1, "path": path})
    await wait_running(api, "backup", 1)
    await eventually(
        lambda: api.job("backup", 1), lambda body: body["data"]["progress"]["bytes_done"] > 0
    )
    started = time.monotonic()
    status, body = await api.call("POST", "/backup/cancel", json={"id": 1})
    took = time.monotonic() - started
    assert (status, body["code"]) == (200, 2001), body
    assert body["data"]["status"] == "cancel"
    assert took < 5, f"cancel took {took:.2f}s"
    assert lock_files(api) == []
    # The cancel asked for a prune of the data the backup left, and the service starts it
    # at once: an operator's forget run meanwhile would meet the prune's lock (CI, 0.18).
    await wait_idle(api)
    assert snapshots_with_tag(api, "fa:id=1") == []
    forget = run_restic(api.restic_binary, api.folder, "forget", "--keep-last", "1")
    assert forget.returncode == 0, forget.stderr
    # Cancelling again is fine; a cancelled id may be used again.
    status, body = await api.call("POST", "/backup/cancel", json={"id": 1})
    assert body["code"] == 2001
    status, body = await api.call("POST", "/backup", json={"id": 1, "path": path})
    assert body["code"] == 2001
    assert (await api.wait("backup", 1))["status"] == "success"


async def test_pending_backup_cancelled_never_starts(
    make_api: Any, newest_restic: str, big_tree: Path
) -> None:
    api: Api = await make_api(newest_restic, max_running=1)
    path = link_big(api, big_tree)
    make_small_tree(api.home("alice") / "small")
    await api.call("POST", "/backup", json={"id": 1, "path": path})
    await wait_running(api, "backup", 1)
    await api.call("POST", "/backup", json={"id": 2, "path": "small"})
    assert (await api.job("backup", 2))["data"]["status"] == "pending"
    _status, body = await api.call("POST", "/backup/cancel", json={"id": 2})
    assert body["code"] == 2001 and body["data"]["status"] == "cancel"
    assert (await api.wait("backup", 1))["status"] == "success"
    second = (await api.job("backup", 2))["data"]
    assert second["status"] == "cancel" and second["started_at"] is None
    assert snapshots_with_tag(api, "fa:id=2") == []


async def test_cancel_all_touches_only_the_callers_jobs(
    make_api: Any, newest_restic: str, big_tree: Path
) -> None:
    api: Api = await make_api(newest_restic, max_running=1)
    link_big(api, big_tree, "carol")
    make_small_tree(api.home("alice") / "small")
    make_small_tree(api.home("bob") / "small")
    await api.call("POST", "/backup", user="carol", json={"id": 10, "path": "big"})
    await wait_running(api, "backup", 10, "carol")
    await api.call("POST", "/backup", user="alice", json={"id": 11, "path": "small"})
    await api.call("POST", "/backup", user="alice", json={"id": 12, "path": "small"})
    await api.call("POST", "/backup", user="bob", json={"id": 13, "path": "small"})
    _status, body = await api.call("POST", "/backup/cancel-all", user="alice", data=b"not json")
    assert body["code"] == 2001 and body["data"] == {"cancelled": [11, 12]}
    assert (await api.job("backup", 10, "carol"))["data"]["status"] == "running"
    assert (await api.job("backup", 13, "bob"))["data"]["status"] == "pending"
    # An admin cancels everyone's.
    _status, body = await api.call("POST", "/backup/cancel-all", user="root", admin=True)
    assert body["data"] == {"cancelled": [10, 13]}
    assert lock_files(api) == []


async def test_cancel_refuses_finished_and_unknown(api: Api) -> None:
    make_small_tree(api.home("alice") / "small")
    await api.call("POST", "/backup", json={"id": 3, "path": "small"})
    assert (await api.wait("backup", 3))["status"] == "success"
    status, body = await api.call("POST", "/backup/cancel", json={"id": 3})
    assert status == 400 and body["message"].startswith("err when cancel backup: ")
    status, body = await api.call("POST", "/backup/cancel", json={"id": 99})
    assert status == 400 and body["code"] == 400
    status, body = await api.call("POST", "/restore/cancel", json={"id": 99})
    assert status == 400 and body["message"].startswith("err when cancel restore: ")


async def test_restore_cancel_keeps_partial_files_and_says_so(api: Api, big_tree: Path) -> None:
    path = link_big(api, big_tree)
    await api.call("POST", "/backup", json={"id": 1, "path": path})
    assert (await api.wait("backup", 1))["status"] == "success"
    await api.call("POST", "/restore", json={"restore_id": 2, "backup_id": 1, "dst_path": "out"})
    await wait_running(api, "restore", 2)
    await eventually(
        lambda: api.job("restore", 2),
        lambda body: body["data"]["stat"]["total_size"] > 0 or body["data"]["status"] != "running",
        interval=0.05,
    )
    started = time.monotonic()
    _status, body = await api.call("POST", "/restore/cancel", json={"id": 2})
    assert time.monotonic() - started < 5
    if body["code"] == 2001:
        assert body["data"]["status"] == "cancel"
        assert "partially restored" in body["data"]["extra"]
    else:  # the restore won the race: it finished before the signal landed
        assert (await api.job("restore", 2))["data"]["status"] == "success"
    assert lock_files(api) == []


async def test_delete_forgets_exactly_that_snapshot(api: Api) -> None:
    make_small_tree(api.home("alice") / "small")
    for backup_id in (1, 2):
        await api.call("POST", "/backup", json={"id": backup_id, "path": "small"})
        assert (await api.wait("backup", backup_id))["status"] == "success"
    status, body = await api.call("POST", "/backup/cancel", json={"id": 1})
    assert status == 400
    status, body = await api.call("DELETE", "/backup/1")
    assert body["code"] == 2001, body
    assert (await api.job("backup", 1))["code"] == 4001
    await wait_idle(api)
    assert snapshots_with_tag(api, "fa:id=1") == []
    assert len(snapshots_with_tag(api, "fa:id=2")) == 1
    check = run_restic(api.restic_binary, api.folder, "check")
    assert check.returncode == 0, check.stderr
    status, body = await api.call("DELETE", "/backup/1")
    assert status == 400 and body["message"].startswith("err when delete a backup: ")


async def test_delete_while_another_backup_runs_forgets_after_it(api: Api, big_tree: Path) -> None:
    make_small_tree(api.home("alice") / "small")
    await api.call("POST", "/backup", json={"id": 1, "path": "small"})
    assert (await api.wait("backup", 1))["status"] == "success"
    path = link_big(api, big_tree)
    await api.call("POST", "/backup", json={"id": 2, "path": path})
    await wait_running(api, "backup", 2)
    status, body = await api.call("DELETE", "/backup/1")
    assert body["code"] == 2001
    status, body = await api.call("DELETE", "/backup/2")
    assert status == 400, "a running backup cannot be deleted"
    assert len(snapshots_with_tag(api, "fa:id=1")) == 1, "forget waits for the running backup"
    assert (await api.wait("backup", 2))["status"] == "success"
    await wait_idle(api)
    assert snapshots_with_tag(api, "fa:id=1") == []


async def test_deleted_id_reused_at_once_keeps_its_new_snapshot(api: Api) -> None:
    make_small_tree(api.home("alice") / "small")
    await api.call("POST", "/backup", json={"id": 7, "path": "small"})
    old = await api.wait("backup", 7)
    await api.call("DELETE", "/backup/7")
    (api.home("alice") / "small" / "new.txt").write_text("new\n")
    _status, body = await api.call("POST", "/backup", json={"id": 7, "path": "small"})
    assert body["code"] == 2001
    new = await api.wait("backup", 7)
    assert new["status"] == "success" and new["snapshot_id"] != old["snapshot_id"]
    await wait_idle(api)
    assert [s["id"] for s in snapshots_with_tag(api, "fa:id=7")] == [new["snapshot_id"]]


async def test_destroy_needs_admin_then_new_backup_initialises(api: Api) -> None:
    make_small_tree(api.home("alice") / "small")
    await api.call("POST", "/backup", json={"id": 1, "path": "small"})
    assert (await api.wait("backup", 1))["status"] == "success"
    await api.call("POST", "/restore", json={"restore_id": 1, "backup_id": 1, "dst_path": "out"})
    assert (await api.wait("restore", 1))["status"] == "success"
    status, body = await api.call("POST", "/backup/destroy-repo")
    assert (status, body["code"]) == (403, 403) and body["message"].startswith("forbidden: ")
    status, body = await api.call("GET", "/backup/repo-destroyed")
    assert body["data"] == {"destroyed": False}
    status, body = await api.call("POST", "/backup/destroy-repo", user="root", admin=True)
    assert body["code"] == 2001, body
    assert body["data"]["destroyed"] is True and body["data"]["backup_records_dropped"] == 1
    assert not (api.folder / "repo").exists()
    assert (await api.job("backup", 1))["code"] == 4001
    assert (await api.job("restore", 1))["data"]["status"] == "success", "restore records stay"
    status, body = await api.call("GET", "/backup/repo-destroyed")
    assert body["data"] == {"destroyed": True}
    await api.call("POST", "/backup", json={"id": 1, "path": "small"})
    assert (await api.wait("backup", 1))["status"] == "success"
    status, body = await api.call("GET", "/backup/repo-destroyed")
    assert body["data"] == {"destroyed": False}
    assert len(snapshots_with_tag(api, "fa:id=1")) == 1


async def test_backup_arriving_during_prune_starts_within_10s(api: Api, big_tree: Path) -> None:
    # Two snapshots that share half their data: forgetting the first leaves packs
    # that are half used, so prune has to repack (seconds of work, not a delete).
    link_big(api, big_tree, name="all")
    half = api.home("alice") / "half"
    half.mkdir()
    for folder in sorted((api.home("alice") / "all").iterdir()):
        (half / folder.name).mkdir()
        for index, item in enumerate(sorted(folder.iterdir())):
            if index % 2 == 0:
                (half / folder.name / item.name).hardlink_to(item)
    make_small_tree(api.home("alice") / "small")
    await api.call("POST", "/backup", json={"id": 1, "path": "all"})
    assert (await api.wait("backup", 1))["status"] == "success"
    await api.call("POST", "/backup", json={"id": 2, "path": "half"})
    assert (await api.wait("backup", 2))["status"] == "success"
    service = service_of(api)
    await api.call("DELETE", "/backup/1")

    async def prune_running() -> bool:
        return service.scheduler.exclusive_name == "prune"

    await eventually(prune_running, bool, timeout=60, interval=0.02)
    await api.call("POST", "/backup", json={"id": 3, "path": "small"})
    posted = time.monotonic()
    await api.wait("backup", 3, statuses={"running", "success"}, timeout=10)
    assert time.monotonic() - posted < 10
    assert (await api.wait("backup", 3))["status"] == "success"
    await wait_idle(api, timeout=120)  # the interrupted prune runs again and finishes
    assert lock_files(api) == []
    check = run_restic(api.restic_binary, api.folder, "check")
    assert check.returncode == 0, check.stderr
