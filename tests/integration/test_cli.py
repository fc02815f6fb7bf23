"""The command-line client (`fa-restic backup/restore/status/cancel/cancel-all/delete`) against
a real service with the real restic, run as a separate process."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shlex
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fa_restic.cli import ProgressReport, describe_progress, human_bytes, human_duration
from tests.conftest import Api
from tests.helpers import assert_same_tree, free_port, make_small_tree, token_for

INTERRUPTIBLE_MAIN = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from fa_restic.__main__ import main; sys.exit(main(sys.argv[1:]))"
)


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


async def start_cli(
    api: Api,
    *arguments: str,
    token: str | None = None,
    environment: dict[str, str] | None = None,
    url_option: bool = True,
    interruptible: bool = False,
) -> asyncio.subprocess.Process:
    """Starts `python -m fa_restic ARGUMENTS --url <the service>` (alice's token in
    FA_RESTIC_TOKEN unless `token` is given; "" leaves it empty).

    The service runs on this test's event loop, so the subprocess is awaited, not waited for.
    `interruptible` makes sure SIGINT raises KeyboardInterrupt in the client even when this
    test run ignores SIGINT (as a background job of a shell does, and children inherit that).
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"FA_RESTIC_TOKEN", "FA_RESTIC_URL"}
    }
    env["FA_RESTIC_TOKEN"] = token if token is not None else token_for("alice")
    env.update(environment or {})
    url = ["--url", str(api.client.make_url(""))] if url_option else []
    launcher = ["-c", INTERRUPTIBLE_MAIN] if interruptible else ["-m", "fa_restic"]
    return await asyncio.create_subprocess_exec(
        sys.executable,
        *launcher,
        *arguments,
        *url,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finish(process: asyncio.subprocess.Process) -> Run:
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return Run(process.returncode, stdout.decode(), stderr.decode())


async def fa_restic(api: Api, *arguments: str, **options: Any) -> Run:
    """Runs the client to its end (see start_cli)."""
    return await finish(await start_cli(api, *arguments, **options))


@pytest.fixture
async def api(make_api: Any, newest_restic: str) -> Api:
    """One service on the newest restic: the client is what is under test, not restic."""
    service: Api = await make_api(newest_restic)
    return service


async def test_backup_status_restore_round_trip(api: Api) -> None:
    source = make_small_tree(api.home("alice") / "project")

    backup = await fa_restic(api, "backup", "project", "--id", "1", "--wait")
    assert backup.code == 0, backup
    assert backup.json()["status"] == "success", backup
    assert backup.json()["path"] == str(source)
    assert "backup 1: success" in backup.stderr, backup

    status = await fa_restic(api, "status", "backup", "1")
    assert status.code == 0, status
    data = status.json()
    assert (data["id"], data["status"], len(data["snapshot_id"])) == (1, "success", 64), data

    restore = await fa_restic(
        api, "restore", "--id", "5", "--backup-id", "1", "--dst", "back/here", "--wait"
    )
    assert restore.code == 0, restore
    assert restore.json()["status"] == "success", restore
    assert "restore 5: success" in restore.stderr, restore
    assert_same_tree(source, api.home("alice") / "back" / "here")

    status = await fa_restic(api, "status", "restore", "5")
    assert (status.code, status.json()["backup_id"]) == (0, 1), status


async def test_without_wait_prints_the_accepted_job_and_status_follows_it(api: Api) -> None:
    make_small_tree(api.home("alice") / "project")
    started = await fa_restic(api, "backup", "project", "--id", "2")
    assert started.code == 0, started
    assert started.json()["id"] == 2
    assert started.json()["status"] in {"pending", "running", "success"}
    done = await api.wait("backup", 2)
    assert done["status"] == "success", done

    deleted = await fa_restic(api, "delete", "2")
    assert deleted.code == 0, deleted
    gone = await fa_restic(api, "status", "backup", "2")
    assert gone.code == 1, gone
    assert "err when load backup [ 2 ]: no such record" in gone.stderr, gone


async def test_token_file_is_read(api: Api, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(token_for("alice") + "\n", encoding="utf-8")
    run = await fa_restic(api, "cancel-all", "backup", "--token-file", str(token_file), token="")
    assert run.code == 0, run
    assert run.json() == {"cancelled": []}


async def test_bad_token_is_unauthorized(api: Api) -> None:
    wrong = token_for("alice", secret="not-the-secret-of-this-service-0123456789abcdef")
    run = await fa_restic(api, "status", "backup", "1", token=wrong)
    assert run.code == 1, run
    assert "unauthorized" in run.stderr, run
    assert run.stdout == ""


async def test_cancel_of_an_unknown_id_fails(api: Api) -> None:
    run = await fa_restic(api, "cancel", "backup", "999")
    assert run.code == 1, run
    assert "err when cancel backup" in run.stderr, run
    run = await fa_restic(api, "cancel", "restore", "999")
    assert run.code == 1, run
    assert "err when cancel restore" in run.stderr, run


async def test_failed_backup_with_wait_exits_1(api: Api) -> None:
    run = await fa_restic(api, "backup", "not-there", "--id", "3", "--wait")
    assert run.code == 1, run
    assert "err when backup file" in run.stderr, run


async def test_usage_errors_exit_2(api: Api, tmp_path: Path) -> None:
    no_token = await fa_restic(api, "status", "backup", "1", token="")
    assert no_token.code == 2, no_token
    assert "FA_RESTIC_TOKEN" in no_token.stderr
    bad_id = await fa_restic(api, "status", "backup", "0")
    assert bad_id.code == 2, bad_id
    missing_file = await fa_restic(
        api, "status", "backup", "1", "--token-file", str(tmp_path / "nope")
    )
    assert missing_file.code == 2, missing_file
    no_token_option = await fa_restic(api, "status", "backup", "1", "--token", "x")
    assert no_token_option.code == 2, no_token_option
    two_lines = tmp_path / "two-tokens"
    two_lines.write_text(token_for("alice") + "\n" + token_for("bob") + "\n", encoding="utf-8")
    two = await fa_restic(api, "status", "backup", "1", "--token-file", str(two_lines), token="")
    assert two.code == 2, two


async def test_url_comes_from_the_environment(api: Api) -> None:
    service = str(api.client.make_url("/fa/api/v0"))
    run = await fa_restic(
        api, "status", "backup", "1", environment={"FA_RESTIC_URL": service}, url_option=False
    )
    assert run.code == 1 and "no such record" in run.stderr, run  # the service answered


async def test_unreachable_service_exits_1(api: Api) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    run = await fa_restic(
        api, "status", "backup", "1", environment={"FA_RESTIC_URL": nobody}, url_option=False
    )
    assert run.code == 1, run
    assert f"cannot reach {nobody}/fa/api/v0" in run.stderr, run


@pytest.fixture
async def slow_api(make_api: Any, newest_restic: str, tmp_path: Path) -> Api:
    """A service whose restic backups take 60 s before they start: time to cancel one or to
    interrupt the client while it waits. (Only `restic backup` is slowed; a shell wrapper is
    fine here, the service itself runs restic without a shell.)"""
    wrapper = tmp_path / "slow-restic"
    wrapper.write_text(
        "#!/bin/sh\n"
        'for argument in "$@"; do [ "$argument" = backup ] && sleep 60; done\n'
        f'exec {shlex.quote(newest_restic)} "$@"\n',
        encoding="utf-8",
    )
    wrapper.chmod(0o755)
    service: Api = await make_api(str(wrapper))
    make_small_tree(service.home("alice") / "project")
    return service


async def test_wait_on_a_cancelled_backup_exits_1(slow_api: Api) -> None:
    client = await start_cli(slow_api, "backup", "project", "--id", "1", "--wait")
    try:
        await slow_api.wait("backup", 1, statuses={"running"}, timeout=30)
        _, body = await slow_api.call("POST", "/backup/cancel", json={"id": 1})
        assert body["code"] == 2001, body
        run = await finish(client)
    finally:
        if client.returncode is None:
            client.kill()
            await client.wait()
    assert run.code == 1, run
    assert run.json()["status"] == "cancel", run
    assert "backup 1: cancel" in run.stderr, run


async def test_ctrl_c_stops_waiting_but_not_the_job(slow_api: Api) -> None:
    client = await start_cli(
        slow_api, "backup", "project", "--id", "1", "--wait", interruptible=True
    )
    try:
        await slow_api.wait("backup", 1, statuses={"running"}, timeout=30)
        await asyncio.sleep(1.0)  # the client is polling by now
        client.send_signal(signal.SIGINT)
        run = await finish(client)
    finally:
        if client.returncode is None:
            client.kill()
            await client.wait()
    assert run.code == 130, run
    assert "stopped waiting; backup 1 goes on" in run.stderr, run
    assert "Traceback" not in run.stderr, run
    assert (await slow_api.job("backup", 1))["data"]["status"] == "running"
    _, body = await slow_api.call("POST", "/backup/cancel", json={"id": 1})
    assert body["code"] == 2001, body


# -- the progress display (no service needed) ------------------------------------------------


RUNNING = {
    "status": "running",
    "progress": {
        "percent_done": 0.5,
        "bytes_done": 3 << 20,
        "total_bytes": 6 << 20,
        "seconds_remaining": 75,
    },
}


def test_human_sizes_and_durations() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1536, 5 << 30)] == [
        "0 B",
        "1023 B",
        "1.5 KiB",
        "5.0 GiB",
    ]
    assert [human_duration(s) for s in (None, 5, 75, 3725)] == ["--:--", "0:05", "1:15", "1:02:05"]


def test_progress_line_shows_percent_bytes_and_eta() -> None:
    line = describe_progress("backup", 7, RUNNING, bar_width=20)
    assert line == "backup 7: running [##########..........]  50.0%  3.0 MiB / 6.0 MiB  ETA 1:15"
    assert describe_progress("restore", 2, {"status": "pending"}).startswith("restore 2: pending")


def test_plain_progress_prints_at_most_a_line_per_5_seconds() -> None:
    now = [0.0]
    stream = io.StringIO()
    report = ProgressReport("backup", 7, stream, live=False, clock=lambda: now[0])
    for step in range(40):  # 20 s of polls every 0.5 s
        now[0] = step * 0.5
        report.update(RUNNING)
    report.finish({"status": "success", "stat": {"total_size": 10, "pack_size": 5}, "extra": ""})
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert len(lines) == 4 + 1, lines
    assert lines[-1] == "backup 7: success, 10 B processed, 5 B added"


def test_live_progress_rewrites_one_line() -> None:
    stream = io.StringIO()
    report = ProgressReport("restore", 3, stream, live=True)
    report.update(RUNNING)
    report.update(RUNNING)
    report.finish({"status": "failed", "stat": {"total_size": 0}, "extra": "disk full"})
    text = stream.getvalue()
    assert text.count("\r") >= 3 and text.count("\n") == 1, text
    assert text.endswith("restore 3: failed, 0 B restored: disk full\n")
