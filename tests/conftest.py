"""Shared fixtures: the restic versions under test, a service in-process, a rest-server."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from fa_restic.config import load_settings
from fa_restic.server import build_app
from tests.helpers import API, TERMINAL, auth, eventually, free_port, make_home, write_config

# The throwaway PostgreSQL (one server per session, a fresh database per test), for the
# cluster's tests, the job layer's tests on the DatabaseStore and the service in cluster mode.
from tests.pg import database_url, postgres_server  # noqa: F401 (fixtures)


def _binaries() -> list[str]:
    configured = os.environ.get("FA_RESTIC_TEST_BINARIES")
    if configured:
        return [os.path.abspath(entry) for entry in configured.split(":") if entry]
    found = shutil.which("restic")
    return [found] if found else []


def _version_of(binary: str) -> str:
    output = subprocess.run([binary, "version"], capture_output=True, text=True, check=False)
    parts = output.stdout.split()
    return parts[1] if len(parts) > 1 else "unknown"


RESTIC_BINARIES = _binaries()
RESTIC_IDS = [f"restic-{_version_of(binary)}" for binary in RESTIC_BINARIES]


@pytest.fixture(params=RESTIC_BINARIES, ids=RESTIC_IDS)
def restic_binary(request: pytest.FixtureRequest) -> str:
    """Each restic version under test (FA_RESTIC_TEST_BINARIES)."""
    return str(request.param)


@pytest.fixture
def newest_restic() -> str:
    """The newest restic under test, for tests about the service rather than restic."""
    return max(
        RESTIC_BINARIES,
        key=lambda binary: tuple(
            int(part) for part in _version_of(binary).split(".") if part.isdigit()
        ),
    )


@dataclass
class Api:
    """A running service and an HTTP client for it."""

    client: TestClient[Any, Any]
    folder: Path
    restic_binary: str

    @property
    def data_root(self) -> Path:
        return self.folder / "data"

    def home(self, user: str) -> Path:
        return make_home(self.data_root, user)

    async def call(
        self,
        method: str,
        path: str,
        user: str | None = "alice",
        *,
        admin: bool = False,
        json: Any = None,
        data: Any = None,
    ) -> tuple[int, dict[str, Any]]:
        headers = auth(user, admin=admin) if user else {}
        response = await self.client.request(
            method, API + path, headers=headers, json=json, data=data
        )
        return response.status, await response.json()

    async def job(
        self, kind: str, job_id: int, user: str = "alice", admin: bool = False
    ) -> dict[str, Any]:
        _, body = await self.call("GET", f"/{kind}/{job_id}", user, admin=admin)
        return body

    async def wait(
        self,
        kind: str,
        job_id: int,
        user: str = "alice",
        timeout: float = 120.0,
        statuses: set[str] = TERMINAL,
    ) -> dict[str, Any]:
        """Returns the job's data once its status is in `statuses`."""
        body = await eventually(
            lambda: self.job(kind, job_id, user, admin=True),
            lambda body: body["data"] is not None and body["data"]["status"] in statuses,
            timeout=timeout,
        )
        return dict(body["data"])


@pytest.fixture
async def make_api(tmp_path: Path, aiohttp_client: Any) -> AsyncIterator[Any]:
    """Returns a factory that starts a service in-process (its own folder, repository, state)."""
    started: list[Api] = []

    async def make(
        restic_binary: str,
        *,
        folder: Path | None = None,
        repository_url: str | None = None,
        max_running: int = 2,
        extra: str = "",
        restic_extra: str = "",
    ) -> Api:
        folder = folder or tmp_path / f"service{len(started)}"
        folder.mkdir(parents=True, exist_ok=True)
        config = write_config(
            folder,
            restic_binary,
            repository_url=repository_url,
            max_running=max_running,
            extra=extra,
            restic_extra=restic_extra,
        )
        app = await build_app(load_settings(config))
        client = await aiohttp_client(app)
        api = Api(client, folder, restic_binary)
        started.append(api)
        return api

    yield make


@pytest.fixture
async def api(make_api: Any, restic_binary: str) -> Api:
    """A service on each restic version under test, with a local repository."""
    service: Api = await make_api(restic_binary)
    return service


@dataclass
class RestServer:
    url: str
    folder: Path
    process: subprocess.Popen[bytes]

    def repository(self, name: str) -> str:
        return f"rest:{self.url}/{name}/"


@pytest.fixture
def rest_server(tmp_path: Path) -> Iterator[RestServer]:
    """A real restic-rest-server on 127.0.0.1 (no auth), stopped after the test."""
    binary = os.environ.get("FA_RESTIC_REST_SERVER") or shutil.which("restic-rest-server")
    if not binary:
        pytest.fail("no restic-rest-server: run scripts/setup (or set FA_RESTIC_REST_SERVER)")
    folder = tmp_path / "rest-server"
    folder.mkdir()
    port = free_port()
    process = subprocess.Popen(
        [binary, "--no-auth", "--path", str(folder), "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    import socket

    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    else:
        process.kill()
        pytest.fail("rest-server did not start")
    yield RestServer(f"http://127.0.0.1:{port}", folder, process)
    process.terminate()
    process.wait(timeout=10)
