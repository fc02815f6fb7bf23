"""The job records in PostgreSQL for the service: a Store (fa_restic.store.protocol) over
`Database` and `DatabaseRecords`.

This is the first, single-node step of SPEC §10: one node keeps its records in the
database instead of the state file. Claims, leases and cancels across nodes are not built
yet, so two nodes on one database would both run the same pending jobs. `start` therefore
takes "the one node" lock, a session-level advisory lock on a connection of its own held
until `stop`, and refuses to start while another process holds it.

Every write is one transaction, committed before `write` returns; writes are committed in
the order they were asked for (one after another), as the state file's journal appends
them. `counts` answers from a cache that is read at start and again shortly after writes,
in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

import psycopg
from psycopg_pool import PoolTimeout

from fa_restic.cluster.database import Database, DatabaseUnavailable, unavailable_as_oserror
from fa_restic.cluster.records import DatabaseRecords
from fa_restic.store import Cleared, Collections, Layout, Operation, StateError, Store, Value

log = logging.getLogger("fa_restic.cluster")

Found = TypeVar("Found")

NODE_LOCK = 0x66612D6F6E65
"""The advisory lock of "the one node" ("fa-one" in ASCII): held by the node that uses the
database, as long as it runs. One key, fixed forever, other than the migrations' lock."""

LOCK_ATTEMPTS = 3
LOCK_RETRY_SECONDS = 0.5

COUNTS_DELAY = 0.5
"""How long after a write the counts are read again: writes meanwhile share one read."""

WATCH_SECONDS = 5.0
"""How often the node checks its lock's connection (healthz's `database`) and beats."""

ONE_NODE_ONLY = "several nodes are not supported yet"
DISPLACED = "database unavailable: another node took this node's place"

OK = "ok"


class DatabaseInUse(StateError):
    """Another process holds the one node's lock: this node must not start."""

    def __init__(self, message: str, holder: str = "another process") -> None:
        super().__init__(message)
        self.holder = holder
        """Who holds the lock (application name and address), as far as one may see."""


def redact(url: str) -> str:
    """Returns a libpq URL or keyword string with its password replaced by `***`, to be
    logged or shown in an error."""
    # postgresql://user:password@host
    url = re.sub(r"(://[^:/@?#]*):[^@/?#]*@", r"\1:***@", url)
    # ?password=... in a URL, password=... in a keyword string (quoted or not)
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^&\s]+)", r"\1***", url)


def _password_of(url: str) -> str | None:
    try:
        password = psycopg.conninfo.conninfo_to_dict(url).get("password")
    except psycopg.Error:
        return None
    return str(password) if password else None


def _clean(text: str, url: str) -> str:
    """Returns a driver's message with the URL's password taken out (libpq does not echo
    it, but a message is no place to find out)."""
    password = _password_of(url)
    return text.replace(password, "***") if password else text


class DatabaseStore:
    """The job layer's Store in the cluster's PostgreSQL; `start` first, `stop` last."""

    def __init__(
        self,
        url: str,
        *,
        layout: Layout,
        node: str,
        timeout: float = 5.0,
        counts_delay: float = COUNTS_DELAY,
        watch_seconds: float = WATCH_SECONDS,
    ) -> None:
        """`layout`: the job layer's (its indexed collections are those `counts` answers).
        `node`: this node's name, shown to an operator (pg_stat_activity, healthz).
        `timeout`: how long an operation waits for a connection (DatabaseUnavailable)."""
        self._url = url
        self.layout = layout
        self.node = node
        self.timeout = timeout
        self.database = Database(url, timeout=timeout, name=f"fa-restic {node}")
        self.records = DatabaseRecords(self.database)
        self._counts_delay = counts_delay
        self._watch_seconds = watch_seconds
        self._lock: psycopg.AsyncConnection[Any] | None = None
        self._counts: dict[str, dict[str, int]] = {name: {} for name in layout.indexed}
        self._counts_task: asyncio.Task[None] | None = None
        self._counts_stale = False
        self._watch_task: asyncio.Task[None] | None = None
        self._writing = asyncio.Lock()
        self._writes: set[asyncio.Task[Cleared]] = set()
        self._state = OK
        self._displaced = False
        self._started = False
        self._stopped = False

    # -- start and stop ----------------------------------------------------------------------

    async def start(self) -> Collections:
        """Takes the one node's lock, brings the schema up to date and returns the live job
        records, the forget queue and the meta values (finished jobs are left out).

        Raises DatabaseInUse when another node uses the database, StateError (one line, no
        password) when the database cannot be reached or read; nothing is left open then.
        """
        if self._started:
            raise RuntimeError("the store was started already")
        self._started = True
        try:
            self._lock = await self._take_lock()
            await self.database.open()
            await self.database.migrate()
            collections = await self.records.load()
            await self._read_counts()
        except DatabaseUnavailable as error:
            await self._release()
            raise StateError(f"database {redact(self._url)}: {error}") from None
        except psycopg.Error as error:
            await self._release()
            message = _clean(str(error).strip().splitlines()[0], self._url)
            raise StateError(f"database {redact(self._url)}: {message}") from None
        except BaseException:
            await self._release()
            raise
        self._watch_task = asyncio.create_task(self._watch(), name="database watch")
        log.info(
            "records in PostgreSQL (%s), node %s: %d backups and %d restores live",
            redact(self._url),
            self.node,
            len(collections.get("backup", {})),
            len(collections.get("restore", {})),
        )
        return collections

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        """Returns a connection of its own (not the pool's) for the one node's lock."""
        try:
            with unavailable_as_oserror():
                return await psycopg.AsyncConnection.connect(
                    self._url,
                    autocommit=True,
                    connect_timeout=max(2, round(self.timeout)),
                    application_name=f"fa-restic {self.node}"[:63],
                )
        except DatabaseUnavailable as error:
            # The driver's own words say why (refused, no such host, password rejected):
            # an operator starting the node needs them; they carry no password.
            cause = error.__cause__
            detail = _clean(str(cause).strip().splitlines()[0], self._url) if cause else ""
            raise DatabaseUnavailable(f"{error}{f' ({detail})' if detail else ''}") from cause

    async def _take_lock(self) -> psycopg.AsyncConnection[Any]:
        """Returns a connection holding the one node's lock; raises DatabaseInUse when
        another process holds it, DatabaseUnavailable when the database is out of reach."""
        connection = await self._connect()
        try:
            with unavailable_as_oserror():
                for attempt in range(LOCK_ATTEMPTS):
                    if attempt:
                        # A predecessor that just died or stopped: its session ends a moment
                        # after its connection.
                        await asyncio.sleep(LOCK_RETRY_SECONDS)
                    cursor = await connection.execute(
                        "SELECT pg_try_advisory_lock(%s)", (NODE_LOCK,)
                    )
                    row = await cursor.fetchone()
                    if row is not None and row[0]:
                        return connection
                holder = await self._holder(connection)
        except BaseException:
            await connection.close()
            raise
        await connection.close()
        raise DatabaseInUse(
            f"another node ({holder}) is using the database {redact(self._url)}: "
            f"{ONE_NODE_ONLY} (stop it, or give this node a database of its own)",
            holder,
        )

    @staticmethod
    async def _holder(connection: psycopg.AsyncConnection[Any]) -> str:
        """Returns who holds the one node's lock, as far as this account may see."""
        cursor = await connection.execute(
            "SELECT coalesce(nullif(activity.application_name, ''), 'unnamed')"
            " || ' at ' || coalesce(host(activity.client_addr), 'a local socket')"
            " FROM pg_locks JOIN pg_stat_activity AS activity USING (pid)"
            " WHERE pg_locks.locktype = 'advisory' AND pg_locks.granted"
            " AND ((pg_locks.classid::bigint << 32) | pg_locks.objid::bigint) = %s"
            " LIMIT 1",
            (NODE_LOCK,),
        )
        row = await cursor.fetchone()
        return str(row[0]) if row is not None and row[0] else "another process"

    async def stop(self) -> None:
        """Waits for writes under way, closes the pool, then lets go of the one node's lock
        (no write can follow it)."""
        if self._stopped:
            return
        self._stopped = True
        for task in (self._watch_task, self._counts_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        await self._release()

    async def _release(self) -> None:
        await self.database.close()
        lock, self._lock = self._lock, None
        if lock is not None:
            with contextlib.suppress(psycopg.Error):
                # Said, not left to the end of the session: the server ends a session a
                # moment after its client left, and a restart must find the lock free.
                await lock.execute("SELECT pg_advisory_unlock_all()")
            with contextlib.suppress(psycopg.Error):
                await lock.close()

    # -- the Store protocol -----------------------------------------------------------------

    async def write(self, operations: Iterable[Operation]) -> Cleared:
        """Commits a batch in one transaction; returns once it is committed, with how many
        records each Clear deleted (the database's count, not the cached `counts`).

        Raises DatabaseUnavailable (an OSError; nothing changed then, unless the commit
        itself was cut short) and RuntimeError once stopped. A caller cancelled meanwhile
        does not cut the transaction short: it completes or fails on its own.
        """
        batch = list(operations)
        if not batch:
            return {}
        if self._stopped or not self._started:
            raise RuntimeError("the database store is not running")
        if self._displaced:
            raise DatabaseUnavailable(DISPLACED)
        # A task started now takes its turn at the lock in call order (asyncio's locks are
        # first come, first served): batches commit in the order they were written.
        task = asyncio.create_task(self._commit(batch))
        self._writes.add(task)
        task.add_done_callback(self._written)
        return await asyncio.shield(task)

    def _written(self, task: asyncio.Task[Cleared]) -> None:
        self._writes.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a caller cancelled meanwhile no longer asks

    async def _commit(self, batch: list[Operation]) -> Cleared:
        async with self._writing:
            try:
                cleared = await self.records.write(batch)
            except DatabaseUnavailable as error:
                self._note(str(error))
                raise
            self._note(OK)
        self._counts_later()
        return cleared

    async def fetch(self, collection: str, key: str) -> Value | None:
        """Returns one record, or None; raises DatabaseUnavailable."""
        return await self._reading(self.records.read(collection, key))

    async def fetch_page(
        self,
        collection: str,
        *,
        owner: str | None = None,
        label: str | None = None,
        before: int | None = None,
        limit: int = 100,
    ) -> list[Value]:
        """Returns a page of records, highest id first, through an index (DatabaseRecords.page);
        raises DatabaseUnavailable."""
        return await self._reading(
            self.records.page(collection, owner=owner, label=label, before=before, limit=limit)
        )

    async def _reading(self, work: Coroutine[Any, Any, Found]) -> Found:
        if self._stopped or not self._started:
            work.close()
            raise RuntimeError("the database store is not running")
        try:
            found = await work
        except DatabaseUnavailable as error:
            self._note(str(error))
            raise
        self._note(OK)
        return found

    def counts(self, collection: str) -> dict[str, int]:
        """Returns status -> records of `collection` as last read (at most a second or so
        after the last write, while the database answers)."""
        return dict(self._counts.get(collection, {}))

    # -- counts, in the background ------------------------------------------------------------

    def _counts_later(self) -> None:
        """Has the counts read again soon: one read for the writes of a short while."""
        self._counts_stale = True
        if self._counts_task is None and not self._stopped:
            self._counts_task = asyncio.create_task(self._recount(), name="database counts")

    async def _recount(self) -> None:
        try:
            while self._counts_stale:
                await asyncio.sleep(self._counts_delay)
                self._counts_stale = False
                try:
                    await self._read_counts()
                except DatabaseUnavailable as error:
                    self._note(str(error))
                    return  # the next write asks again; the last counts stay
        finally:
            self._counts_task = None

    async def _read_counts(self) -> None:
        for name in sorted(self.layout.indexed):
            self._counts[name] = await self.records.counts(name)

    # -- health -----------------------------------------------------------------------------

    @property
    def database_state(self) -> str:
        """`ok`, or a short reason the database is not usable now (names no host)."""
        return self._state

    def _note(self, state: str) -> None:
        if state != self._state:
            if state == OK:
                log.info("database: reachable again")
            else:
                log.warning("database: %s", state)
        self._state = state

    async def _watch(self) -> None:
        """Checks now and then that the one node's lock is still this node's (its
        connection lost, the server restarted, it is taken again) and notes the database's
        state for healthz."""
        while True:
            await asyncio.sleep(self._watch_seconds)
            try:
                await self._check_lock()
            except DatabaseUnavailable as error:
                # Without the driver's words `_connect` adds for a start: they name the host.
                self._note(str(error).split(" (", 1)[0])
            except DatabaseInUse as error:
                # Writing on would be two nodes running one queue: refuse until the lock
                # is this node's again.
                self._displaced = True
                self._note(DISPLACED)
                log.error("database: %s", error)
            else:
                self._displaced = False
                self._note(OK)

    async def _check_lock(self) -> None:
        lock = self._lock
        if lock is not None and not lock.closed:
            try:
                with unavailable_as_oserror():
                    await lock.execute("SELECT 1")
                return
            except (DatabaseUnavailable, psycopg.Error, PoolTimeout):
                with contextlib.suppress(psycopg.Error):
                    await lock.close()
                self._lock = None
                log.warning("database: the connection holding the one node's lock was lost")
        # The session that held the lock is gone, and its lock with it: take it again.
        self._lock = await self._take_lock()
        log.info("database: the one node's lock is held again")


def _conforms(store: DatabaseStore) -> Store:
    """mypy checks here that DatabaseStore is a Store."""
    return store
