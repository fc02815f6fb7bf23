"""SPEC §9: a backup reads nothing outside the caller's home, whatever the user swaps and when.

bob holds the only job slot with a backup whose restic is stopped (SIGSTOP), posts the
attacking backups, swaps folders of their paths for symlinks (one atomic renameat2
exchange, as an attacker would), and lets the slot go. A swap while restic runs is made
with restic itself stopped. Each job must fail with a clear reason, or make a snapshot
that holds nothing from outside bob's home.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from fa_restic.restic.client import Restic, read_version
from fa_restic.restic.commands import Binary, Repository
from fa_restic.restic.errors import ResticError
from fa_restic.restic.sandbox import EXIT_REFUSED, Confinement
from tests.conftest import Api
from tests.helpers import make_random_tree, run_restic

SECRET = "alice-secret.txt"
_RENAME_EXCHANGE = 2


def exchange(path: Path, link_target: Path) -> Path:
    """Atomically swaps the folder at `path` for a symlink to `link_target`.

    Returns where the folder went.
    """
    link = path.with_name(path.name + ".link")
    link.symlink_to(link_target)
    libc = ctypes.CDLL(None, use_errno=True)
    at_cwd = -100
    if libc.renameat2(at_cwd, bytes(link), at_cwd, bytes(path), _RENAME_EXCHANGE) != 0:
        raise OSError(ctypes.get_errno(), "renameat2")
    return link  # the folder now lives under the link's name


def _process_of(needle: bytes) -> int | None:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            command = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in command and b"backup" in command:
            return int(entry)
    return None


async def restic_of(tag: str, timeout: float = 20.0) -> int:
    """Returns the pid of the process running the backup tagged `tag` (restic or its helper)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = _process_of(tag.encode())
        if pid is not None:
            return pid
        await asyncio.sleep(0.005)  # the service runs in this event loop
    raise AssertionError(f"no restic for {tag} within {timeout}s")


def snapshot_nodes(api: Any, snapshot_id: str) -> list[dict[str, Any]]:
    listed = run_restic(api.restic_binary, api.folder, "ls", "--json", snapshot_id)
    assert listed.returncode == 0, listed.stderr
    nodes = [json.loads(line) for line in listed.stdout.splitlines() if line.strip()]
    return [node for node in nodes if node.get("struct_type") == "node"]


def assert_nothing_from_outside(api: Any, data: dict[str, Any], home: Path) -> None:
    """A failed job names why; a successful one holds only what was inside `home`."""
    if data["status"] == "failed":
        assert data["extra"], data
        return
    assert data["status"] == "success", data
    nodes = snapshot_nodes(api, data["snapshot_id"])
    names = {node["name"] for node in nodes}
    assert SECRET not in names, names
    assert "ssh_host_rsa_key" not in names and "hostname" not in names - {"hostname"}, names
    assert data["path"].startswith(str(home)), data


def make_victims(api: Api) -> Path:
    alice = api.home("alice")
    (alice / SECRET).write_text("alice's secret\n", encoding="utf-8")
    return alice


async def test_swaps_while_the_job_waits(make_api: Any, restic_binary: str) -> None:
    api = await make_api(restic_binary, max_running=1)
    alice = make_victims(api)
    bob = api.home("bob")
    make_random_tree(bob / "hold", 48 << 20)
    (bob / "race0").mkdir()
    (bob / "race0" / "mine.txt").write_text("bob's\n", encoding="utf-8")
    (bob / "p" / "q").mkdir(parents=True)
    (bob / "p" / "q" / "mine.txt").write_text("bob's\n", encoding="utf-8")
    (bob / "fdir").mkdir()
    (bob / "fdir" / "hostname").write_text("bob's own hostname file\n", encoding="utf-8")

    assert (await api.call("POST", "/backup", "bob", json={"id": 399, "path": "hold"}))[0] == 200
    holder = await restic_of("fa:id=399")
    os.killpg(holder, signal.SIGSTOP)
    try:
        attacks = {400: "race0", 401: "p/q", 402: "fdir/hostname"}
        for backup_id, path in attacks.items():
            status, body = await api.call(
                "POST", "/backup", "bob", json={"id": backup_id, "path": path}
            )
            assert (status, body["code"]) == (200, 2001), body
        for backup_id in attacks:
            assert (await api.job("backup", backup_id, "bob"))["data"]["status"] == "pending"
        exchange(bob / "race0", alice)
        exchange(bob / "p", alice)
        exchange(bob / "fdir", Path("/etc"))
    finally:
        os.killpg(holder, signal.SIGCONT)
    for backup_id in attacks:
        data = await api.wait("backup", backup_id, "bob")
        assert data["status"] == "failed", data
        assert "symlink" in data["extra"], data
        assert_nothing_from_outside(api, data, bob)
    assert (await api.wait("backup", 399, "bob"))["status"] == "success"


async def test_a_deep_swap_while_restic_runs(make_api: Any, restic_binary: str) -> None:
    api = await make_api(restic_binary, max_running=1)
    alice = make_victims(api)
    bob = api.home("bob")
    source = bob / "work"
    make_random_tree(source / "a-first", 32 << 20)  # read before z/, which is swapped meanwhile
    for deep in ("z/d/e", "z/y"):
        (source / deep).mkdir(parents=True)
        (source / deep / "mine.txt").write_text("bob's\n", encoding="utf-8")

    assert (await api.call("POST", "/backup", "bob", json={"id": 410, "path": "work"}))[0] == 200
    pid = await restic_of("fa:id=410")
    os.killpg(pid, signal.SIGSTOP)
    try:
        exchange(source / "z" / "d" / "e", alice)
        exchange(source / "z" / "y", Path("/etc"))
    finally:
        os.killpg(pid, signal.SIGCONT)
    data = await api.wait("backup", 410, "bob")
    assert_nothing_from_outside(api, data, bob)
    if data["status"] == "success":
        by_path = {node["path"]: node for node in snapshot_nodes(api, data["snapshot_id"])}
        assert by_path["/z/d/e"]["type"] == "symlink", by_path.get("/z/d/e")
        assert by_path["/z/y"]["type"] == "symlink", by_path.get("/z/y")


@pytest.mark.parametrize(
    ("folder", "swapped"),
    [("race0", "race0"), ("p/q", "p"), ("fdir", "fdir"), ("", None)],
)
async def test_restic_confined_refuses_a_swap_made_after_the_check(
    tmp_path: Path, restic_binary: str, folder: str, swapped: str | None
) -> None:
    """The window between the job's check and restic's start is closed by the confinement."""
    users = tmp_path / "users"
    alice = users / "alice"
    alice.mkdir(parents=True)
    (alice / SECRET).write_text("alice's secret\n", encoding="utf-8")
    bob = users / "bob"
    (bob / "race0").mkdir(parents=True)
    (bob / "p" / "q").mkdir(parents=True)
    (bob / "fdir").mkdir()
    for place in ("race0", "p/q", "fdir"):
        (bob / place / "mine.txt").write_text("bob's\n", encoding="utf-8")
    (bob / "to-alice").symlink_to(alice)
    if swapped is not None:
        exchange(bob / swapped, alice)

    version = await read_version(restic_binary)
    password = tmp_path / "repo.password"
    password.write_text("pw\n", encoding="utf-8")
    restic = Restic(
        Binary(restic_binary, version, tmp_path / "cache"),
        Repository(url=str(tmp_path / "repo"), password_file=password),
    )
    await restic.ensure_initialised()
    confinement = Confinement(str(users), "bob", folder)
    if swapped is not None:
        with pytest.raises(ResticError) as refused:
            await restic.backup(Path("/nonexistent"), ["."], ["fa:id=1"], confinement=confinement)
        assert refused.value.exit_code == EXIT_REFUSED
        assert "symlink" in refused.value.message
        assert await restic.snapshots() == []
        return
    # The home itself, with a symlink to alice's home in it: stored as a link, not followed.
    result = await restic.backup(Path("/nonexistent"), ["."], ["fa:id=1"], confinement=confinement)
    listed = run_restic(restic_binary, tmp_path, "ls", "--json", result.snapshot_id)
    nodes = [json.loads(line) for line in listed.stdout.splitlines() if line.strip()]
    paths = {node.get("path"): node.get("type") for node in nodes}
    assert paths["/to-alice"] == "symlink"
    assert not any(SECRET in str(path) for path in paths)
    snapshots = await restic.snapshots()
    assert [snapshot.paths for snapshot in snapshots] == [[str(bob)]]
