"""A real `fa-restic serve` in a subprocess, for tests that kill it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers import API, auth, free_port, write_config


@dataclass
class ServiceProcess:
    """Starts, calls and kills one service living in `folder`."""

    folder: Path
    restic_binary: str
    max_running: int = 2
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def start(self, timeout: float = 30.0) -> None:
        config = write_config(
            self.folder, self.restic_binary, port=self.port, max_running=self.max_running
        )
        self.log_path = self.folder / "service.log"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "fa_restic", "serve", "--config", str(config)],
                stdout=log,
                stderr=log,
                cwd=self.folder,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"service exited {self.process.returncode}: {self.log()}")
            try:
                status, _ = self.call("GET", "/healthz", user=None)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"service did not answer within {timeout}s: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path else ""

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        user: str | None = "alice",
        admin: bool = False,
        timeout: float = 30.0,
    ) -> tuple[int, dict[str, Any]]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{API}{path}",
            data=data,
            method=method,
            headers=auth(user, admin=admin) if user else {},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def job(self, kind: str, job_id: int) -> dict[str, Any]:
        _, body = self.call("GET", f"/{kind}/{job_id}", user="root", admin=True)
        return body

    def wait_status(
        self, kind: str, job_id: int, statuses: set[str], timeout: float = 120.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        body: dict[str, Any] = {}
        while time.monotonic() < deadline:
            body = self.job(kind, job_id)
            if body["data"] is not None and body["data"]["status"] in statuses:
                return dict(body["data"])
            time.sleep(0.1)
        raise AssertionError(f"{kind} {job_id} not in {statuses} after {timeout}s: {body}")

    def kill(self, sig: signal.Signals = signal.SIGKILL, timeout: float = 15.0) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        code = self.process.wait(timeout=timeout)
        self.process = None
        return code

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill(signal.SIGKILL)


def restic_processes(repository: Path) -> list[int]:
    """Returns the pids of restic processes working on `repository` (from their environment)."""
    found = []
    needle = f"RESTIC_REPOSITORY={repository}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environment = Path(f"/proc/{entry}/environ").read_bytes()
            command = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if needle in environment.split(b"\0") and b"restic" in command.split(b"\0")[0]:
            found.append(int(entry))
    return found


def wait_no_restic(repository: Path, timeout: float = 5.0) -> float:
    """Waits until no restic works on `repository`; returns how long it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if not restic_processes(repository):
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"restic still running after {timeout}s: {restic_processes(repository)}")
