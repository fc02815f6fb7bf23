"""Restores never write through a symlink a user put in their home, on both restore paths.

The service often runs as root. Staged (fa_restic.jobs.staging): restic restores into a
private staging folder, and the staged tree is moved into dst by folder descriptors.
Direct (fa_restic.jobs.direct): restic writes into a nosymfollow mount of dst alone. The
API tests run on both paths (forced, so that every restic version takes each), with the
real restic (every version under test), and compare what lands byte for byte.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fa_restic.api.app import SERVICE_KEY
from fa_restic.jobs import staging
from fa_restic.jobs.staging import StagingError, make_staging, merge_and_remove, merge_into
from fa_restic.names import STAGING_FOLDER
from tests.conftest import Api
from tests.helpers import (
    assert_same_tree,
    eventually,
    make_random_tree,
    make_small_tree,
    tree_listing,
)

USER_ID = 4321
"""A uid/gid nobody on the machine has: the home's owner in these tests."""

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="owners can only be given by root")


def take_path(api: Api, path: str) -> None:
    """Makes the service restore `direct` into dst or `staged`, whatever it would choose."""
    execution = api.client.app[SERVICE_KEY].execution
    execution.settings = dataclasses.replace(execution.settings, restore_direct=(path == "direct"))


@pytest.fixture(params=["direct", "staged"])
def restore_path(request: pytest.FixtureRequest) -> str:
    """Each restore path: straight into dst (confined restic) and through staging."""
    return str(request.param)


@pytest.fixture
async def api(make_api: Any, restic_binary: str, restore_path: str) -> Api:
    """A service on each restic version, restoring on each path."""
    service: Api = await make_api(restic_binary)
    take_path(service, restore_path)
    return service


def staging_left(api: Api) -> list[str]:
    folder = api.data_root / STAGING_FOLDER
    return sorted(os.listdir(folder)) if folder.exists() else []


def chown_tree(root: Path, uid: int = USER_ID) -> None:
    os.chown(root, uid, uid, follow_symlinks=False)
    for folder, folders, files in os.walk(root):
        for name in folders + files:
            os.chown(os.path.join(folder, name), uid, uid, follow_symlinks=False)


async def back_up(api: Api, backup_id: int, path: str) -> None:
    status, body = await api.call("POST", "/backup", json={"id": backup_id, "path": path})
    assert (status, body["code"]) == (200, 2001), body
    done = await api.wait("backup", backup_id)
    assert done["status"] == "success", done


async def restore(api: Api, restore_id: int, backup_id: int, dst: str) -> dict[str, Any]:
    status, body = await api.call(
        "POST",
        "/restore",
        json={"restore_id": restore_id, "backup_id": backup_id, "dst_path": dst},
    )
    assert (status, body["code"]) == (200, 2001), body
    return await api.wait("restore", restore_id)


# -- through the API, with the real restic ---------------------------------------------------


async def test_planted_symlink_is_replaced_and_nothing_lands_outside(
    api: Api, tmp_path: Path
) -> None:
    home = api.home("alice")
    (home / "src" / "sub").mkdir(parents=True)
    (home / "src" / "sub" / "planted.txt").write_bytes(b"from the backup\n")
    (home / "src" / "top.txt").write_bytes(b"top\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"untouched")
    (home / "dst").mkdir()
    (home / "dst" / "sub").symlink_to(outside)
    (home / "dst" / "top.txt").symlink_to(outside / "keep")  # a symlink in a file's place
    await back_up(api, 1, "src")

    done = await restore(api, 1, 1, "dst")

    assert done["status"] == "success", done
    assert tree_listing(outside) == {"keep": tree_listing(outside)["keep"]}
    assert (outside / "keep").read_bytes() == b"untouched"
    assert not (home / "dst" / "sub").is_symlink() and (home / "dst" / "sub").is_dir()
    assert not (home / "dst" / "top.txt").is_symlink()
    assert_same_tree(home / "src", home / "dst")
    assert staging_left(api) == []


async def test_a_symlink_swapped_into_dst_after_acceptance_fails_the_restore(
    make_api: Any, restic_binary: str, restore_path: str, tmp_path: Path
) -> None:
    """dst's parent turned into a symlink while the restore waits: restic 0.18 itself would
    follow it; the service refuses and writes nothing outside."""
    api: Api = await make_api(restic_binary, max_running=1)
    take_path(api, restore_path)
    home = api.home("alice")
    make_small_tree(home / "small")
    make_random_tree(home / "big", 96 << 20)
    await back_up(api, 1, "small")
    (home / "a" / "b").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()

    await api.call("POST", "/backup", json={"id": 2, "path": "big"})  # takes the only slot
    await api.wait("backup", 2, statuses={"running"})
    _, body = await api.call(
        "POST", "/restore", json={"restore_id": 1, "backup_id": 1, "dst_path": "a/b"}
    )
    assert body["code"] == 2001 and body["data"]["status"] == "pending", body
    (home / "a").rename(home / "a-moved")
    (home / "a").symlink_to(outside)
    (outside / "b").mkdir()
    await api.call("POST", "/backup/cancel", json={"id": 2})

    done = await api.wait("restore", 1)

    assert done["status"] == "failed", done
    assert "symlink" in done["extra"], done
    assert tree_listing(outside) == {"b": ("dir", "")}
    assert staging_left(api) == []


@needs_root
async def test_restore_into_a_non_empty_folder_merges(api: Api) -> None:
    home = api.home("alice")
    source = make_small_tree(home / "project")
    chown_tree(home)
    await back_up(api, 1, "project")
    dst = home / "out"
    (dst / "sub").mkdir(parents=True)
    (dst / "unrelated.txt").write_bytes(b"mine\n")
    (dst / "a.txt").write_bytes(b"an older a.txt that is longer than the restored one\n")
    (dst / "sub" / "old.txt").write_bytes(b"old\n")
    (dst / "emptydir").write_bytes(b"a file where the backup has a folder\n")
    (dst / "link-to-a").mkdir()  # a folder where the backup has a symlink
    (dst / "link-to-a" / "inside").write_bytes(b"x")

    done = await restore(api, 1, 1, "out")

    assert done["status"] == "success", done
    restored = tree_listing(dst)
    expected = tree_listing(source)
    assert {name: restored[name] for name in expected} == expected
    assert set(restored) - set(expected) == {"unrelated.txt", "sub/old.txt"}
    assert (dst / "unrelated.txt").read_bytes() == b"mine\n"
    assert (dst / "sub" / "old.txt").read_bytes() == b"old\n"
    for name in expected:  # the backed-up owner, as restic restores it
        assert (dst / name).lstat().st_uid == USER_ID, name
    assert stat.S_IMODE((dst / "sub").stat().st_mode) == stat.S_IMODE(
        (source / "sub").stat().st_mode
    )
    assert staging_left(api) == []


@needs_root
async def test_a_file_backup_lands_as_dst_name_in_a_folder_made_for_the_user(api: Api) -> None:
    home = api.home("alice")
    os.chown(home, USER_ID, USER_ID)
    (home / "docs").mkdir()
    (home / "docs" / "report.bin").write_bytes(os.urandom(300_000))
    await back_up(api, 1, "docs/report.bin")

    done = await restore(api, 1, 1, "made/for/me")

    assert done["status"] == "success", done
    made = home / "made" / "for" / "me"
    assert sorted(os.listdir(made)) == ["report.bin"]
    assert (made / "report.bin").read_bytes() == (home / "docs" / "report.bin").read_bytes()
    for folder in (home / "made", home / "made" / "for", made):
        assert (folder.stat().st_uid, folder.stat().st_gid) == (USER_ID, USER_ID), folder
    assert staging_left(api) == []


async def test_restoring_twice_into_the_same_folder(api: Api) -> None:
    home = api.home("alice")
    source = make_small_tree(home / "project")
    await back_up(api, 1, "project")

    first = await restore(api, 1, 1, "again")
    (home / "again" / "a.txt").write_bytes(b"changed after the first restore\n")
    (home / "again" / "sub" / "deeper").rename(home / "again" / "sub" / "moved")
    second = await restore(api, 2, 1, "again")

    assert (first["status"], second["status"]) == ("success", "success"), (first, second)
    assert second["stat"] == first["stat"]
    listing = tree_listing(home / "again")
    expected = tree_listing(source)
    assert {name: listing[name] for name in expected} == expected
    assert set(listing) - set(expected) == {"sub/moved", "sub/moved/c.bin"}
    assert staging_left(api) == []


async def test_cancelled_restore_keeps_partial_files_and_no_staging(api: Api) -> None:
    home = api.home("alice")
    make_random_tree(home / "big", 192 << 20)
    await back_up(api, 1, "big")
    await api.call("POST", "/restore", json={"restore_id": 1, "backup_id": 1, "dst_path": "out"})
    await api.wait("restore", 1, statuses={"running"})

    async def staged_or_done() -> bool:
        running = (await api.job("restore", 1))["data"]["status"] == "running"
        staged = any((api.data_root / STAGING_FOLDER).rglob("*.bin"))
        return staged or any((home / "out").rglob("*.bin")) or not running

    await eventually(staged_or_done, bool, timeout=30, interval=0.02)

    _, body = await api.call("POST", "/restore/cancel", json={"id": 1})

    if body["code"] == 2001:
        assert body["data"]["status"] == "cancel", body
    else:  # the restore won the race
        assert (await api.job("restore", 1))["data"]["status"] == "success"
    landed = [path.relative_to(home / "out") for path in (home / "out").rglob("*.bin")]
    assert landed, "the partially restored files are in dst"
    for relative in landed:  # whatever landed is the backup's own file, maybe cut short
        assert (home / "big" / relative).is_file(), relative
    assert staging_left(api) == []


# -- the merge itself, on a tmp tree ----------------------------------------------------------


@pytest.fixture
def layout(tmp_path: Path) -> Iterator[dict[str, Path]]:
    """A data root with alice's home, a staging folder holding `sub/x`, and an outside."""
    data = tmp_path / "data"
    home = data / "users" / "alice"
    home.mkdir(parents=True)
    staged = make_staging(data, 7)
    (staged / "sub").mkdir()
    (staged / "sub" / "x").write_bytes(b"restored\n")
    (staged / "top").write_bytes(b"top\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    yield {"data": data, "home": home, "staged": staged, "outside": outside}


def test_staging_folder_is_private_and_outside_the_homes(layout: dict[str, Path]) -> None:
    root = layout["data"] / STAGING_FOLDER
    assert layout["staged"].parent == root
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert root.stat().st_uid == os.geteuid()
    assert stat.S_IMODE(layout["staged"].stat().st_mode) == 0o700
    assert not layout["staged"].is_relative_to(layout["data"] / "users")


@pytest.mark.parametrize("component", ["a", "a/b"])
def test_merge_refuses_a_symlink_in_dst_path(layout: dict[str, Path], component: str) -> None:
    home, outside = layout["home"], layout["outside"]
    (home / "a" / "b").mkdir(parents=True)
    (outside / "b").mkdir()
    target = (home / "a" / "b").resolve()
    shutil.rmtree(home / component)
    (home / component).symlink_to(outside / "b" if component == "a/b" else outside)

    with pytest.raises(StagingError, match="symlink"):
        merge_into(layout["staged"], home, target)

    assert tree_listing(outside) == {"b": ("dir", "")}


def test_merge_replaces_a_planted_symlink_and_a_dst_made_of_symlinks_is_refused(
    layout: dict[str, Path],
) -> None:
    home, outside = layout["home"], layout["outside"]
    (home / "dst").mkdir()
    (home / "dst" / "sub").symlink_to(outside)
    (home / "dst" / "top").symlink_to(outside / "top")

    merge_and_remove(layout["staged"], home, home / "dst")

    assert list(outside.iterdir()) == []
    assert tree_listing(home / "dst") == {
        "sub": ("dir", ""),
        "sub/x": tree_listing(home / "dst")["sub/x"],
        "top": tree_listing(home / "dst")["top"],
    }
    assert (home / "dst" / "sub" / "x").read_bytes() == b"restored\n"
    assert not layout["staged"].exists()


def test_merge_under_a_racing_user_never_writes_outside(layout: dict[str, Path]) -> None:
    """A user loop keeps swapping dst/d for a symlink to outside while the merge runs."""
    home, outside, staged = layout["home"], layout["outside"], layout["staged"]
    (staged / "d").mkdir()
    for index in range(3000):
        (staged / "d" / f"f{index}").write_bytes(b"%d\n" % index)
    (home / "dst" / "d").mkdir(parents=True)
    stop = threading.Event()
    swapping = threading.Event()
    swaps = 0

    def swap() -> None:
        nonlocal swaps
        while not stop.is_set():
            try:
                os.rename(home / "dst" / "d", home / "dst" / f"moved{swaps}")
                os.symlink(outside, home / "dst" / "d")
                swaps += 1
                swapping.set()
                time.sleep(0.0002)
                os.unlink(home / "dst" / "d")
            except OSError:
                pass

    racer = threading.Thread(target=swap)
    racer.start()
    # The merge starts once the user's loop runs (under CI's load, 3,000 files were merged
    # once before the loop's thread had its first turn, and nothing was raced).
    assert swapping.wait(30), "the racing loop never ran"
    try:
        with contextlib.suppress(StagingError):  # entries that kept changing are reported
            merge_into(staged, home, home / "dst")
    finally:
        stop.set()
        racer.join()

    assert swaps > 0
    assert list(outside.iterdir()) == [], "the merge wrote through the user's symlink"
    placed = sum(len(files) for _, _, files in os.walk(home / "dst"))
    left = sum(len(files) for _, _, files in os.walk(staged))
    assert placed + left == 3002  # every file is in the home or still staged, none elsewhere


def test_merge_copies_across_file_systems(layout: dict[str, Path], tmp_path: Path) -> None:
    """EXDEV: the staged tree is copied by descriptor, content, modes, links and times kept."""
    home = layout["home"]
    source = make_small_tree(tmp_path / "source")
    os.chmod(source / "sub" / "b.txt", 0o640)
    os.utime(source / "a.txt", ns=(1_000_000_000, 2_000_000_000))
    shm = Path("/dev/shm")  # noqa: S108 - another file system on purpose, private name below
    copy_forced = not shm.is_dir() or shm.stat().st_dev == home.stat().st_dev
    staged = layout["staged"] if copy_forced else Path(tempfile.mkdtemp(dir=shm))
    shutil.rmtree(staged)
    shutil.copytree(source, staged, symlinks=True)
    victim = layout["outside"] / "victim"
    victim.write_bytes(b"not yours\n")
    (home / "dst" / "sub").mkdir(parents=True)
    (home / "dst" / "a.txt").symlink_to(victim)
    (home / "dst" / "sub" / "b.txt").hardlink_to(victim)  # a user's hard link to a file
    try:
        merge_into(staged, home, home / "dst", copy=copy_forced)
    finally:
        shutil.rmtree(staged, ignore_errors=True)

    assert_same_tree(source, home / "dst")
    assert list(layout["outside"].iterdir()) == [victim]
    assert victim.read_bytes() == b"not yours\n"
    assert stat.S_IMODE((home / "dst" / "sub" / "b.txt").stat().st_mode) == 0o640
    assert (home / "dst" / "a.txt").stat().st_mtime_ns == 2_000_000_000
    assert (home / "dst" / "link-to-a").is_symlink()


def test_a_folder_in_the_way_is_removed_but_never_across_a_mount(
    layout: dict[str, Path],
) -> None:
    home, staged = layout["home"], layout["staged"]
    (home / "dst" / "top" / "deep").mkdir(parents=True)
    (home / "dst" / "top" / "deep" / "f").write_bytes(b"in the way\n")
    (home / "dst" / "top" / "deep" / "out").symlink_to(layout["outside"])
    folder = os.open(home / "dst", os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError) as refused:
            staging._remove_tree(folder, "top", os.stat(folder).st_dev + 1)
        assert refused.value.errno == errno.EXDEV
        assert (home / "dst" / "top" / "deep" / "f").exists()
    finally:
        os.close(folder)

    merge_into(staged, home, home / "dst")

    assert (home / "dst" / "top").read_bytes() == b"top\n"
    assert list(layout["outside"].iterdir()) == []


def test_leftover_staging_of_a_killed_service_is_swept(layout: dict[str, Path]) -> None:
    data = layout["data"]
    running = make_staging(data, 8)
    staging.sweep_staging(data, active={8})
    assert sorted(os.listdir(data / STAGING_FOLDER)) == [running.name]


_AS_NOBODY = """
import os, sys
from pathlib import Path
from fa_restic.api.app import SERVICE_KEY
from fa_restic.jobs import staging
os.setgid(65534)
os.setuid(65534)
data = Path(sys.argv[1])
home = data / "users" / "u"
dst = home / "dst"
(dst / "d").mkdir(parents=True)
for number, copy in ((1, False), (2, True)):
    staged = staging.make_staging(data, number)
    for folder in ("d", f"new{number}"):
        (staged / folder / "deep").mkdir(parents=True)
        (staged / folder / "deep" / f"f{number}").write_text("x")
        (staged / folder / f"g{number}").write_text("y")
        os.chmod(staged / folder / f"g{number}", 0)
        os.chmod(staged / folder / "deep", 0)
        os.chmod(staged / folder, 0o500)
    staging.merge_into(staged, home, dst, copy=copy)
    staging.remove_staging(staged)
    os.chmod(dst / "d", 0o700)  # the user opens up what the first restore made read-only
    os.chmod(dst / "d" / "deep", 0o700)
"""


@needs_root
def test_a_service_that_is_not_root_moves_read_only_folders(tmp_path: Path) -> None:
    """restic restores modes (a 0500 folder, 000 files): the service user must still move them."""
    data = Path(tempfile.mkdtemp(prefix="fa-restic-nobody-"))
    try:
        os.chown(data, 65534, 65534)
        subprocess.run([sys.executable, "-c", _AS_NOBODY, str(data)], check=True)
        dst = data / "users" / "u" / "dst"
        for folder in ("new1", "new2"):  # the modes restic restored, kept
            assert stat.S_IMODE((dst / folder / "deep").stat().st_mode) == 0, folder
            assert stat.S_IMODE((dst / folder).stat().st_mode) == 0o500, folder
            assert stat.S_IMODE((dst / folder / f"g{folder[-1]}").stat().st_mode) == 0, folder
        assert sorted(os.listdir(dst / "d")) == ["deep", "g1", "g2"]
        assert sorted(os.listdir(dst / "d" / "deep")) == ["f1", "f2"]
        assert os.listdir(data / STAGING_FOLDER) == []
    finally:
        shutil.rmtree(data)
