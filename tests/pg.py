"""A real PostgreSQL for the tests: one throwaway server per test session, a fresh
database per test (tests/conftest.py offers the fixtures to every folder: the cluster's
tests, and the job layer's tests on the DatabaseStore).

The server is made with initdb in a temporary folder and listens on 127.0.0.1 on a free
port (and on a unix socket in that folder). PostgreSQL refuses to run as root, so as root
it runs as the `postgres` user (or `nobody`). The tests are skipped, saying why, only when
no initdb can be found (scripts/setup installs Debian's postgresql package).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.helpers import free_port

SUPERUSER = "fa"


def _postgres_bin() -> Path | None:
    """Returns the folder of the newest PostgreSQL's initdb and pg_ctl, or None."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl", path=str(Path(found).parent)):
        return Path(found).resolve().parent
    # Debian keeps them out of PATH, one folder per major version.
    folders = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda folder: (
            int(Path(folder).parent.name) if Path(folder).parent.name.isdigit() else 0
        ),
    )
    for folder in reversed(folders):
        if (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    return None


def _unprivileged() -> pwd.struct_passwd | None:
    """Returns the user to run the server as when we are root (initdb refuses root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    pytest.skip("running as root and neither a postgres nor a nobody user exists")


@dataclass
class PostgresServer:
    """A running throwaway PostgreSQL; `stop` and `start` it to play an outage."""

    bin: Path
    folder: Path
    port: int
    account: pwd.struct_passwd | None

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def run(self, *argv: str) -> None:
        """Runs a PostgreSQL program as the server's user; raises RuntimeError with its
        output and the server's log when it fails."""
        extra: dict[str, Any] = {}
        if self.account is not None:
            extra = {
                "user": self.account.pw_uid,
                "group": self.account.pw_gid,
                "extra_groups": [],
            }
        done = subprocess.run(
            [str(self.bin / argv[0]), *argv[1:]],
            check=False,
            capture_output=True,
            text=True,
            cwd=self.folder,
            timeout=120,
            **extra,
        )
        if done.returncode != 0:
            log = self.folder / "log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{argv[0]} failed: {done.stderr.strip()}\n{tail}")

    def start(self) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder}"
            # A throwaway server: durability costs time the tests do not have.
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            " -c max_connections=100"
        )
        log = str(self.folder / "log")
        self.run("pg_ctl", "-D", str(self.data), "-l", log, "-o", options, "-w", "start")

    def stop(self) -> None:
        self.run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def is_running(self) -> bool:
        return (self.data / "postmaster.pid").exists()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL for the whole session, removed at its end."""
    bin_folder = _postgres_bin()
    if bin_folder is None:
        pytest.skip("no PostgreSQL initdb/pg_ctl found (scripts/setup installs postgresql)")
    account = _unprivileged()
    folder = Path(tempfile.mkdtemp(prefix="fa-restic-postgres-"))
    if account is not None:
        os.chown(folder, account.pw_uid, account.pw_gid)
    server = PostgresServer(bin_folder, folder, free_port(), account)
    try:
        # trust: only this machine's 127.0.0.1 and a socket in a folder of the server's user.
        server.run("initdb", "-D", str(server.data), "-U", SUPERUSER, "-A", "trust", "--no-sync")
        server.start()
        yield server
    finally:
        if server.is_running():
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)


_numbers = count(1)


@pytest.fixture
async def database_url(postgres_server: PostgresServer) -> AsyncIterator[str]:
    """The URL of a new, empty database, dropped after the test."""
    if not postgres_server.is_running():  # a test that stopped it failed midway
        postgres_server.start()
    name = f"test_{os.getpid()}_{next(_numbers)}"
    async with await psycopg.AsyncConnection.connect(
        postgres_server.url(), autocommit=True
    ) as admin:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    yield postgres_server.url(name)
    if not postgres_server.is_running():
        postgres_server.start()
    async with await psycopg.AsyncConnection.connect(
        postgres_server.url(), autocommit=True
    ) as admin:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
