"""The job records in PostgreSQL for the service: a Store (fa_restic.store.protocol) over
`Database` and `DatabaseRecords`, and the node's `DatabaseCoordination` beside it.

Several nodes share one database (SPEC §10). On a connection of its own, held until
`stop`, each node holds two session-level advisory locks:

- NODE_LOCK, shared: every running node holds it so; `rebuild-state`, which must run
  alone, takes it exclusive (`alone=True`) and so is refused while any node runs, and no
  node starts while it runs;
- its name's lock, exclusive: a second process started with the same `node_name` would
  claim, release and cancel the first one's jobs as its own, so it is refused.

Every write is one transaction, committed before `write` returns; writes are committed in
the order they were asked for (one after another), as the state file's journal appends
them. `counts` answers from a cache that is read at start and again shortly after writes,
in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from collections.abc import Coroutine, Iterable
from typing import Any, LiteralString, TypeVar

import psycopg
from psycopg_pool import PoolTimeout

from fa_restic.cluster.coordination import DatabaseCoordination
from fa_restic.cluster.database import Database, DatabaseUnavailable, unavailable_as_oserror
from fa_restic.cluster.finished import DEFAULT_LIMIT, FinishedRecords
from fa_restic.cluster.records import DatabaseRecords
from fa_restic.store import Cleared, Collections, Layout, Operation, StateError, Store, Value

log = logging.getLogger("fa_restic.cluster")

Found = TypeVar("Found")

NODE_LOCK = 0x66612D6F6E65
"""The nodes' advisory lock ("fa-one" in ASCII, from when one node only was allowed): held
shared by every node that uses the database, as long as it runs, and exclusive by work that
must run alone (rebuild-state). One key, fixed forever, other than the migrations' lock and
the gate (records.GATE_LOCK); a node of a version that held it exclusive still keeps
newer nodes out, and they it."""

NAME_LOCK_PREFIX = "fa-restic node "
"""What a node's name lock is derived from (name_lock)."""

LOCK_ATTEMPTS = 3
LOCK_RETRY_SECONDS = 0.5

COUNTS_DELAY = 0.5
"""How long after a write the counts are read again: writes meanwhile share one read."""

WHOLE_COUNTS_SECONDS = 5.0
"""How often, at most, the records of every status are counted (the live ones: each time)."""
LIVE_STATUSES = ("pending", "running")

WATCH_SECONDS = 5.0
PRELOAD_PAGE = 1000
"""Finished records read at a time at start (cluster.finished): small pages, so that the
requests answered meanwhile hardly wait."""
"""How often the node checks its lock's connection (healthz's `database`) and beats."""

DISPLACED = "database unavailable: another node took this node's place"

OK = "ok"


class DatabaseInUse(StateError):
    """This node must not start: another process runs under its name, or holds the
    database alone (rebuild-state); with `alone`, some node runs."""

    def __init__(self, message: str, holder: str = "another process") -> None:
        super().__init__(message)
        self.holder = holder
        """Who holds the lock (application name and address), as far as one may see."""


def name_lock(node: str) -> int:
    """Returns the advisory lock key of a node's name: a signed 64-bit number from a hash
    of the name, the same on every node and version (unlike PostgreSQL's hashtext, which
    need not stay the same across its major versions)."""
    digest = hashlib.blake2b((NAME_LOCK_PREFIX + node).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


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
        lease_seconds: float = 30.0,
        counts_delay: float = COUNTS_DELAY,
        whole_counts_every: float = WHOLE_COUNTS_SECONDS,
        watch_seconds: float = WATCH_SECONDS,
        alone: bool = False,
        finished_in_memory: int = DEFAULT_LIMIT,
    ) -> None:
        """`layout`: the job layer's (its indexed collections are those `counts` answers).
        `node`: this node's name, unique in the cluster, shown to an operator
        (pg_stat_activity, healthz). `finished_in_memory`: finished job records held in
        memory (cluster.finished). `timeout`: how long an operation waits for a
        connection (DatabaseUnavailable). `lease_seconds`: a node silent this long is dead
        (the coordination's). `alone`: hold the database alone, refused while any node runs
        (rebuild-state), instead of as one node among others."""
        self._url = url
        self.layout = layout
        self.node = node
        self.timeout = timeout
        self.alone = alone
        self.database = Database(url, timeout=timeout, name=f"fa-restic {node}")
        # A process holding the database alone (rebuild-state) answers no GET.
        self.finished = (
            None
            if alone or finished_in_memory <= 0
            else FinishedRecords(url, self.database, node, limit=finished_in_memory)
        )
        self.records = DatabaseRecords(self.database, self.finished)
        self._coordination = DatabaseCoordination(
            self.database, self.records, node, url, lease_seconds
        )
        self._counts_delay = counts_delay
        self._whole_counts_every = whole_counts_every
        self._whole_counts_due = 0.0
        self._whole_counts_wanted = False
        self._counts_written = asyncio.Event()
        self._watch_seconds = watch_seconds
        self._lock: psycopg.AsyncConnection[Any] | None = None
        self._counts: dict[str, dict[str, int]] = {name: {} for name in layout.indexed}
        self._counts_task: asyncio.Task[None] | None = None
        self._counts_stale = False
        self._watch_task: asyncio.Task[None] | None = None
        self._preload_task: asyncio.Task[None] | None = None
        self._writing = asyncio.Lock()
        self._writes: set[asyncio.Task[Cleared]] = set()
        self._state = OK
        self._displaced = False
        self._started = False
        self._stopped = False

    @property
    def coordination(self) -> DatabaseCoordination:
        """This node's coordination with the others, over the store's pool and records."""
        return self._coordination

    # -- start and stop ----------------------------------------------------------------------

    async def start(self) -> Collections:
        """Takes the node's locks, brings the schema up to date and returns this node's
        live job records (those the database says it runs or ran; pending jobs belong to
        no node and are claimed), the forget queue and the meta values. With `alone`, every
        live job record.

        Raises DatabaseInUse when another process runs under this node's name or holds the
        database alone (with `alone`: when any node runs), StateError (one line, no
        password) when the database cannot be reached or read; nothing is left open then.
        """
        if self._started:
            raise RuntimeError("the store was started already")
        self._started = True
        try:
            self._lock = await self._take_lock()
            await self.database.open()
            await self.database.migrate()
            collections = await self.records.load(None if self.alone else self.node)
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
        if self.finished is not None:
            self.finished.start()
            self._preload_task = asyncio.create_task(self._preload(), name="finished records")
        log.info(
            "records in PostgreSQL (%s), node %s: %d backups and %d restores live",
            redact(self._url),
            self.node,
            len(collections.get("backup", {})),
            len(collections.get("restore", {})),
        )
        return collections

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        """Returns a connection of its own (not the pool's) for the node's locks."""
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
        """Returns a connection holding the node's locks (with `alone`, NODE_LOCK exclusive);
        raises DatabaseInUse when another process holds one of them, DatabaseUnavailable
        when the database is out of reach."""
        connection = await self._connect()
        try:
            with unavailable_as_oserror():
                refused: int | None = None
                for attempt in range(LOCK_ATTEMPTS):
                    if attempt:
                        # A predecessor that just died or stopped: its session ends a moment
                        # after its connection.
                        await asyncio.sleep(LOCK_RETRY_SECONDS)
                    refused = await self._try_locks(connection)
                    if refused is None:
                        return connection
                assert refused is not None
                holder = await self._holders(connection, refused)
        except BaseException:
            await connection.close()
            raise
        await connection.close()
        raise DatabaseInUse(self._refusal(refused, holder), holder)

    async def _try_locks(self, connection: psycopg.AsyncConnection[Any]) -> int | None:
        """Takes the node's locks; returns None, or the key of a lock another process holds
        (holding none of them then)."""
        wanted: list[tuple[LiteralString, int]]
        if self.alone:
            wanted = [("SELECT pg_try_advisory_lock(%s)", NODE_LOCK)]
        else:
            # The name first: a node started twice is told so, even while a rebuild runs.
            wanted = [
                ("SELECT pg_try_advisory_lock(%s)", name_lock(self.node)),
                ("SELECT pg_try_advisory_lock_shared(%s)", NODE_LOCK),
            ]
        for query, key in wanted:
            cursor = await connection.execute(query, (key,))
            row = await cursor.fetchone()
            if row is None or not row[0]:
                await connection.execute("SELECT pg_advisory_unlock_all()")
                return key
        return None

    def _refusal(self, key: int, holder: str) -> str:
        """Returns why this node may not start: another process holds the lock `key`."""
        shown = redact(self._url)
        if self.alone:
            return f"a node ({holder}) is running on the database {shown}"
        if key == NODE_LOCK:
            return (
                f"{holder} holds the database {shown} alone (rebuild-state, or a node of a "
                "version that ran alone): wait for it to end, or stop it"
            )
        return (
            f"node name {self.node!r} is in use by {holder} on the database {shown}: "
            "give each node a name of its own ([cluster] node_name), or stop the other"
        )

    @staticmethod
    async def _holders(connection: psycopg.AsyncConnection[Any], key: int) -> str:
        """Returns who holds the advisory lock `key` (application name and address, a few
        at most), as far as this account may see."""
        cursor = await connection.execute(
            "SELECT string_agg(holder, ', ' ORDER BY holder) FROM ("
            " SELECT DISTINCT coalesce(nullif(activity.application_name, ''), 'unnamed')"
            "     || ' at ' || coalesce(host(activity.client_addr), 'a local socket') AS holder"
            " FROM pg_locks JOIN pg_stat_activity AS activity USING (pid)"
            " WHERE pg_locks.locktype = 'advisory' AND pg_locks.granted"
            " AND pg_locks.objsubid = 1 AND pid <> pg_backend_pid()"
            " AND ((pg_locks.classid::bigint << 32) | pg_locks.objid::bigint) = %s"
            " LIMIT 5) AS holders",
            (key,),
        )
        row = await cursor.fetchone()
        return str(row[0]) if row is not None and row[0] else "another process"

    async def stop(self) -> None:
        """Waits for writes under way, closes the pool, then lets go of the node's locks
        (no write can follow them)."""
        if self._stopped:
            return
        self._stopped = True
        for task in (self._watch_task, self._counts_task, self._preload_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.finished is not None:
            await self.finished.stop()
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
                cleared, changed = await self.records.commit(batch)
            except DatabaseUnavailable as error:
                self._note(str(error))
                raise
            self._note(OK)
        self._counts_later()
        if changed and self.finished is not None:
            # Outside the lock: a node slow to answer (or dead, up to TRUST_SECONDS) holds
            # up this answer only, not the node's next writes.
            await self.finished.changed()
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
        self._counts_written.set()
        if self._counts_task is None and not self._stopped:
            self._counts_task = asyncio.create_task(self._recount(), name="database counts")

    async def _recount(self) -> None:
        try:
            # After the last write's read of the live counts, one more of every status once
            # it is due: the counts end up whole a few seconds after the writes at most.
            while self._counts_stale or self._whole_counts_wanted:
                if not self._counts_stale:  # a write meanwhile wakes it
                    self._counts_written.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self._whole_counts_due - time.monotonic()):
                            await self._counts_written.wait()
                if self._counts_stale:
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
        """Reads the pending and running jobs' counts (a few rows, through their indexes),
        and every status's now and then: counting a million finished records takes
        PostgreSQL a quarter of a second, so it is done at most a fiftieth of the time."""
        whole = time.monotonic() >= self._whole_counts_due
        started = time.monotonic()
        for name in sorted(self.layout.indexed):
            if whole:
                self._counts[name] = await self.records.counts(name)
            else:
                live = await self.records.counts(name, live_only=True)
                ended = {s: n for s, n in self._counts[name].items() if s not in LIVE_STATUSES}
                self._counts[name] = {**ended, **live}
        self._whole_counts_wanted = not whole
        if whole:
            took = time.monotonic() - started
            self._whole_counts_due = time.monotonic() + max(self._whole_counts_every, 50 * took)

    # -- finished records in memory ----------------------------------------------------------

    async def _preload(self) -> None:
        """Holds the newest finished records, up to the limit, page by page in the
        background: a start does not wait for them, and a GET of one not held yet reads it."""
        finished = self.finished
        assert finished is not None
        await finished.listening()
        started = time.monotonic()
        for kind in sorted(self.layout.indexed):
            before: int | None = None
            while len(finished) < finished.limit:
                generation = finished.generation
                try:
                    page = await self.records.finished_page(kind, before, PRELOAD_PAGE)
                except DatabaseUnavailable:
                    return  # the GETs fill it, once the database is back
                for job_id, text in page:  # newest first: each goes before the others
                    finished.hold_text(kind, job_id, text, generation, first_to_go=True)
                if len(page) < PRELOAD_PAGE:
                    break
                before = page[-1][0]
        log.info(
            "finished records: %d held in memory, read in %.1f s",
            len(finished),
            time.monotonic() - started,
        )

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
        """Checks now and then that the node's locks are still this node's (their
        connection lost, the server restarted, they are taken again) and notes the
        database's state for healthz."""
        while True:
            await asyncio.sleep(self._watch_seconds)
            try:
                await self._check_lock()
            except DatabaseUnavailable as error:
                # Without the driver's words `_connect` adds for a start: they name the host.
                self._note(str(error).split(" (", 1)[0])
            except DatabaseInUse as error:
                # Writing on would be two processes running one node's jobs (or a node
                # beside a rebuild): refuse until the locks are this node's again.
                self._displaced = True
                self._note(DISPLACED)
                log.error("database: %s", error)
            else:
                self._displaced = False
                self._note(OK)
                # Other nodes write too: their jobs are counted within a watch or so.
                self._counts_later()

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
                log.warning("database: the connection holding the node's locks was lost")
        # The session that held the locks is gone, and its locks with it: take them again.
        self._lock = await self._take_lock()
        log.info("database: the node's locks are held again")


def _conforms(store: DatabaseStore) -> Store:
    """mypy checks here that DatabaseStore is a Store."""
    return store
