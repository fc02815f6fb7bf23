"""scripts/fa-restic.service: `systemd-analyze verify` accepts it, it carries the hardening
SPEC §8 asks for, and its ExecStart command line serves and stops cleanly on SIGTERM."""

from __future__ import annotations

import http.client
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import API, JWT_SECRET, free_port

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "scripts" / "fa-restic.service"
EXAMPLE_CONFIG = ROOT / "config.example.toml"
# The install layout the unit names (and the README gives).
INSTALL_VENV = "/opt/fa-restic/.venv"
INSTALL_ROOT = "/opt/fa-restic"
INSTALL_CONFIG = "/etc/fa-restic/config.toml"
VENV = Path(sys.prefix)  # this checkout's .venv, the one running the tests


def service_settings(text: str) -> list[tuple[str, str]]:
    """Returns the [Service] section's `Key=value` lines in order (comments left out)."""
    settings: list[tuple[str, str]] = []
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            settings.append((key.strip(), value.strip()))
    return settings


def localised(text: str, config: Path) -> str:
    """Returns the unit with the install paths replaced by this checkout's venv and `config`."""
    return (
        text.replace(INSTALL_VENV, str(VENV))
        .replace(INSTALL_ROOT, str(ROOT))
        .replace(INSTALL_CONFIG, str(config))
    )


def write_example_config(folder: Path, port: int) -> Path:
    """Writes config.example.toml with a free port and every path inside `folder`."""
    text = EXAMPLE_CONFIG.read_text(encoding="utf-8")
    text, ports = re.subn(r"(?m)^port = 8080\b", f"port = {port}", text)
    assert ports == 1, "config.example.toml no longer has `port = 8080`"
    text = text.replace('"var/', f'"{folder}/var/')
    path = folder / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_unit_has_the_hardening_of_spec_8() -> None:
    settings = dict(service_settings(UNIT.read_text(encoding="utf-8")))
    expected = {
        "Type": "simple",
        "User": "root",
        "Group": "root",
        "RestrictNamespaces": "mnt",
        "StateDirectory": "fa-restic",
        "CacheDirectory": "fa-restic",
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "Restart": "on-failure",
        "RestartSec": "5",
        "KillMode": "mixed",
        "KillSignal": "SIGTERM",
        "TimeoutStopSec": "30",
        "EnvironmentFile": "-/etc/fa-restic/env",
    }
    assert {key: settings.get(key) for key in expected} == expected
    assert settings["ExecStart"] == (
        f"{INSTALL_VENV}/bin/fa-restic serve --config {INSTALL_CONFIG}"
    )
    assert settings.get("ProtectHome") in {"read-only", "no", "tmpfs"}
    every = service_settings(UNIT.read_text(encoding="utf-8"))
    assert ("Environment", "FA_RESTIC_LOG_LEVEL=INFO") in every
    assert len([value for key, value in every if key == "ReadWritePaths"]) >= 2


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.geteuid() != 0:
            pytest.skip(
                "systemd-analyze is missing and scripts/setup, not being root, could not "
                "install it (as root: apt-get install systemd)"
            )
        pytest.fail("systemd-analyze is missing; scripts/setup installs it (package systemd)")
    config = write_example_config(tmp_path, free_port())
    # verify checks that ExecStart's program exists and is executable, so the copy runs this
    # checkout's .venv/bin/fa-restic with a config that exists. User=/Group= stay as they are:
    # verify does not look users up (that happens at start), so no fa-restic user is needed.
    # The copy keeps the unit's name: verify derives the unit type from the file name.
    copy = tmp_path / UNIT.name
    copy.write_text(localised(UNIT.read_text(encoding="utf-8"), config), encoding="utf-8")
    assert (VENV / "bin" / "fa-restic").exists(), "the package is not installed in the venv"

    result = subprocess.run(
        [analyze, "verify", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # verify exits 0 on an unknown key or a value it cannot parse (it warns and ignores the
    # line): any message naming this unit fails the test.
    assert UNIT.name not in output, output


def _healthz(port: int) -> dict[str, object] | None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", f"{API}/healthz")
        body: dict[str, object] = json.loads(connection.getresponse().read())
        return body
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        connection.close()


def test_exec_start_serves_and_stops_on_sigterm_with_exit_0(tmp_path: Path) -> None:
    port = free_port()
    config = write_example_config(tmp_path, port)
    unit = localised(UNIT.read_text(encoding="utf-8"), config)
    settings = service_settings(unit)
    exec_start = [value for key, value in settings if key == "ExecStart"]
    assert len(exec_start) == 1
    argv = shlex.split(exec_start[0])
    assert Path(argv[0]).exists(), argv
    # systemd starts services with a clean environment plus the unit's Environment= lines
    # (PATH among them: it makes `restic` the one scripts/setup linked into .venv/bin), and
    # the EnvironmentFile's FA_JWT_SECRET.
    environment = {"FA_JWT_SECRET": JWT_SECRET, "LANG": "C.UTF-8"}
    for key, value in settings:
        if key == "Environment":
            name, _, text = value.partition("=")
            environment[name] = text
    assert str(VENV / "bin") in environment.get("PATH", "").split(":"), environment

    # The unit's capability bounding set and NoNewPrivileges, as systemd applies them: the
    # service must start with only those (its start-up probe confines a command for real).
    capabilities = dict(settings)["CapabilityBoundingSet"].lower().replace("cap_", "+").split()
    argv = [
        "setpriv",
        "--no-new-privs",
        f"--bounding-set=-all,{','.join(capabilities)}",
        "--inh-caps=-all",
        *argv,
    ]
    log_path = tmp_path / "service.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv, env=environment, cwd="/", stdout=log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 60
            answer = None
            while time.monotonic() < deadline and process.poll() is None:
                answer = _healthz(port)
                if answer is not None:
                    break
                time.sleep(0.1)
            log_text = log_path.read_text(errors="replace")
            assert answer is not None, f"no healthz answer; exit {process.poll()}:\n{log_text}"
            assert answer["code"] == 2001, answer

            process.send_signal(signal.SIGTERM)
            stopped_at = time.monotonic()
            try:
                code = process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pytest.fail("fa-restic did not stop within 10 s of SIGTERM")
            took = time.monotonic() - stopped_at
            log_text = log_path.read_text(errors="replace")
            assert code == 0, f"exit {code} after SIGTERM:\n{log_text}"
            assert took < 10, took
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_without_cap_sys_admin_it_refuses_to_start_unless_allowed(tmp_path: Path) -> None:
    """SPEC §9: where backups cannot be confined the start stops, in one line naming the key."""
    config = write_example_config(tmp_path, free_port())
    serve = [str(VENV / "bin" / "fa-restic"), "serve", "--config", str(config)]
    no_mounts = ["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-all", *serve]
    environment = {**os.environ, "FA_JWT_SECRET": JWT_SECRET}
    refused = subprocess.run(
        no_mounts, env=environment, capture_output=True, text=True, timeout=60, check=False
    )
    assert refused.returncode != 0
    lines = [line for line in refused.stderr.splitlines() if "allow_symlink_races" in line]
    assert len(lines) == 1, refused.stderr
    assert "cannot be confined" in lines[0] and "Traceback" not in refused.stderr

    allowed, changed = re.subn(
        r"(?m)^allow_symlink_races = false",
        "allow_symlink_races = true",
        config.read_text(encoding="utf-8"),
    )
    assert changed == 1, "config.example.toml no longer has `allow_symlink_races = false`"
    config.write_text(allowed, encoding="utf-8")
    port = int(re.findall(r"(?m)^port = (\d+)", allowed)[0])
    log_path = tmp_path / "allowed.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(no_mounts, env=environment, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and _healthz(port) is None:
                assert process.poll() is None, log_path.read_text(errors="replace")
                time.sleep(0.1)
            assert _healthz(port) is not None
        finally:
            process.terminate()
            process.wait(timeout=15)
    assert "NOT confined" in log_path.read_text(errors="replace")
