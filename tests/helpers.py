"""Test helpers: configs, tokens, data trees, byte-for-byte comparison, polling."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import jwt

from fa_restic.restic.runner import stat_fields

JWT_SECRET = "test-secret-that-is-long-enough-for-hs512-0123456789abcdef"
API = "/fa/api/v0"
TERMINAL = {"success", "failed", "cancel"}


def token_for(user: str, *, admin: bool = False, secret: str = JWT_SECRET, **claims: Any) -> str:
    """Returns an HS256 JWT for `user`."""
    return jwt.encode({"username": user, "admin": admin, **claims}, secret, "HS256")


def auth(user: str, *, admin: bool = False) -> dict[str, str]:
    return {"Authorization": f"Bearer {token_for(user, admin=admin)}"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_config(
    folder: Path,
    restic_binary: str,
    *,
    repository_url: str | None = None,
    port: int = 0,
    max_running: int = 2,
    extra: str = "",
    restic_extra: str = "",
) -> Path:
    """Writes a config for a service living in `folder`; returns its path. `extra` goes at
    the end, `restic_extra` in the `[restic]` table."""
    url = repository_url or "repo"
    text = f"""
[server]
host = "127.0.0.1"
port = {port}

[paths]
data_root = "data"
state_file = "state.json"

[repository]
url = "{url}"
password_file = "repo.password"

[restic]
binary = "{restic_binary}"
cache_dir = "cache"
progress_fps = 4.0
{restic_extra}

[jobs]
max_running = {max_running}
max_attempts = 2
cancel_grace_seconds = 3.0
lock_wait_seconds = 20.0

[maintenance]
prune_interval_seconds = 0.0

[auth]
jwt_secret = "{JWT_SECRET}"
{extra}
"""
    path = folder / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def make_home(data_root: Path, user: str) -> Path:
    home = data_root / "users" / user
    home.mkdir(parents=True, exist_ok=True)
    return home


def make_small_tree(root: Path) -> Path:
    """A folder with files, a nested folder, a symlink and an empty folder."""
    (root / "sub" / "deeper").mkdir(parents=True, exist_ok=True)
    (root / "emptydir").mkdir(exist_ok=True)
    (root / "a.txt").write_bytes(b"hello\n")
    (root / "sub" / "b.txt").write_bytes(b"b" * 1000)
    (root / "sub" / "deeper" / "c.bin").write_bytes(os.urandom(100_000))
    if not (root / "link-to-a").is_symlink():
        (root / "link-to-a").symlink_to("a.txt")
    return root


def make_random_tree(root: Path, total_bytes: int, file_size: int = 1 << 20) -> Path:
    """A folder of random (incompressible) files adding up to `total_bytes`."""
    root.mkdir(parents=True, exist_ok=True)
    written = 0
    index = 0
    while written < total_bytes:
        size = min(file_size, total_bytes - written)
        folder = root / f"d{index // 16:03d}"
        folder.mkdir(exist_ok=True)
        (folder / f"f{index:05d}.bin").write_bytes(os.urandom(size))
        written += size
        index += 1
    return root


def tree_listing(root: Path) -> dict[str, tuple[str, str]]:
    """Returns every entry below `root` as relative path -> (kind, content digest or link)."""
    listing: dict[str, tuple[str, str]] = {}
    for folder, folders, files in os.walk(root):
        for name in folders + files:
            path = Path(folder) / name
            relative = str(path.relative_to(root))
            if path.is_symlink():
                listing[relative] = ("link", os.readlink(path))
            elif path.is_dir():
                listing[relative] = ("dir", "")
            else:
                listing[relative] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
    return listing


def assert_same_tree(original: Path, restored: Path) -> None:
    """Asserts that two trees hold the same entries with the same bytes."""
    expected = tree_listing(original)
    actual = tree_listing(restored)
    assert actual == expected, {
        "missing": sorted(set(expected) - set(actual)),
        "extra": sorted(set(actual) - set(expected)),
        "different": sorted(k for k in expected if k in actual and expected[k] != actual[k]),
    }


async def eventually(
    probe: Callable[[], Awaitable[Any]],
    check: Callable[[Any], bool],
    timeout: float = 60.0,
    interval: float = 0.1,
) -> Any:
    """Returns the first probe result that passes `check`; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await probe()
        if check(last):
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"not reached within {timeout}s; last: {last!r}")


def thread_states(pid: int) -> list[str]:
    """Returns the state letter of every thread of `pid` (R, S, D, T, ...), from /proc."""
    found = (stat_fields(task / "stat") for task in Path(f"/proc/{pid}/task").iterdir())
    return [fields[0] for fields in found if fields is not None]


async def stop_process(pid: int, timeout: float = 10.0) -> None:
    """Sends SIGSTOP to `pid` and returns once every one of its threads has stopped.

    kill() returns before the process stops: a thread inside a write() finishes it first,
    so what a stopped process wrote is only settled once each thread shows state T.
    """
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while not all(state in "Tt" for state in thread_states(pid)):
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} did not stop: {thread_states(pid)}")
        await asyncio.sleep(0.001)


def restic_env(folder: Path, repository_url: str | None = None) -> dict[str, str]:
    """Returns the environment to run restic by hand against a test service's repository."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("RESTIC_")}
    environment["RESTIC_REPOSITORY"] = repository_url or str(folder / "repo")
    environment["RESTIC_PASSWORD_FILE"] = str(folder / "repo.password")
    return environment


def run_restic(
    binary: str, folder: Path, *arguments: str, repository_url: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs restic by hand (as an operator would) against the test repository."""
    return subprocess.run(
        [binary, "--no-cache", *arguments],
        env=restic_env(folder, repository_url),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
