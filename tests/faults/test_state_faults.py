"""The state file broken or gone, with `fa-restic serve` run as its own process (SPEC §6, §7).

A corrupt state file stops the service with one line naming the file and the way out
(`fa-restic rebuild-state`) and leaves it untouched; a journal line cut short by a crash is
ignored; a lost state file is rebuilt from the repository's tagged snapshots on every restic
version, and the rebuilt backups restore byte-identical.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fa_restic.api.app import SERVICE_KEY
from fa_restic.store import Put
from tests.helpers import (
    API,
    TERMINAL,
    assert_same_tree,
    free_port,
    make_random_tree,
    make_small_tree,
    token_for,
    write_config,
)

SUCCESS_CODE = 2001
START_TIMEOUT = 60.0


def clean_environment() -> dict[str, str]:
    """This process's environment without our settings (FA_JWT_SECRET would override the
    config's secret) and without restic's."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("FA_", "RESTIC_"))}


def cli(*arguments: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Runs `python -m fa_restic ARGUMENTS` to its end."""
    return subprocess.run(
        [sys.executable, "-m", "fa_restic", *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_environment(),
        stdin=subprocess.DEVNULL,
        check=False,
    )


def stderr_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@dataclass
class Served:
    """A `fa-restic serve` process and the way to talk to it."""

    folder: Path
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path
    stopped: bool = field(default=False)

    def request(
        self, method: str, path: str, user: str | None = "alice", body: Any = None
    ) -> tuple[int, dict[str, Any]]:
        headers = {"Content-Type": "application/json"}
        if user is not None:
            headers["Authorization"] = f"Bearer {token_for(user, admin=user == 'admin')}"
        data = json.dumps(body).encode() if body is not None else None
        # Always http://127.0.0.1:<port>, built here.
        request = urllib.request.Request(  # noqa: S310
            self.base_url + API + path, data=data, headers=headers, method=method
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def healthz(self) -> dict[str, Any]:
        status, body = self.request("GET", "/healthz", None)
        assert (status, body.get("code")) == (200, SUCCESS_CODE), body
        return dict(body["data"])

    def wait(self, kind: str, job_id: int, user: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        body: dict[str, Any] = {}
        while time.monotonic() < deadline:
            _, body = self.request("GET", f"/{kind}/{job_id}", user)
            data = body.get("data")
            if data is not None and data["status"] in TERMINAL:
                return dict(data)
            time.sleep(0.2)
        raise AssertionError(f"{kind} {job_id} did not end within {timeout}s: {body}")

    def stop(self) -> None:
        """SIGTERM, as systemd stops it: exit 0 within 10 s (SPEC §7)."""
        if self.stopped:
            return
        self.stopped = True
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            raise AssertionError(f"serve ignored SIGTERM: {self.log()}") from None
        assert code == 0, self.log()

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


def start_serve(folder: Path, restic_binary: str) -> Served:
    """Starts `fa-restic serve` on a free port and waits until healthz answers."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = write_config(folder, restic_binary, port=port)
    log_path = folder / f"serve-{time.monotonic_ns()}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "fa_restic", "serve", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=clean_environment(),
        )
    served = Served(folder, process, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"serve exited {process.returncode}: {served.log()}")
        try:
            served.healthz()
            return served
        except (OSError, AssertionError):
            time.sleep(0.1)
    process.kill()
    process.wait(timeout=10)
    raise AssertionError(f"serve did not answer within {START_TIMEOUT}s: {served.log()}")


@pytest.fixture
def services() -> Iterator[list[Served]]:
    """Collects the services a test starts and stops any it left running."""
    started: list[Served] = []
    yield started
    for served in started:
        if served.process.poll() is None:
            served.process.kill()
            served.process.wait(timeout=10)


def home(folder: Path, user: str) -> Path:
    path = folder / "data" / "users" / user
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- a corrupt state file ------------------------------------------------------------------------


GARBAGE = b'{"format": "fa-restic-state", "collections": {"backup": \x00\xff garbage\n'
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ")


def error_lines(stderr: str) -> list[str]:
    """The stderr lines that are not log records (timestamp LEVEL logger: ...)."""
    return [line for line in stderr_lines(stderr) if not LOG_LINE.match(line)]


@pytest.mark.timeout(120)
def test_corrupt_state_file_stops_serve_with_one_line_and_leaves_the_file(
    tmp_path: Path, newest_restic: str
) -> None:
    config = write_config(tmp_path, newest_restic, port=free_port())
    state = tmp_path / "state.json"
    state.write_bytes(GARBAGE)

    result = cli("serve", "--config", str(config), timeout=60)

    assert result.returncode == 1, result
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fa-restic: "), lines
    assert str(state) in lines[0], lines
    assert "rebuild-state" in lines[0], lines
    assert "Traceback" not in result.stderr
    assert state.read_bytes() == GARBAGE
    assert not (tmp_path / "state.json.journal").exists()
    assert not (tmp_path / "state.json.tmp").exists()
    assert not (tmp_path / "repo").exists(), "nothing should touch the repository"


@pytest.mark.timeout(120)
def test_corrupt_state_file_error_is_the_only_stderr_line(
    tmp_path: Path, newest_restic: str
) -> None:
    config = write_config(tmp_path, newest_restic, port=free_port())
    (tmp_path / "state.json").write_bytes(GARBAGE)

    result = cli("serve", "--config", str(config), timeout=60)

    assert result.returncode == 1, result
    assert len(stderr_lines(result.stderr)) == 1, result.stderr


@pytest.mark.timeout(120)
def test_corrupt_journal_line_stops_serve_with_one_line_naming_the_journal(
    tmp_path: Path, newest_restic: str, services: list[Served]
) -> None:
    served = start_serve(tmp_path, newest_restic)
    services.append(served)
    make_small_tree(home(tmp_path, "alice") / "project")
    assert served.request("POST", "/backup", body={"id": 1, "path": "project"})[0] == 200
    assert served.wait("backup", 1, "alice")["status"] == "success"
    served.stop()
    journal = tmp_path / "state.json.journal"
    lines = journal.read_bytes().splitlines(keepends=True)
    assert len(lines) >= 2, lines
    lines[0] = b"}}} not json\n"  # damaged in the middle: not a crash's cut-short last line
    journal.write_bytes(b"".join(lines))
    before = (journal.read_bytes(), (tmp_path / "state.json").read_bytes())

    result = cli("serve", "--config", str(tmp_path / "config.toml"), timeout=60)

    assert result.returncode == 1, result
    lines_out = error_lines(result.stderr)
    assert len(lines_out) == 1, result.stderr
    assert str(journal) in lines_out[0] and "line 1" in lines_out[0], lines_out
    assert (journal.read_bytes(), (tmp_path / "state.json").read_bytes()) == before


# -- a journal line cut short by a crash ---------------------------------------------------------


@pytest.mark.timeout(180)
def test_truncated_last_journal_line_is_ignored_and_serve_starts(
    tmp_path: Path, newest_restic: str, services: list[Served]
) -> None:
    served = start_serve(tmp_path, newest_restic)
    services.append(served)
    source = make_small_tree(home(tmp_path, "alice") / "project")
    assert served.request("POST", "/backup", body={"id": 1, "path": "project"})[0] == 200
    first = served.wait("backup", 1, "alice")
    assert first["status"] == "success", first
    served.stop()

    journal = tmp_path / "state.json.journal"
    assert journal.read_bytes().endswith(b"\n")
    # What a crash in the middle of an append leaves: a line without its newline.
    with journal.open("ab") as handle:
        handle.write(b'{"ops":[{"put":"backup","key":"2","value":{"id":2,"user":"ali')

    served = start_serve(tmp_path, newest_restic)
    services.append(served)
    served.healthz()
    status, body = served.request("GET", "/backup/1")
    assert status == 200 and body["data"]["status"] == "success", body
    assert body["data"]["snapshot_id"] == first["snapshot_id"], body
    status, body = served.request("GET", "/backup/2")
    assert status != 200 or body["data"] is None, body

    # The service goes on writing a clean journal: the next record is kept over a restart.
    assert served.request("POST", "/backup", body={"id": 2, "path": "project"})[0] == 200
    assert served.wait("backup", 2, "alice")["status"] == "success"
    served.stop()
    served = start_serve(tmp_path, newest_restic)
    services.append(served)
    for backup_id in (1, 2):
        status, body = served.request("GET", f"/backup/{backup_id}")
        assert body["data"]["status"] == "success", body
    assert (
        served.request(
            "POST", "/restore", body={"restore_id": 1, "backup_id": 2, "dst_path": "back"}
        )[0]
        == 200
    )
    assert served.wait("restore", 1, "alice")["status"] == "success"
    assert_same_tree(source, home(tmp_path, "alice") / "back")
    served.stop()


# -- the state file lost: rebuild-state ----------------------------------------------------------


@pytest.mark.timeout(360)
def test_rebuild_state_brings_back_every_success_backup_and_they_restore(
    tmp_path: Path, restic_binary: str, services: list[Served]
) -> None:
    alice = home(tmp_path, "alice")
    bob = home(tmp_path, "bob")
    project = make_small_tree(alice / "project")
    notes = alice / "notes.txt"
    notes.write_bytes(b"a single file backup\n" * 50)
    data = make_random_tree(bob / "data", 3 * 1024 * 1024, file_size=256 * 1024)

    served = start_serve(tmp_path, restic_binary)
    services.append(served)
    jobs = [(1, "alice", "project"), (2, "alice", "notes.txt"), (7, "bob", "data")]
    for backup_id, user, path in jobs:
        status, body = served.request("POST", "/backup", user, {"id": backup_id, "path": path})
        assert status == 200, body
    before = {}
    for backup_id, user, _ in jobs:
        record = served.wait("backup", backup_id, user)
        assert record["status"] == "success", record
        before[backup_id] = record
    served.stop()

    for name in ("state.json", "state.json.journal"):
        (tmp_path / name).unlink(missing_ok=True)
    rebuilt = cli("rebuild-state", "--config", str(tmp_path / "config.toml"), timeout=180)
    assert rebuilt.returncode == 0, rebuilt
    assert "3 backup records from 3 snapshots" in rebuilt.stdout, rebuilt

    served = start_serve(tmp_path, restic_binary)
    services.append(served)
    for backup_id, user, _ in jobs:
        status, body = served.request("GET", f"/backup/{backup_id}", user)
        assert status == 200, body
        after = body["data"]
        old = before[backup_id]
        assert after["status"] == "success", after
        assert (after["id"], after["path"], after["snapshot_id"]) == (
            old["id"],
            old["path"],
            old["snapshot_id"],
        ), (old, after)
        assert after["stat"]["total_size"] == old["stat"]["total_size"], (old, after)
    # The owner is rebuilt too: bob's backup is not alice's.
    status, body = served.request("GET", "/backup/7", "alice")
    assert status != 200 or body["data"] is None, body
    # A rebuilt id is in use: it cannot be backed up over.
    status, body = served.request("POST", "/backup", "alice", {"id": 1, "path": "project"})
    assert status != 200 or body.get("code") != SUCCESS_CODE, body

    restores = [(1, "alice", 1, "back/project"), (2, "alice", 2, "back/notes"), (3, "bob", 7, "b")]
    for restore_id, user, backup_id, target in restores:
        status, body = served.request(
            "POST",
            "/restore",
            user,
            {"restore_id": restore_id, "backup_id": backup_id, "dst_path": target},
        )
        assert status == 200, body
    for restore_id, user, _, _ in restores:
        record = served.wait("restore", restore_id, user)
        assert record["status"] == "success", record
    assert_same_tree(project, alice / "back" / "project")
    assert (alice / "back" / "notes" / "notes.txt").read_bytes() == notes.read_bytes()
    assert_same_tree(data, bob / "b")
    served.stop()


# -- a slow state disk ---------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_cancel_while_the_start_of_a_backup_is_being_written_ends_it(
    make_api: Any, newest_restic: str
) -> None:
    """A cancel that lands while the `running` record is being fsynced (a slow disk) must end
    the job; it must not stay `running` for good."""
    api = await make_api(newest_restic)
    service = api.client.app[SERVICE_KEY]
    write = service.store.write
    slowed = asyncio.Event()

    async def slow_write(operations: Any) -> None:
        batch = list(operations)
        starting = any(
            isinstance(op, Put)
            and op.collection == "backup"
            and op.value.get("status") == "running"
            and op.value.get("pid") is None
            for op in batch
        )
        if starting:
            slowed.set()
            await asyncio.sleep(1.0)  # fsync on a busy disk
        await write(batch)

    service.store.write = slow_write
    make_small_tree(api.home("alice") / "project")
    status, body = await api.call("POST", "/backup", json={"id": 1, "path": "project"})
    assert status == 200, body
    await asyncio.wait_for(slowed.wait(), 60)

    status, body = await api.call("POST", "/backup/cancel", json={"id": 1})
    record = await api.wait("backup", 1, timeout=30)

    assert record["status"] == "cancel", (status, body, record)
    health = service.health()
    assert (health.running, health.pending) == (0, 0), health
