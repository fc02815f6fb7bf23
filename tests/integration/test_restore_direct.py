"""Restores straight into dst (fa_restic.jobs.direct): attacks while restic writes, what
restic itself does in the mount, the choice between direct and staged, progress.

Real restic (every version under test), real repositories; restored bytes compared.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from fa_restic.api.app import SERVICE_KEY
from fa_restic.jobs.direct import is_whole_file_system
from fa_restic.restic.client import Restic, read_version
from fa_restic.restic.commands import Binary, Repository
from fa_restic.restic.errors import ResticError
from fa_restic.restic.features import Feature, ResticVersion, has_feature, parse_version
from fa_restic.restic.sandbox import Confinement
from tests.conftest import Api
from tests.helpers import make_random_tree, make_small_tree, stop_process, tree_listing
from tests.integration.test_restore_safety import back_up, restore, staging_left, take_path
from tests.integration.test_symlink_races import exchange

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")


def restic_restoring_into(dst: Path) -> int | None:
    """Returns the pid of the restic (or its sandbox) restoring into `dst`, if any."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"restore" in argv and os.fsencode(dst) in argv:
            return int(entry)
    return None


async def wait_for(probe: Any, timeout: float = 60.0) -> Any:
    """Returns the first truthy probe(); the service runs in this event loop, so yield often."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        await asyncio.sleep(0.002)
    raise AssertionError(f"not reached within {timeout}s")


def files_below(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in root.rglob("*")
        if path.is_file() and not path.is_symlink()
    }


async def test_a_deep_dst_folder_swapped_while_restic_writes(
    make_api: Any, restic_binary: str
) -> None:
    """restic stopped while it writes; a deep folder of dst becomes a symlink to bob's home
    (one renameat2 exchange); restic goes on. Nothing lands in bob's home."""
    api: Api = await make_api(restic_binary)
    take_path(api, "direct")
    alice, bob = api.home("alice"), api.home("bob")
    (bob / "own.txt").write_bytes(b"bob's\n")
    bob_before = tree_listing(bob)
    source = alice / "src"
    make_random_tree(source / "a-first", 48 << 20)
    make_random_tree(source / "z" / "deep" / "er", 16 << 20)
    await back_up(api, 1, "src")
    dst = alice / "out"
    (dst / "z" / "deep" / "er").mkdir(parents=True)  # there before restic, swapped during it

    await api.call("POST", "/restore", json={"restore_id": 1, "backup_id": 1, "dst_path": "out"})
    pid = await wait_for(lambda: restic_restoring_into(dst))
    await wait_for(lambda: any(dst.rglob("*.bin")))  # restic is writing
    await stop_process(pid)
    try:
        moved = exchange(dst / "z" / "deep", bob)
    finally:
        os.kill(pid, signal.SIGCONT)
    done = await api.wait("restore", 1)

    assert done["status"] in ("success", "failed"), done
    assert tree_listing(bob) == bob_before, "restic wrote through the swapped-in symlink"
    originals = files_below(source)
    for relative, content in files_below(dst).items():  # byte for byte, whatever landed
        assert content == originals[relative], relative
    for relative, content in files_below(moved).items():  # written before the swap
        assert originals[f"z/deep/{relative}"].startswith(content), relative
    if done["status"] == "failed":  # restic met the symlink (ELOOP) and said so
        assert done["extra"], done
    assert staging_left(api) == []


def version_of(binary: str) -> ResticVersion:
    output = subprocess.run([binary, "version"], capture_output=True, text=True, check=True)
    return parse_version(output.stdout)


async def restic_for(tmp_path: Path, binary: str) -> Restic:
    password = tmp_path / "repo.password"
    password.write_text("pw\n", encoding="utf-8")
    restic = Restic(
        Binary(binary, await read_version(binary), tmp_path / "cache"),
        Repository(url=str(tmp_path / "repo"), password_file=password),
    )
    await restic.ensure_initialised()
    return restic


async def test_what_restic_itself_does_with_symlinks_in_the_mount(
    tmp_path: Path, restic_binary: str
) -> None:
    """No clearing first: restic alone meets planted symlinks in a nosymfollow mount of dst.
    0.14 neither replaces nor follows them (ELOOP, it reports errors); 0.17+ replaces them."""
    users = tmp_path / "users"
    src, dst, outside = users / "alice" / "src", users / "alice" / "dst", tmp_path / "outside"
    make_small_tree(src)
    outside.mkdir()
    (outside / "keep").write_bytes(b"untouched\n")
    dst.mkdir(parents=True)
    (dst / "sub").symlink_to(outside)  # a folder's place
    (dst / "a.txt").symlink_to(outside / "keep")  # a file's place
    restic = await restic_for(tmp_path, restic_binary)
    backed = await restic.backup(
        src, ["."], ["fa:id=1"], confinement=Confinement(str(users), "alice", "src")
    )
    into = Confinement(str(users), "alice", "dst", writable=True)

    try:
        await restic.restore(backed.snapshot_id, dst, confinement=into)
        failed = False
    except ResticError:
        failed = True

    assert sorted(os.listdir(outside)) == ["keep"]
    assert (outside / "keep").read_bytes() == b"untouched\n"
    if restic.has(Feature.RESTORE_REPLACES_SYMLINKS):
        assert not failed
        assert tree_listing(dst) == tree_listing(src)
    else:
        assert failed
        assert (dst / "sub").is_symlink() and (dst / "a.txt").is_symlink()


async def test_a_hard_link_in_dst_is_replaced_not_written_through(api: Api, tmp_path: Path) -> None:
    take_path(api, "direct")
    home = api.home("alice")
    source = make_small_tree(home / "project")
    await back_up(api, 1, "project")
    victim = tmp_path / "victim"
    victim.write_bytes(b"not yours\n")
    (home / "out" / "sub").mkdir(parents=True)
    (home / "out" / "a.txt").hardlink_to(victim)
    (home / "out" / "sub" / "b.txt").hardlink_to(victim)

    done = await restore(api, 1, 1, "out")

    assert done["status"] == "success", done
    assert victim.read_bytes() == b"not yours\n" and victim.stat().st_nlink == 1
    assert tree_listing(home / "out") == tree_listing(source)


async def test_include_on_the_direct_path(api: Api) -> None:
    take_path(api, "direct")
    home = api.home("alice")
    source = make_small_tree(home / "project")
    await back_up(api, 1, "project")
    (home / "out").mkdir()
    (home / "out" / "sub").symlink_to(home / "project")  # in the way of what is included
    _, body = await api.call(
        "POST",
        "/restore",
        json={"restore_id": 1, "backup_id": 1, "dst_path": "out", "include": ["sub/deeper"]},
    )
    assert body["code"] == 2001, body

    done = await api.wait("restore", 1)

    assert done["status"] == "success", done
    assert (home / "out" / "sub" / "deeper" / "c.bin").read_bytes() == (
        source / "sub" / "deeper" / "c.bin"
    ).read_bytes()
    assert not (home / "out" / "a.txt").exists()
    assert tree_listing(source)["sub/b.txt"] == tree_listing(home / "project")["sub/b.txt"]


def restore_lines(caplog: pytest.LogCaptureFixture, restore_id: int) -> list[str]:
    """Returns the log lines that say which path the restore took."""
    said = [record.getMessage() for record in caplog.records]
    prefixes = (f"restore {restore_id}: direct into ", f"restore {restore_id}: staged (")
    return [line for line in said if line.startswith(prefixes)]


async def test_the_log_says_which_path_a_restore_took(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    """Without forcing: direct with restic >= 0.17, staged with older restic on a home that
    shares its file system (a hard link could lead out of it)."""
    caplog.set_level(logging.INFO, logger="fa_restic.jobs")
    execution = api.client.app[SERVICE_KEY].execution
    execution.settings = dataclasses.replace(execution.settings, restore_direct=None)
    home = api.home("alice")
    source = make_small_tree(home / "project")
    await back_up(api, 1, "project")

    done = await restore(api, 1, 1, "out")

    assert done["status"] == "success", done
    assert tree_listing(home / "out") == tree_listing(source)
    said = restore_lines(caplog, 1)
    if has_feature(version_of(api.restic_binary), Feature.RESTORE_REPLACES_SYMLINKS):
        assert said[:1] == [f"restore 1: direct into {str(home / 'out')!r}"], said
    else:
        assert said[:1] and said[0].startswith("restore 1: staged (restic 0.14"), said


@needs_root
async def test_a_home_on_its_own_file_system_is_restored_directly_by_every_restic(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fa_restic.jobs")
    execution = api.client.app[SERVICE_KEY].execution
    execution.settings = dataclasses.replace(execution.settings, restore_direct=None)
    home = api.home("alice")
    source = make_small_tree(api.folder / "elsewhere" / "project")
    mount = ["mount", "-t", "tmpfs", "-o", "size=64m", "fa-test", str(home)]
    await asyncio.to_thread(subprocess.run, mount, check=True)
    try:
        assert is_whole_file_system(home)
        (home / "project").mkdir()
        shutil.copytree(source, home / "project", symlinks=True, dirs_exist_ok=True)
        await back_up(api, 1, "project")

        done = await restore(api, 1, 1, "out")

        assert done["status"] == "success", done
        assert tree_listing(home / "out") == tree_listing(source)
        assert restore_lines(caplog, 1)[:1] == [f"restore 1: direct into {str(home / 'out')!r}"]
    finally:
        await asyncio.to_thread(subprocess.run, ["umount", "--lazy", str(home)], check=True)


async def test_progress_is_measured_in_dst_where_restic_prints_none(
    make_api: Any, restic_binary: str
) -> None:
    """restic < 0.16 prints no restore progress: the service measures dst while it writes."""
    if has_feature(version_of(restic_binary), Feature.RESTORE_PROGRESS_JSON):
        pytest.skip("this restic prints its own restore progress")
    api: Api = await make_api(restic_binary)
    take_path(api, "direct")
    home = api.home("alice")
    make_random_tree(home / "big", 64 << 20)
    await back_up(api, 1, "big")
    dst = home / "out"
    dst.mkdir()
    (dst / "old.txt").write_bytes(os.urandom(1 << 20))  # there before: not counted

    await api.call("POST", "/restore", json={"restore_id": 1, "backup_id": 1, "dst_path": "out"})
    pid = await wait_for(lambda: restic_restoring_into(dst))
    await wait_for(lambda: restored_bytes(dst) > 0)  # a created file may still be empty
    await stop_process(pid)  # holds the restore mid-way while the progress is read
    try:
        written = restored_bytes(dst)
        progress = await progress_once(api, lambda progress: progress["bytes_done"] > 0)
    finally:
        os.kill(pid, signal.SIGCONT)
    done = await api.wait("restore", 1)

    assert done["status"] == "success", done
    assert 0 < progress["bytes_done"] <= written + (1 << 20)  # old.txt may count once flushed
    assert progress["total_bytes"] == 64 << 20
    restored = files_below(dst)
    assert restored.pop("old.txt") and restored == files_below(home / "big")


def restored_bytes(dst: Path) -> int:
    """Returns the size of the restored files (*.bin) under `dst` so far."""
    return sum(path.stat().st_size for path in dst.rglob("*.bin"))


async def progress_once(api: Api, check: Any) -> dict[str, Any]:
    """Returns the running restore's progress once `check` passes."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        data = (await api.job("restore", 1))["data"]
        assert data["status"] == "running", data
        if check(data["progress"]):
            return dict(data["progress"])
        await asyncio.sleep(0.1)
    raise AssertionError("no progress while restic was stopped mid-restore")


async def test_a_backup_too_large_to_hold_is_staged_into_a_dst_that_is_not_empty(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    """A direct restore into a dst with something in it holds the snapshot's tree; past
    `direct_tree_nodes` it stops reading and stages instead, with the same result."""
    caplog.set_level(logging.INFO, logger="fa_restic.jobs")
    execution = api.client.app[SERVICE_KEY].execution
    execution.settings = dataclasses.replace(
        execution.settings, restore_direct=True, direct_tree_nodes=3
    )
    home = api.home("alice")
    source = make_small_tree(home / "project")
    await back_up(api, 1, "project")
    (home / "out").mkdir()
    (home / "out" / "mine.txt").write_text("already here")

    done = await restore(api, 1, 1, "out")

    assert done["status"] == "success", done
    assert tree_listing(home / "out") == {
        **tree_listing(source),
        "mine.txt": tree_listing(home / "out")["mine.txt"],
    }
    said = restore_lines(caplog, 1)
    assert said[-1] == (
        "restore 1: staged (the backup has more than 3 entries and dst is not empty)"
    ), said
    assert not staging_left(api)
