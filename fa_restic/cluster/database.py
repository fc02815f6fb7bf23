"""The connection to the cluster's PostgreSQL: a pool, its schema, and what an outage raises.

Every node opens one `Database` from a libpq URL (`postgresql://user@host:5432/name`).
Connections idle for more than a second are checked before they are handed out and
replaced when the server went away, so the pool recovers by itself once the server is
back; until then an operation raises `DatabaseUnavailable` after at most `timeout` seconds.

The schema is the SQL files in `sql/`, `NNN_name.sql`, applied in order by `migrate`.
"""

from __future__ import annotations

import logging
import re
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

import orjson
import psycopg
from psycopg.types.json import set_json_dumps, set_json_loads
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from fa_restic.store.errors import StoreUnavailable

log = logging.getLogger("fa_restic.cluster")

DATABASE_URL_ENV = "FA_DATABASE_URL"
"""The environment variable that overrides `[cluster] database_url` (SPEC §10): a secret."""

MIGRATION_LOCK = 0x66612D7265737469
"""The advisory lock every node takes to migrate ("fa-resti" in ASCII): one key, fixed forever,
so that nodes of every version agree on it."""

_SQL_FILE = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")

# SQLSTATE classes that say the server cannot do any work now, whatever the query: connection
# exceptions, insufficient resources, operator intervention (a shutdown), system errors.
_UNAVAILABLE_CLASSES = frozenset({"08", "53", "57", "58"})

Connection = psycopg.AsyncConnection[Any]


class DatabaseUnavailable(StoreUnavailable):
    """The database cannot be reached or cannot work now; try again later.

    The message is short and names no host or account (healthz shows it); the error from
    the driver is its `__cause__`."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    text: str


def migrations() -> list[Migration]:
    """Returns the schema's SQL files in version order; raises ValueError on a misnamed file
    or two files of one version (a packaging mistake, found by the tests)."""
    found: dict[int, Migration] = {}
    for entry in resources.files("fa_restic.cluster").joinpath("sql").iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _SQL_FILE.match(entry.name)
        if match is None:
            raise ValueError(f"schema file {entry.name!r} is not named NNN_name.sql")
        version = int(match.group(1))
        if version in found:
            raise ValueError(f"two schema files of version {version}")
        found[version] = Migration(version, entry.name, entry.read_text(encoding="utf-8"))
    return [found[version] for version in sorted(found)]


def is_unavailable(error: BaseException) -> bool:
    """True when `error` says the server is out of reach or cannot work now, rather than
    that a query was wrong."""
    if isinstance(error, PoolTimeout):
        return True
    if not isinstance(error, psycopg.OperationalError):
        return False
    # No SQLSTATE: libpq failed to connect or lost the connection.
    state = error.sqlstate
    return state is None or state[:2] in _UNAVAILABLE_CLASSES


@contextmanager
def unavailable_as_oserror() -> Iterator[None]:
    """Turns the driver's errors of an outage into DatabaseUnavailable; others pass."""
    try:
        yield
    except (psycopg.Error, PoolTimeout) as error:
        if is_unavailable(error):
            raise DatabaseUnavailable(_reason(error)) from error
        raise


def _reason(error: BaseException) -> str:
    if isinstance(error, PoolTimeout):
        return "database unavailable: no connection"
    state = getattr(error, "sqlstate", None)
    if state is not None and state.startswith("57"):
        return "database unavailable: the server is shutting down or starting"
    if state is not None and state.startswith("53"):
        return "database unavailable: the server is out of resources"
    return "database unavailable: connection lost"


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value)


CHECK_AFTER_IDLE_SECONDS = 1.0
"""A connection idle longer than this is checked (one round trip) before it is handed out."""
_returned: weakref.WeakKeyDictionary[Connection, float] = weakref.WeakKeyDictionary()
"""When each connection last went back to the pool."""


async def _check_when_idle(connection: Connection) -> None:
    # A check on every checkout doubled the round trips of a GET (p99 2.75 ms against a bare
    # handler's 0.57 ms); a connection in steady use is known to be good. One idle longer
    # (across a server restart) is checked, so the first query after an outage still works.
    returned = _returned.get(connection)
    if returned is None or time.monotonic() - returned > CHECK_AFTER_IDLE_SECONDS:
        await AsyncConnectionPool.check_connection(connection)


async def _returning(connection: Connection) -> None:
    _returned[connection] = time.monotonic()


async def _configure(connection: Connection) -> None:
    # orjson, as the state file uses: records are most of what goes over the wire.
    set_json_dumps(_dumps, connection)
    set_json_loads(orjson.loads, connection)


class Database:
    """A pool of connections to the cluster's database; `open` first, `close` last.

    Connections are in autocommit: one statement is one transaction unless `transaction`
    groups several.
    """

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 4,
        timeout: float = 5.0,
        reconnect_timeout: float = 5.0,
        name: str = "fa-restic",
    ) -> None:
        """`timeout`: how long an operation waits for a connection before it raises
        DatabaseUnavailable. `reconnect_timeout`: how long the pool retries one lost
        connection, waiting twice as long each time, before it gives up on it and makes a new
        one when asked. Keep it no longer than `timeout`: the waits then stay below half of
        it, so an operation that starts when the server is back gets a connection in time."""
        self.pool = AsyncConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            reconnect_timeout=reconnect_timeout,
            # A connection that went stale in the pool (a server restart) is replaced before
            # it is handed out, instead of failing the first query after an outage.
            check=_check_when_idle,
            reset=_returning,
            configure=_configure,
            kwargs={"autocommit": True, "connect_timeout": max(2, round(timeout))},
            open=False,
            name=name,
        )
        self.timeout = timeout

    async def open(self) -> None:
        """Opens the pool and waits for its first connections; raises DatabaseUnavailable if
        the server cannot be reached within `timeout` (the pool goes on trying)."""
        await self.pool.open()
        with unavailable_as_oserror():
            await self.pool.wait(timeout=self.timeout)

    async def close(self) -> None:
        """Closes every connection (waiting for those in use)."""
        await self.pool.close()

    async def __aenter__(self) -> Database:
        try:
            await self.open()
        except BaseException:
            # Unlike a service's pool, which goes on trying, a block that never ran leaves
            # nothing behind: no connection attempts going on after it.
            await self.close()
            raise
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """Yields a connection of the pool (autocommit); raises DatabaseUnavailable when none
        can be had within `timeout` or the server goes away meanwhile."""
        with unavailable_as_oserror():
            async with self.pool.connection() as connection:
                yield connection

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        """Yields a connection inside a transaction, committed when the block ends (rolled
        back if it raises); raises DatabaseUnavailable as `connection` does, and then nothing
        was committed unless the commit itself was cut short."""
        async with self.connection() as connection, connection.transaction():
            yield connection

    async def migrate(self) -> list[int]:
        """Applies the schema files not applied yet, in order, in one transaction; returns
        their versions.

        Under a transaction-level advisory lock: nodes starting at once wait for each other,
        and each file is applied exactly once. Raises DatabaseUnavailable, or the driver's
        error of a file that fails (nothing is applied then).
        """
        applied: list[int] = []
        async with self.transaction() as connection:
            await connection.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            await connection.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                " version integer PRIMARY KEY,"
                " name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            cursor = await connection.execute("SELECT version FROM schema_version")
            done = {row[0] for row in await cursor.fetchall()}
            for migration in migrations():
                if migration.version in done:
                    continue
                # A file is several statements: sent without parameters, it goes as one
                # simple query, which PostgreSQL runs statement by statement.
                await connection.execute(migration.text.encode())
                await connection.execute(
                    "INSERT INTO schema_version (version, name) VALUES (%s, %s)",
                    (migration.version, migration.name),
                )
                applied.append(migration.version)
        if applied:
            log.info("database schema: applied %s", ", ".join(map(str, applied)))
        return applied
