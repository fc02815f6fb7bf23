"""Remote repositories: the real restic against a real OpenSSH sshd (sftp:) and moto's S3
server (s3:), through the API, on every restic version under test.

The service passes restic only the repository URL and `[repository.env]`, so everything a
backend needs travels in that environment:

- sftp: restic runs `ssh` itself, found on PATH. OpenSSH reads `~/.ssh/config` from the
  home in the password database, not from `$HOME`, so setting HOME does not reach it.
  Instead `[repository.env] PATH` starts with a folder holding an `ssh` that runs the real
  one with `-F <test ssh_config>` (host alias, port, key, pinned host key): nothing in
  ~/.ssh is read or written. An operator would use the service user's ~/.ssh/config.
- s3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION, which must show up
  in no log line, no restic argument list, no response and not in the state file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Api
from tests.helpers import assert_same_tree, free_port, make_small_tree

SSH_HOST_ALIAS = "fa-test-sftp"
S3_ACCESS_KEY = "AKIAFARESTICTEST0001"
S3_SECRET_KEY = "fa-restic-s3-secret-f00dcafe-9a7b6c5d4e3f2a1b"
S3_REGION = "us-east-1"


def _wait_for_port(port: int, process: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{what} exited with {process.returncode}: {log.read_text()[-2000:]}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    process.kill()
    pytest.fail(f"{what} did not listen on 127.0.0.1:{port}: {log.read_text()[-2000:]}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _env_table(env: dict[str, str]) -> str:
    """Returns `[repository.env]` as TOML (json.dumps gives valid TOML basic strings)."""
    lines = ["[repository.env]"] + [f"{key} = {json.dumps(value)}" for key, value in env.items()]
    return "\n".join(lines) + "\n"


def _restic(
    binary: str, folder: Path, url: str, env: dict[str, str], *arguments: str
) -> subprocess.CompletedProcess[str]:
    """Runs restic by hand, as an operator would, against a remote test repository."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("RESTIC_")}
    environment.update(env)
    environment["RESTIC_REPOSITORY"] = url
    environment["RESTIC_PASSWORD_FILE"] = str(folder / "repo.password")
    return subprocess.run(
        [binary, "--no-cache", *arguments],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def _round_trip(api: Api, backup_id: int) -> dict[str, Any]:
    """Backs a small tree up through the API, restores it elsewhere, compares the bytes."""
    source = make_small_tree(api.home("alice") / "project")
    status, body = await api.call("POST", "/backup", json={"id": backup_id, "path": "project"})
    assert (status, body["code"]) == (200, 2001), body
    done = await api.wait("backup", backup_id)
    assert done["status"] == "success", done
    assert done["extra"] == "" and len(done["snapshot_id"]) == 64, done
    assert done["stat"]["total_size"] == 6 + 1000 + 100_000
    assert done["stat"]["pack_size"] > 0

    status, body = await api.call(
        "POST",
        "/restore",
        json={"restore_id": backup_id + 100, "backup_id": backup_id, "dst_path": "restored"},
    )
    assert (status, body["code"]) == (200, 2001), body
    restored = await api.wait("restore", backup_id + 100)
    assert restored["status"] == "success", restored
    assert restored["stat"]["total_size"] == 6 + 1000 + 100_000
    assert_same_tree(source, api.home("alice") / "restored")

    _, health = await api.call("GET", "/healthz", None)
    assert health["data"]["repository"] == "ok", health
    return done


# -- sftp ----------------------------------------------------------------------------------------


@dataclass
class SftpServer:
    folder: Path
    port: int
    log: Path
    bin_dir: Path

    def url(self, name: str) -> str:
        return f"sftp:{SSH_HOST_ALIAS}:{self.folder / name}"

    @property
    def env(self) -> dict[str, str]:
        """What restic needs to reach this server: our `ssh` first on PATH."""
        return {"PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', os.defpath)}"}


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fa-restic-test", "-f", str(path)],
        check=True,
        capture_output=True,
    )


@pytest.fixture
def sftp_server(tmp_path: Path) -> Iterator[SftpServer]:
    """A real OpenSSH sshd on 127.0.0.1 with its own host key, config and authorized key."""
    sshd = "/usr/sbin/sshd"
    ssh = shutil.which("ssh")
    if os.geteuid() != 0:
        pytest.skip("the sftp test starts sshd, which needs root")
    if not os.access(sshd, os.X_OK) or ssh is None or shutil.which("ssh-keygen") is None:
        pytest.fail("no OpenSSH sshd/ssh/ssh-keygen: run scripts/setup (as root)")
    folder = tmp_path / "sftp"
    folder.mkdir()
    keys = folder / "keys"
    keys.mkdir(mode=0o700)
    _keygen(keys / "host_ed25519")
    _keygen(keys / "client_ed25519")
    shutil.copy(keys / "client_ed25519.pub", keys / "authorized_keys")
    port = free_port()
    sshd_config = keys / "sshd_config"
    sshd_config.write_text(
        f"ListenAddress 127.0.0.1:{port}\n"
        f"HostKey {keys / 'host_ed25519'}\n"
        f"PidFile {keys / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {keys / 'authorized_keys'}\n"
        "StrictModes no\n"
        "UsePAM no\n"
        "PermitRootLogin prohibit-password\n"
        "AuthenticationMethods publickey\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "X11Forwarding no\n"
        "AllowTcpForwarding no\n"
        "Subsystem sftp internal-sftp\n",
        encoding="utf-8",
    )
    # The client side: a config that names the host alias, and a pinned host key.
    known_hosts = keys / "known_hosts"
    host_key = (keys / "host_ed25519.pub").read_text(encoding="utf-8").split()
    known_hosts.write_text(f"{SSH_HOST_ALIAS} {host_key[0]} {host_key[1]}\n", encoding="utf-8")
    ssh_config = keys / "ssh_config"
    ssh_config.write_text(
        f"Host {SSH_HOST_ALIAS}\n"
        "  HostName 127.0.0.1\n"
        f"  Port {port}\n"
        "  User root\n"
        f"  IdentityFile {keys / 'client_ed25519'}\n"
        "  IdentitiesOnly yes\n"
        "  BatchMode yes\n"
        "  StrictHostKeyChecking yes\n"
        f"  HostKeyAlias {SSH_HOST_ALIAS}\n"
        f"  UserKnownHostsFile {known_hosts}\n"
        "  GlobalKnownHostsFile /dev/null\n"
        "  ServerAliveInterval 10\n",
        encoding="utf-8",
    )
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "ssh"
    wrapper.write_text(
        f'#!/bin/sh\nexec {shlex.quote(ssh)} -F {shlex.quote(str(ssh_config))} "$@"\n',
        encoding="utf-8",
    )
    wrapper.chmod(0o755)
    # Debian's sshd insists on its (empty) privilege separation folder, which lives in /run.
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    log = folder / "sshd.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sshd, "-D", "-e", "-f", str(sshd_config)], stdout=output, stderr=output
        )
    try:
        _wait_for_port(port, process, "sshd", log)
        yield SftpServer(folder, port, log, bin_dir)
    finally:
        _stop(process)


async def test_sftp_round_trip_is_byte_identical(
    make_api: Any, restic_binary: str, sftp_server: SftpServer
) -> None:
    url = sftp_server.url("sftp-repo")
    api: Api = await make_api(restic_binary, repository_url=url, extra=_env_table(sftp_server.env))
    done = await _round_trip(api, 1)

    # The repository is where sshd put it, an ordinary restic repository over sftp.
    assert (sftp_server.folder / "sftp-repo" / "config").is_file()
    assert "Accepted publickey for root" in sftp_server.log.read_text()
    listed = await asyncio.to_thread(
        _restic, restic_binary, api.folder, url, sftp_server.env, "snapshots", "--json"
    )
    assert listed.returncode == 0, listed.stderr
    assert [snapshot["id"] for snapshot in json.loads(listed.stdout)] == [done["snapshot_id"]]


# -- s3 (moto) -----------------------------------------------------------------------------------


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    log: Path

    def url(self, name: str) -> str:
        return f"s3:{self.endpoint}/{self.bucket}/{name}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
            "AWS_DEFAULT_REGION": S3_REGION,
        }


@pytest.fixture
def s3_server(tmp_path: Path) -> Iterator[S3Server]:
    """moto's S3 server as a subprocess on 127.0.0.1, with one empty bucket."""
    import boto3  # type: ignore[import-untyped]  # no stubs in the dev dependencies

    port = free_port()
    log = tmp_path / "moto.log"
    environment = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=output,
            stderr=output,
            env=environment,
        )
    try:
        _wait_for_port(port, process, "moto server", log)
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=S3_ACCESS_KEY,
            aws_secret_access_key=S3_SECRET_KEY,
            region_name=S3_REGION,
        )
        client.create_bucket(Bucket="fa-restic-test")
        yield S3Server(endpoint, "fa-restic-test", log)
    finally:
        _stop(process)


def _spy_binary(folder: Path, restic_binary: str) -> tuple[Path, Path]:
    """Returns a restic that records each argument list (NUL-separated, one run per line) and
    whether the S3 secret reached it through the environment, then runs the real restic."""
    spy = folder / "restic-spy"
    record = folder / "restic-argv.log"
    spy.write_text(
        "#!/bin/sh\n"
        f"{{ printf '%s\\0' \"$@\"; "
        '[ -n "$AWS_SECRET_ACCESS_KEY" ] && printf "env:secret"; echo; '
        f"}} >> {shlex.quote(str(record))}\n"
        f'exec {shlex.quote(restic_binary)} "$@"\n',
        encoding="utf-8",
    )
    spy.chmod(0o755)
    return spy, record


async def test_s3_round_trip_keeps_credentials_out_of_logs_and_argv(
    make_api: Any,
    restic_binary: str,
    s3_server: S3Server,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    spy, record = _spy_binary(tmp_path, restic_binary)
    url = s3_server.url("repo")
    api: Api = await make_api(str(spy), repository_url=url, extra=_env_table(s3_server.env))
    done = await _round_trip(api, 7)

    listed = await asyncio.to_thread(
        _restic, restic_binary, api.folder, url, s3_server.env, "snapshots", "--json"
    )
    assert listed.returncode == 0, listed.stderr
    assert [snapshot["id"] for snapshot in json.loads(listed.stdout)] == [done["snapshot_id"]]

    # Every restic the service started: none has a credential in its argv, all got the
    # secret in their environment.
    runs = [line for line in record.read_text(encoding="utf-8").splitlines() if line]
    subcommands: list[str] = []
    for run in runs:
        argv, _, seen = run.rpartition("\0")
        assert S3_SECRET_KEY not in argv and S3_ACCESS_KEY not in argv, argv
        arguments = argv.split("\0")
        subcommand = arguments[2] if arguments[0] == "--cache-dir" else arguments[0]
        subcommands.append(subcommand)
        if subcommand != "version":  # `restic version` needs no repository
            assert seen == "env:secret", run
    assert {"version", "init", "backup", "restore"} <= set(subcommands), subcommands

    # The service logs each restic argv at DEBUG: they are there, and hold no credential.
    logged = caplog.text
    assert "restic start:" in logged and " backup --json " in logged
    assert S3_SECRET_KEY not in logged and S3_ACCESS_KEY not in logged
    state = (api.folder / "state.json").read_text(encoding="utf-8")
    assert S3_SECRET_KEY not in state and S3_ACCESS_KEY not in state
    _, backup = await api.call("GET", "/backup/7")
    _, restore = await api.call("GET", "/restore/107")
    _, health = await api.call("GET", "/healthz", None)
    for body in (backup, restore, health):
        assert S3_SECRET_KEY not in json.dumps(body)
