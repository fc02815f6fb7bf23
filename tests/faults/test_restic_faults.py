"""restic failing under the service: a full disk, a crash, a vanished backend, unreadable
files, a source removed before its turn (SPEC §7 "restic failing ... ends the job `failed`
with restic's reason in `extra`").

The real restic runs everywhere; only tests/faults/fakes/ holds a fake one. Each test checks
what a user sees through the HTTP API (status and `extra`) and that the service still
answers afterwards.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fa_restic.restic import client
from tests.conftest import Api, RestServer
from tests.helpers import (
    eventually,
    make_random_tree,
    make_small_tree,
    tree_listing,
    write_config,
)

FAKES = Path(__file__).parent / "fakes"
NOBODY = 65534
SUCCESS_CODE = 2001

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount, setpriv, chown)")


# -- helpers -------------------------------------------------------------------------------------


async def assert_serving(api: Api) -> dict[str, Any]:
    """Asserts that the service still answers healthz with success; returns its data."""
    response = await api.client.get("/fa/api/v0/healthz")
    body = await response.json()
    assert response.status == 200, body
    assert body["code"] == SUCCESS_CODE, body
    return dict(body["data"])


def assert_one_clean_line(extra: str) -> None:
    """`extra` is one human line: no newline, no Python or Go traceback."""
    assert extra, "extra is empty"
    assert "\n" not in extra and "\r" not in extra, repr(extra)
    assert "Traceback" not in extra, extra
    assert "goroutine" not in extra, extra
    assert "\x1b" not in extra, repr(extra)


def baked_wrapper(folder: Path, name: str, body: str) -> Path:
    """Writes an executable `#!/bin/sh` script `folder/name` that runs `body`."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / name
    script.write_text(f"#!/bin/sh\n{body}\n", encoding="utf-8")
    script.chmod(0o755)
    return script


async def post_backup(api: Api, backup_id: int, path: str, user: str = "alice") -> None:
    status, body = await api.call("POST", "/backup", user, json={"id": backup_id, "path": path})
    assert (status, body["code"]) == (200, SUCCESS_CODE), body


# -- 1. disk full --------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs, unmounted after the test (and after the service using it has stopped)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)],
        check=True,
        timeout=30,
    )
    try:
        yield mount_point
    finally:
        # A restic still writing there would make this fail with "target is busy".
        unmounted = subprocess.run(
            ["umount", str(mount_point)], capture_output=True, text=True, timeout=30, check=False
        )
        if unmounted.returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], timeout=30, check=False)
            pytest.fail(f"tmpfs still busy after the service stopped: {unmounted.stderr}")


@needs_root
@pytest.mark.timeout(300)
async def test_disk_full_fails_the_backup_with_one_line_and_the_service_goes_on(
    small_disk: Path, make_api: Any, restic_binary: str
) -> None:
    api: Api = await make_api(restic_binary, repository_url=str(small_disk / "repo"))
    make_random_tree(api.home("alice") / "big", 40 * 1024 * 1024)

    started = time.monotonic()
    await post_backup(api, 1, "big")
    backup = await api.wait("backup", 1, timeout=240)
    elapsed = time.monotonic() - started

    print(f"disk full: failed after {elapsed:.1f}s: {backup['extra']}")
    assert backup["status"] == "failed", backup
    assert "no space left" in backup["extra"].lower(), backup
    assert_one_clean_line(backup["extra"])
    assert elapsed < 120, f"a full disk took {elapsed:.0f}s to fail the backup"
    await assert_serving(api)

    # The failed backup leaves no temporary pack behind that would keep the disk full:
    # a small backup right after it goes through.
    make_small_tree(api.home("alice") / "small")
    await post_backup(api, 2, "small")
    small = await api.wait("backup", 2, timeout=120)
    assert small["status"] == "success", small


# -- 2. restic crashing, restic missing ----------------------------------------------------------


@pytest.mark.timeout(180)
async def test_restic_panicking_fails_the_backup_with_one_line(
    tmp_path: Path, make_api: Any, restic_binary: str
) -> None:
    wrapper = baked_wrapper(
        tmp_path / "bin",
        "restic",
        f'exec "{FAKES / "panicking_restic"}" "{restic_binary}" "$@"',
    )
    api: Api = await make_api(str(wrapper))
    make_small_tree(api.home("alice") / "project")

    await post_backup(api, 1, "project")
    backup = await api.wait("backup", 1, timeout=120)

    assert backup["status"] == "failed", backup
    assert_one_clean_line(backup["extra"])
    assert "panic" in backup["extra"], backup
    assert "nil pointer dereference" in backup["extra"], backup
    assert backup["snapshot_id"] is None, backup
    health = await assert_serving(api)
    assert health["repository"] == "ok", health

    # It keeps taking work: the next backup is accepted and ends the same clean way.
    await post_backup(api, 2, "project")
    again = await api.wait("backup", 2, timeout=120)
    assert again["status"] == "failed", again
    assert_one_clean_line(again["extra"])


def processes_mentioning(text: str) -> list[str]:
    """Returns the command lines of live processes that contain `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in command:
            found.append(command)
    return found


@pytest.mark.timeout(120)
async def test_restic_hanging_after_it_gave_up_is_stopped_with_its_reason(
    tmp_path: Path, make_api: Any, newest_restic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What restic 0.18 does now and then on a full disk (see the fake): the service must not
    # wait for it forever. The grace it gets after giving up is 30 s; 2 s keeps the test short.
    monkeypatch.setattr(client, "FINISH_GRACE_SECONDS", 2.0)
    wrapper = baked_wrapper(
        tmp_path / "bin",
        "restic",
        f'exec "{FAKES / "hanging_restic"}" "{newest_restic}" "$@"',
    )
    api: Api = await make_api(str(wrapper))
    make_small_tree(api.home("alice") / "project")

    started = time.monotonic()
    await post_backup(api, 1, "project")
    backup = await api.wait("backup", 1, timeout=60)

    assert backup["status"] == "failed", backup
    assert_one_clean_line(backup["extra"])
    assert "no space left on device" in backup["extra"], backup
    assert time.monotonic() - started < 30, backup
    await eventually(
        lambda: _async_value(processes_mentioning(str(api.folder / "cache"))),
        lambda found: found == [],
        timeout=10,
    )
    await assert_serving(api)


async def _async_value(value: Any) -> Any:
    return value


def run_cli(*arguments: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("FA_", "RESTIC_"))}
    return subprocess.run(
        [sys.executable, "-m", "fa_restic", *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
        stdin=subprocess.DEVNULL,
        check=False,
    )


@pytest.mark.timeout(90)
def test_serve_with_a_missing_restic_exits_1_with_one_clear_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, "/nonexistent/restic")

    started = time.monotonic()
    result = run_cli("serve", "--config", str(config))

    assert result.returncode == 1, result
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fa-restic: "), lines
    assert "/nonexistent/restic" in lines[0], lines
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 30
    assert not (tmp_path / "repo").exists(), "nothing is done with a restic that cannot run"
    assert not (tmp_path / "repo.password").exists()


# -- 3. rest-server gone in the middle of a backup -----------------------------------------------


# How long after the rest-server died the backup may take to end `failed`. restic retries
# each backend request on its own (0.14 ~95 s, >= 0.17 for 15 minutes, hard-coded), so the
# service stops a restic that keeps retrying for longer than `jobs.lock_wait_seconds` (20 s
# in the tests' config), then the forced stop and its bounded unlock: well under a minute.
REST_DOWN_BOUND_SECONDS = 90.0


@pytest.mark.slow
@pytest.mark.timeout(420)
async def test_rest_server_killed_mid_backup_fails_the_backup_naming_the_backend(
    rest_server: RestServer, make_api: Any, restic_binary: str
) -> None:
    api: Api = await make_api(restic_binary, repository_url=rest_server.repository("repo"))
    make_random_tree(api.home("alice") / "big", 150 * 1024 * 1024)

    await post_backup(api, 1, "big")
    await eventually(
        lambda: api.job("backup", 1),
        lambda body: (
            body["data"]["status"] != "pending"
            and (body["data"]["progress"]["bytes_done"] > 0 or body["data"]["status"] != "running")
        ),
        timeout=60,
        interval=0.05,
    )
    running = await api.job("backup", 1)
    assert running["data"]["status"] == "running", running
    rest_server.process.kill()
    rest_server.process.wait(timeout=10)
    killed = time.monotonic()

    backup = await api.wait("backup", 1, timeout=REST_DOWN_BOUND_SECONDS)
    took = time.monotonic() - killed
    print(f"{restic_binary}: failed {took:.1f}s after the rest-server was killed: {backup}")

    assert backup["status"] == "failed", backup
    assert_one_clean_line(backup["extra"])
    assert "connection refused" in backup["extra"], backup
    assert rest_server.url.removeprefix("http://") in backup["extra"], backup
    health = await assert_serving(api)
    assert health["repository"] != "ok", health


# -- 4. unreadable files -------------------------------------------------------------------------


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """A service folder that uid 65534 can reach (pytest's tmp folders are root's, mode 0700)."""
    if os.geteuid() != 0:
        pytest.skip("running restic as another user needs root")
    folder = Path(tempfile.mkdtemp(prefix="fa-restic-unreadable-"))
    folder.chmod(0o755)
    os.chown(folder, NOBODY, NOBODY)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for folder, folders, files in os.walk(root):
        for name in folders + files:
            os.chown(os.path.join(folder, name), uid, gid, follow_symlinks=False)


@needs_root
@pytest.mark.timeout(240)
async def test_unreadable_files_give_an_incomplete_success_naming_them(
    open_folder: Path, make_api: Any, restic_binary: str
) -> None:
    # restic runs as nobody: as root every file is readable. Except a restore: the service
    # stages restores in a folder only its own user may enter (jobs/staging.py), and that
    # user (root) reads the repository anyway.
    wrapper = baked_wrapper(
        open_folder / "bin",
        "restic",
        "\n".join(
            [
                'for argument in "$@"; do',
                '    [ "$argument" = "--" ] && break',
                f'    [ "$argument" = "restore" ] && exec "{restic_binary}" "$@"',
                "done",
                f"exec setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups -- "
                f'"{restic_binary}" "$@"',
            ]
        ),
    )
    password = open_folder / "repo.password"
    password.write_text("nobody's repository password\n", encoding="utf-8")
    password.chmod(0o600)
    os.chown(password, NOBODY, NOBODY)
    (open_folder / "cache").mkdir(mode=0o700)
    os.chown(open_folder / "cache", NOBODY, NOBODY)

    api: Api = await make_api(str(wrapper), folder=open_folder)
    home = api.home("alice")
    source = make_small_tree(home / "project")
    (source / "readable.txt").write_bytes(b"plain\n" * 100)
    secret = source / "secret.txt"
    secret.write_bytes(b"for root's eyes only\n")
    locked = source / "lockeddir"
    locked.mkdir()
    (locked / "inside.txt").write_bytes(b"behind a closed door\n")
    chown_tree(api.data_root, NOBODY, NOBODY)
    secret.chmod(0)
    locked.chmod(0)

    await post_backup(api, 1, "project")
    backup = await api.wait("backup", 1, timeout=180)

    print(f"unreadable: {backup['status']}: {backup['extra']}")
    assert backup["status"] == "success", backup
    extra = backup["extra"]
    assert extra.startswith("incomplete: 2 items could not be read: "), extra
    assert_one_clean_line(extra)
    assert "secret.txt" in extra, extra
    assert "lockeddir" in extra, extra
    assert backup["snapshot_id"] and len(backup["snapshot_id"]) == 64, backup

    status, body = await api.call(
        "POST", "/restore", json={"restore_id": 1, "backup_id": 1, "dst_path": "back"}
    )
    assert (status, body["code"]) == (200, SUCCESS_CODE), body
    restore = await api.wait("restore", 1, timeout=120)
    assert restore["status"] == "success", restore["extra"]

    unreadable = {"secret.txt", "lockeddir", "lockeddir/inside.txt"}
    source_listing = tree_listing(source)  # as root: the secret's digest too
    expected = {k: v for k, v in source_listing.items() if k not in unreadable}
    restored_root = home / "back"
    locked_restored = restored_root / "lockeddir"
    if locked_restored.exists():
        locked_restored.chmod(0o700)  # restic keeps the mode it could read (000): root looks in
    restored = tree_listing(restored_root)
    assert {k: v for k, v in restored.items() if k not in unreadable} == expected
    # What restic could not read is not restored with its content (at most as an empty
    # placeholder, never the secret's bytes).
    assert restored.get("secret.txt") != source_listing["secret.txt"], restored
    assert "lockeddir/inside.txt" not in restored, restored
    await assert_serving(api)


# -- 5. the source removed before the backup's turn ----------------------------------------------


@pytest.mark.timeout(180)
async def test_source_removed_while_pending_fails_saying_it_no_longer_exists(
    make_api: Any, newest_restic: str
) -> None:
    api: Api = await make_api(newest_restic, max_running=1)
    home = api.home("alice")
    make_random_tree(home / "big", 150 * 1024 * 1024)
    doomed = make_small_tree(home / "doomed")

    await post_backup(api, 1, "big")
    await api.wait("backup", 1, statuses={"running"}, timeout=60)
    await post_backup(api, 2, "doomed")
    shutil.rmtree(doomed)
    second = await api.job("backup", 2)
    assert second["data"]["status"] == "pending", second

    # Free the only slot at once instead of waiting for the long backup.
    status, body = await api.call("POST", "/backup/cancel", json={"id": 1})
    assert (status, body["code"]) == (200, SUCCESS_CODE), body

    backup = await api.wait("backup", 2, timeout=120)
    assert backup["status"] == "failed", backup
    assert_one_clean_line(backup["extra"])
    assert "no longer exists" in backup["extra"], backup
    assert "doomed" in backup["extra"], backup
    assert backup["snapshot_id"] is None, backup
    await assert_serving(api)


def test_fakes_are_executable() -> None:
    for fake in FAKES.iterdir():
        assert fake.stat().st_mode & stat.S_IXUSR, fake
