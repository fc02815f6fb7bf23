"""Backups a user sees through the API, on every restic version under test: a single file,
an unchanged tree backed up again, the whole home, progress while it runs, and a queue."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from fa_restic.config import load_settings
from fa_restic.restic.messages import parse_snapshots
from fa_restic.server import build_app
from tests.conftest import Api
from tests.helpers import (
    API,
    assert_same_tree,
    make_random_tree,
    make_small_tree,
    run_restic,
    tree_listing,
    write_config,
)

BIG_BYTES = 150 * 1000 * 1000


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~150 MB of random data, made once and hard-linked into each test's home."""
    return make_random_tree(tmp_path_factory.mktemp("big") / "big", BIG_BYTES)


def _link_tree(source: Path, target: Path) -> Path:
    for folder in sorted(source.iterdir()):
        (target / folder.name).mkdir(parents=True)
        for item in folder.iterdir():
            (target / folder.name / item.name).hardlink_to(item)
    return target


def _snapshots(api: Api, tag: str) -> list[dict[str, Any]]:
    listed = run_restic(api.restic_binary, api.folder, "snapshots", "--json", "--tag", tag)
    assert listed.returncode == 0, listed.stderr
    return list(json.loads(listed.stdout))


async def _backup(api: Api, backup_id: int, path: str) -> dict[str, Any]:
    status, body = await api.call("POST", "/backup", json={"id": backup_id, "path": path})
    assert (status, body["code"]) == (200, 2001), body
    done = await api.wait("backup", backup_id)
    assert done["status"] == "success", done
    return done


async def _restore(api: Api, restore_id: int, backup_id: int, dst: str) -> dict[str, Any]:
    status, body = await api.call(
        "POST", "/restore", json={"restore_id": restore_id, "backup_id": backup_id, "dst_path": dst}
    )
    assert (status, body["code"]) == (200, 2001), body
    done = await api.wait("restore", restore_id)
    assert done["status"] == "success", done
    return done


async def test_single_file_is_restored_as_dst_slash_name(api: Api) -> None:
    home = api.home("alice")
    make_small_tree(home / "project")
    report = home / "project" / "sub" / "deeper" / "c.bin"

    done = await _backup(api, 1, "project/sub/deeper/c.bin")
    assert done["path"] == str(report.resolve())
    assert done["stat"]["total_size"] == 100_000
    assert done["stat"]["pack_size"] > 0
    assert len(done["snapshot_id"]) == 64 and done["extra"] == ""
    assert done["progress"]["percent_done"] == 1.0

    restored = await _restore(api, 1, 1, "out")
    assert restored["dst_path"] == str((home / "out").resolve())
    assert restored["stat"] == {"total_size": 100_000, "pack_size": 0}
    assert sorted(path.name for path in (home / "out").iterdir()) == ["c.bin"]
    assert (home / "out" / "c.bin").read_bytes() == report.read_bytes()

    # The snapshot is an ordinary restic snapshot, tagged, that our own parser reads.
    listed = run_restic(api.restic_binary, api.folder, "snapshots", "--json", "--tag", "fa:id=1")
    assert listed.returncode == 0, listed.stderr
    (snapshot,) = parse_snapshots(listed.stdout)
    assert snapshot.id == done["snapshot_id"]
    assert snapshot.tag_value("fa:user") == "alice"
    if snapshot.summary is not None:  # restic >= 0.17 keeps the summary in the snapshot
        assert snapshot.summary.total_bytes_processed == 100_000


async def test_unchanged_tree_backed_up_again(api: Api) -> None:
    source = make_random_tree(api.home("alice") / "data", 2_000_000, file_size=250_000)
    first = await _backup(api, 1, "data")
    second = await _backup(api, 2, "data")
    assert second["stat"]["total_size"] == first["stat"]["total_size"] == 2_000_000
    assert first["stat"]["pack_size"] > 2_000_000 * 0.9  # random data does not compress
    assert second["stat"]["pack_size"] < 20_000, second  # nothing new but a little metadata
    assert second["snapshot_id"] != first["snapshot_id"]
    assert [s["id"] for s in _snapshots(api, "fa:id=2")] == [second["snapshot_id"]]

    await _restore(api, 1, 2, "again")
    assert_same_tree(source, api.home("alice") / "again")


async def test_whole_home(api: Api) -> None:
    home = api.home("alice")
    make_small_tree(home / "project")
    (home / "top.txt").write_bytes(b"top level\n")
    expected = tree_listing(home)

    done = await _backup(api, 1, "/")
    assert done["path"] == str(home.resolve())
    assert done["stat"]["total_size"] == 6 + 1000 + 100_000 + 10

    await _restore(api, 1, 1, "/restored/home")
    restored = home / "restored" / "home"
    assert tree_listing(restored) == expected
    (snapshot,) = _snapshots(api, "fa:id=1")
    assert snapshot["paths"] == [str(home.resolve())]


def _fast_progress_config(folder: Path, restic_binary: str, max_running: int) -> Path:
    """A config like `make_api`'s, but with restic reporting progress 20 times a second.

    restic backs 150 MB of cached data up in about a second here: at the tests' usual
    4 status lines a second, a poll would see one value while it runs, or none.
    """
    folder.mkdir(parents=True)
    config = write_config(folder, restic_binary, max_running=max_running)
    text = config.read_text(encoding="utf-8")
    assert "progress_fps = 4.0" in text
    config.write_text(text.replace("progress_fps = 4.0", "progress_fps = 20.0"), encoding="utf-8")
    return config


async def test_progress_while_running_and_a_second_backup_waits(
    tmp_path: Path, aiohttp_client: Any, restic_binary: str, big_tree: Path
) -> None:
    """With one slot, a big backup shows growing progress while a second one waits pending."""
    folder = tmp_path / "service"
    config = _fast_progress_config(folder, restic_binary, max_running=1)
    api = Api(await aiohttp_client(await build_app(load_settings(config))), folder, restic_binary)
    home = api.home("alice")
    _link_tree(big_tree, home / "big")
    make_small_tree(home / "small")

    for backup_id, path in ((1, "big"), (2, "small")):
        status, body = await api.call("POST", "/backup", json={"id": backup_id, "path": path})
        assert (status, body["code"], body["data"]["status"]) == (200, 2001, "pending"), body

    async def health() -> dict[str, Any]:
        response = await api.client.get(f"{API}/healthz")
        return dict((await response.json())["data"])

    sizes: list[int] = []
    # healthz asks restic about the repository, which takes a while next to a running backup:
    # it is asked on the side so that polling goes on meanwhile.
    health_check: asyncio.Task[dict[str, Any]] | None = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        big = (await api.job("backup", 1))["data"]
        small = (await api.job("backup", 2))["data"]
        if big["status"] in {"success", "failed", "cancel"}:
            break
        if big["status"] == "running":
            # While the first runs, the second waits for the only slot.
            assert small["status"] == "pending", small
            if health_check is None:
                health_check = asyncio.create_task(health())
            progress = big["progress"]
            if 0 < progress["bytes_done"] < progress["total_bytes"]:
                assert 0 < progress["percent_done"] < 1
                assert progress["files_done"] <= progress["total_files"]
                total_size = big["stat"]["total_size"]
                assert not sizes or total_size >= sizes[-1], "total_size never goes down"
                if total_size > 0 and (not sizes or total_size > sizes[-1]):
                    sizes.append(total_size)
        await asyncio.sleep(0.05)

    big = await api.wait("backup", 1)
    assert big["status"] == "success", big
    assert len(sizes) >= 2, f"total_size seen growing while running: {sizes}"
    assert sizes[-1] < BIG_BYTES
    assert big["stat"]["total_size"] == BIG_BYTES
    assert big["progress"]["percent_done"] == 1.0
    assert health_check is not None
    seen = await health_check
    assert (seen["running"], seen["pending"]) == (1, 1), seen

    small = await api.wait("backup", 2)
    assert small["status"] == "success", small
    assert small["started_at"] >= big["finished_at"]


async def test_restore_shows_progress_while_running(
    tmp_path: Path, aiohttp_client: Any, restic_binary: str, big_tree: Path
) -> None:
    """restic >= 0.16 reports it; for 0.14 the job layer measures what landed (polling)."""
    folder = tmp_path / "service"
    config = _fast_progress_config(folder, restic_binary, max_running=1)
    api = Api(await aiohttp_client(await build_app(load_settings(config))), folder, restic_binary)
    _link_tree(big_tree, api.home("alice") / "big")
    await api.call("POST", "/backup", json={"id": 1, "path": "big"})
    assert (await api.wait("backup", 1))["status"] == "success"

    body = {"restore_id": 1, "backup_id": 1, "dst_path": "back"}
    assert (await api.call("POST", "/restore", json=body))[0] == 200
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        restore = (await api.job("restore", 1))["data"]
        if restore["status"] in {"success", "failed", "cancel"}:
            break
        if restore["status"] == "running" and restore["progress"]["total_bytes"] > 0:
            seen.append(restore["progress"])
        await asyncio.sleep(0.02)
    restore = await api.wait("restore", 1)
    assert restore["status"] == "success", restore
    assert seen, "no progress seen while the restore ran"
    assert all(progress["total_bytes"] == BIG_BYTES for progress in seen), seen[-1]
    assert all(0 <= progress["percent_done"] <= 1 for progress in seen)
    assert restore["stat"]["total_size"] == BIG_BYTES
