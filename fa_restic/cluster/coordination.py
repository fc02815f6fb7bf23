"""What a node of a cluster (SPEC §10) asks of the database the nodes share: admitting jobs,
claiming them, cancelling across nodes, sharing progress, leases, and the gate that keeps
exclusive repository work alone.

`DatabaseCoordination` is the job layer's `Coordination` (fa_restic.jobs.ports), matched
structurally: this package sits below the job layer and may not import it (the import-linter
layers in pyproject.toml); tests/cluster checks that it conforms.

Every method raises DatabaseUnavailable (an OSError) when the database cannot be reached.
Jobs are (kind, id): kind "backup" or "restore".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, LiteralString

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from fa_restic.cluster.database import Connection, Database, unavailable_as_oserror
from fa_restic.cluster.records import (
    FORGETS,
    GATE_LOCK,
    INIT_LOCK,
    META,
    DatabaseRecords,
    job_kind,
)

log = logging.getLogger("fa_restic.cluster")

ClusterJob = tuple[str, int, dict[str, Any]]
"""(kind, id, record): fa_restic.jobs.ports.ClusterJob, spelled again."""

GATE_POLL_SECONDS = 0.2
"""How often `exclusive` tries the gate again while another node holds it (or claims)."""


@dataclass(frozen=True)
class Admission:
    """What `admit` did (the job layer's Admission Protocol, as NodeLease's)."""

    admitted: bool
    pending: int | None
    """The user's jobs pending when the cap was checked (None: no cap given)."""
    sequence: int | None
    """The job's place in the queue, when admitted."""


@dataclass(frozen=True)
class NodeLease:
    """A node as the cluster's database knows it.

    The job layer's NodeLease (fa_restic.jobs.ports) is a Protocol of these read-only
    fields, which this frozen dataclass fits structurally: this package may not import the
    job layer."""

    name: str
    alive: bool
    lease_age: float
    """Seconds since its last heartbeat."""
    running: int
    """Jobs running on it."""


_TRY_LOCK: dict[bool, LiteralString] = {
    False: "SELECT pg_try_advisory_lock(%s)",
    True: "SELECT pg_try_advisory_lock_shared(%s)",
}
_UNLOCK: dict[bool, LiteralString] = {
    False: "SELECT pg_advisory_unlock(%s)",
    True: "SELECT pg_advisory_unlock_shared(%s)",
}
"""By whether the lock is taken shared."""


class DatabaseCoordination:
    """One node's view of the cluster in its database (the job layer's Coordination)."""

    def __init__(
        self,
        database: Database,
        records: DatabaseRecords,
        node: str,
        url: str,
        lease_seconds: float,
    ) -> None:
        """`database`, `records`: the node's store's (one pool). `url`: the database's, for
        the connection `exclusive` holds its lock on. `lease_seconds`: a node silent this
        long is dead."""
        self.database = database
        self.records = records
        self._node = node
        self._url = url
        self.lease_seconds = lease_seconds
        self._reads = _SharedGate(lambda: self._connect("read"))

    @property
    def node(self) -> str:
        """This node's name (unique in the cluster)."""
        return self._node

    # -- admitting and counting ----------------------------------------------------------

    async def admit(
        self,
        kind: str,
        job_id: int,
        user: str,
        value: dict[str, Any],
        reusable: Collection[str],
        cap: int | None = None,
    ) -> Admission:
        """Writes a new pending job record, or replaces the one of that id if it is `user`'s
        and its status is in `reusable`, and gives it the next place in the queue (its
        "sequence"); unless `user` has `cap` jobs pending already. Committed when it
        returns; changes nothing unless it says `admitted`.

        Of nodes admitting one id at once exactly one gets it (as long as `reusable` holds
        no active status): the loser's insert waits for the winner's row, then finds it
        pending. Of one user's admissions on any nodes, each counts after the last committed
        (sql/005_admit.sql): the cap is never passed. Raises ValueError if `value` names
        another id or user than given.
        """
        if value.get("id", job_id) != job_id or value.get("user", user) != user:
            raise ValueError("the record's id and user must be those given")
        async with self.database.connection() as connection:
            cursor = await connection.execute(
                "SELECT outcome, pending, place FROM admit_job(%s, %s, %s, %s, %s, %s)",
                (job_kind(kind), job_id, user, Jsonb(value), list(reusable), cap),
            )
            row = await cursor.fetchone()
        assert row is not None
        outcome, pending, place = row
        if outcome == "replaced" and self.records.finished is not None:
            # An ended job's id used again: no node may go on answering the old record.
            await self.records.finished.changed()
        return Admission(
            admitted=outcome in ("admitted", "replaced"),
            pending=None if pending is None else int(pending),
            sequence=None if place is None else int(place),
        )

    async def pending_of(self, user: str) -> int:
        """Returns how many jobs of `user` wait to be claimed (backups and restores)."""
        return await self._number(
            "SELECT count(*) FROM jobs WHERE status = 'pending' AND owner = %s", (user,)
        )

    async def pending_exists(self) -> bool:
        """True when any job waits to be claimed."""
        return bool(
            await self._number(
                "SELECT EXISTS (SELECT 1 FROM jobs WHERE status = 'pending')",
                (),
            )
        )

    async def running_anywhere(self) -> int:
        """Returns how many jobs run on nodes whose lease has not expired."""
        return await self._number(
            "SELECT count(*) FROM jobs JOIN nodes ON nodes.name = jobs.node"
            " WHERE jobs.status = 'running'"
            " AND nodes.heartbeat_at > now() - make_interval(secs => %s)",
            (self.lease_seconds,),
        )

    async def _number(self, query: LiteralString, params: tuple[Any, ...]) -> int:
        """Returns the one number `query` selects."""
        async with self.database.connection() as connection:
            cursor = await connection.execute(query, params)
            row = await cursor.fetchone()
        assert row is not None
        return int(row[0])

    # -- claims and cancels ----------------------------------------------------------------

    async def claim(self, slots: int) -> list[ClusterJob]:
        """Takes up to `slots` pending jobs for this node, fairly between users, and returns
        them as now running on it (status running, started_at now, one more attempt).
        Returns [] while any node holds `exclusive` (DatabaseRecords.claim)."""
        claimed = await self.records.claim(self._node, slots)
        return [(job.kind, job.id, job.record) for job in claimed]

    async def cancel_pending(
        self,
        kind: str,
        fields: dict[str, Any],
        *,
        job_id: int | None = None,
        user: str | None = None,
    ) -> list[int]:
        """Merges `fields` into the pending (unclaimed) jobs of `kind`: the one `job_id`,
        else those of `user`, else all; returns the ids changed, ascending.

        A job a claim holds at this moment is left out: the update waits for the claim's
        row lock and, the job then running, no longer matches (PostgreSQL checks the
        condition again on the row the claim committed)."""
        where, params = self._which(kind, job_id, user)
        query = sql.SQL(
            "UPDATE jobs SET record = record || %s WHERE status = 'pending' AND {} RETURNING id"
        ).format(where)
        async with self.database.connection() as connection:
            cursor = await connection.execute(query, (Jsonb(fields), *params))
            return sorted(int(found) for (found,) in await cursor.fetchall())

    async def request_cancel(
        self, kind: str, by: str, *, job_id: int | None = None, user: str | None = None
    ) -> list[int]:
        """Asks the nodes running jobs of `kind` (the one `job_id`, else `user`'s, else all)
        to cancel them on behalf of `by`; jobs running on this node are left out (its job
        layer stops them itself). Returns the ids asked for, ascending."""
        where, params = self._which(kind, job_id, user)
        query = sql.SQL(
            "UPDATE jobs SET cancel_by = %s WHERE status = 'running'"
            " AND node IS DISTINCT FROM %s AND {} RETURNING id"
        ).format(where)
        async with self.database.connection() as connection:
            cursor = await connection.execute(query, (by, self._node, *params))
            return sorted(int(found) for (found,) in await cursor.fetchall())

    @staticmethod
    def _which(kind: str, job_id: int | None, user: str | None) -> tuple[sql.Composed, list[Any]]:
        """Returns the condition choosing jobs of `kind`: the one `job_id`, else `user`'s,
        else all; with its parameters."""
        conditions = [sql.SQL("kind = %s")]
        params: list[Any] = [job_kind(kind)]
        if job_id is not None:
            conditions.append(sql.SQL("id = %s"))
            params.append(job_id)
        elif user is not None:
            conditions.append(sql.SQL("owner = %s"))
            params.append(user)
        return sql.SQL(" AND ").join(conditions), params

    async def cancel_requests(self) -> list[tuple[str, int, str]]:
        """Returns (kind, id, by) of the jobs running on this node that someone asked to
        cancel, by kind and id."""
        async with self.database.connection() as connection:
            cursor = await connection.execute(
                "SELECT kind, id, cancel_by FROM jobs"
                " WHERE status = 'running' AND node = %s AND cancel_by IS NOT NULL"
                " ORDER BY kind, id",
                (self._node,),
            )
            return [(kind, int(job_id), by) for kind, job_id, by in await cursor.fetchall()]

    async def share_progress(self, progress: Mapping[tuple[str, int], dict[str, Any]]) -> None:
        """Publishes the live progress of jobs running on this node, in one round trip (read
        back as the record's "progress" by other nodes while the job runs). Jobs no longer
        running here are left as they are."""
        if not progress:
            return
        async with self.database.connection() as connection, connection.cursor() as cursor:
            await cursor.executemany(
                "UPDATE jobs SET progress = %s WHERE kind = %s AND id = %s"
                " AND node = %s AND status = 'running'",
                [
                    (Jsonb(value), kind, job_id, self._node)
                    for (kind, job_id), value in progress.items()
                ],
            )

    # -- leases ------------------------------------------------------------------------------

    async def beat(self) -> None:
        """Renews this node's lease (adds the node on its first beat)."""
        await self.records.heartbeat(self._node)

    async def requeue_dead(self, max_attempts: int) -> list[ClusterJob]:
        """Puts the running jobs of nodes whose lease expired back to pending (backups
        unsettled), fails them after `max_attempts`, or cancels those someone asked to
        cancel; returns them as changed (DatabaseRecords.requeue_dead)."""
        changed = await self.records.requeue_dead(self.lease_seconds, max_attempts)
        return [(job.kind, job.id, job.record) for job in changed]

    async def release(
        self, running: Collection[tuple[str, int]], max_attempts: int
    ) -> list[ClusterJob]:
        """As `requeue_dead`, for the jobs the database says run on this node but that are
        not among `running` (this node restarted, or lost its lease meanwhile); returns
        them as changed (DatabaseRecords.release)."""
        changed = await self.records.release(self._node, running, max_attempts)
        return [(job.kind, job.id, job.record) for job in changed]

    async def nodes(self) -> list[NodeLease]:
        """Returns every node that has a lease, alive or not, by name, with the jobs the
        database says run on it."""
        async with self.database.connection() as connection:
            cursor = await connection.execute(
                "SELECT name, heartbeat_at > now() - make_interval(secs => %s),"
                " greatest(extract(epoch FROM now() - heartbeat_at), 0)::float8,"
                " (SELECT count(*) FROM jobs WHERE status = 'running' AND node = nodes.name)"
                " FROM nodes ORDER BY name",
                (self.lease_seconds,),
            )
            return [
                NodeLease(name=name, alive=bool(alive), lease_age=float(age), running=int(count))
                for name, alive, age, count in await cursor.fetchall()
            ]

    # -- the gate ------------------------------------------------------------------------------

    def exclusive(self) -> AbstractAsyncContextManager[None]:
        """Holds the cluster's exclusive lock (GATE_LOCK) while inside: one node at a time,
        and no node claims a job meanwhile (jobs that already run go on: the caller waits
        for `running_anywhere` to be 0). Waits for the lock while another node holds it or
        a claim is under way, trying every GATE_POLL_SECONDS.

        On a connection of its own, not the pool's: a session-level lock must stay with
        one session, and the pool's connections are shared. Let go of when the block ends,
        raises or is cancelled. Raises DatabaseUnavailable when the database is out of
        reach; a lock whose connection is lost while held is gone with its session."""
        return self._holding_always(GATE_LOCK, "exclusive")

    def reading(self, wait_seconds: float) -> AbstractAsyncContextManager[bool]:
        """Holds the cluster's gate shared while inside (a browse's `restic ls`): no node
        begins exclusive work meanwhile, claims go on. Waits up to `wait_seconds` while a
        node holds it exclusive, trying every GATE_POLL_SECONDS; yields False, holding
        nothing, if that node's work did not end by then.

        Every read under way on this node shares one connection holding the gate (one user
        opening many browses would otherwise use up the server's connections): the first
        opens it, the last closes it. Not the pool's: a read may last seconds, and the
        pool's few connections are for the records. Let go of when the block ends, raises
        or is cancelled. Raises DatabaseUnavailable."""
        return self._reads.reading(wait_seconds)

    def initialising(self) -> AbstractAsyncContextManager[None]:
        """Holds the cluster's lock for creating the repository (INIT_LOCK) while inside:
        nodes that start together on no repository create it once. Waits, raises and lets
        go as `exclusive` does; claims go on meanwhile."""
        return self._holding_always(INIT_LOCK, "init")

    @asynccontextmanager
    async def _holding_always(self, key: int, what: str) -> AsyncIterator[None]:
        async with self._holding(key, what) as held:
            assert held  # waited for without a limit
            yield

    @asynccontextmanager
    async def _holding(
        self, key: int, what: str, *, shared: bool = False, wait: float | None = None
    ) -> AsyncIterator[bool]:
        """Yields True holding advisory lock `key` (shared or not) on a connection of its
        own, once it is free; False, holding nothing, if it was not within `wait` seconds."""
        deadline = None if wait is None else asyncio.get_running_loop().time() + wait
        connection = await self._connect(what)
        try:
            with unavailable_as_oserror():
                while True:
                    cursor = await connection.execute(_TRY_LOCK[shared], (key,))
                    row = await cursor.fetchone()
                    held = row is not None and bool(row[0])
                    if held or (deadline and asyncio.get_running_loop().time() >= deadline):
                        break
                    await asyncio.sleep(GATE_POLL_SECONDS)
            try:
                yield held
            finally:
                if held:
                    with contextlib.suppress(psycopg.Error):
                        # Said, not left to the end of the session: the server ends a session
                        # a moment after its client left, and the others should go on at once.
                        await connection.execute(_UNLOCK[shared], (key,))
        finally:
            with contextlib.suppress(psycopg.Error):
                await connection.close()

    async def _connect(self, what: str) -> Connection:
        """Returns a new connection in autocommit for holding a lock, named after this node
        and `what` in pg_stat_activity. Raises DatabaseUnavailable."""
        with unavailable_as_oserror():
            return await psycopg.AsyncConnection.connect(
                self._url,
                autocommit=True,
                connect_timeout=max(2, round(self.database.timeout)),
                application_name=f"fa-restic {self._node} {what}"[:63],
            )

    # -- what every node shares ----------------------------------------------------------------

    async def shared(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Returns the small collections every node shares: "forget" and "meta"."""
        return {
            FORGETS: await self.records.every(FORGETS),
            META: await self.records.every(META),
        }


@dataclass(eq=False)
class _Hold:
    """A connection holding the gate shared, and how many reads are inside on it."""

    connection: Connection
    readers: int


class _SharedGate:
    """The gate held shared for every read under way on one node, on one connection.

    The first reader starts an attempt (a task) that opens the connection and tries the
    lock every GATE_POLL_SECONDS for every reader waiting; readers that come meanwhile wait
    for that attempt, each until its own deadline. Once held, readers join the hold; the last
    to leave unlocks and closes. A hold whose connection turns out lost is left to the reads
    already inside it (the lock went with its session), and the next reader takes a new one.
    """

    def __init__(self, connect: Callable[[], Awaitable[Connection]]) -> None:
        """`connect`: opens a new connection for the lock (raises DatabaseUnavailable)."""
        self._connect = connect
        self._hold: _Hold | None = None
        self._attempt: asyncio.Task[None] | None = None
        self._waiters: dict[asyncio.Future[_Hold | None], float] = {}
        """The readers waiting for the attempt: what each is given, and its deadline."""
        self._letting_go: set[asyncio.Task[None]] = set()

    @asynccontextmanager
    async def reading(self, wait_seconds: float) -> AsyncIterator[bool]:
        """Yields True inside the hold, False (holding nothing) if the gate was not free
        within `wait_seconds`. Raises DatabaseUnavailable."""
        hold = await self._enter(asyncio.get_running_loop().time() + wait_seconds)
        if hold is None:
            yield False
            return
        try:
            yield True
        finally:
            await self._leave(hold)

    async def _enter(self, deadline: float) -> _Hold | None:
        """Returns the hold, counted in, or None once `deadline` passed."""
        while (hold := self._hold) is not None:
            hold.readers += 1  # before the check: the hold stays while it is under way
            try:
                # Shielded: a reader cancelled mid-query would cancel it on the shared
                # session, perhaps another reader's query by then.
                alive = await asyncio.shield(self._alive(hold.connection))
            except BaseException:
                await self._leave(hold)
                raise
            if alive:
                return hold
            # Lost with its session, and the lock with it (another node may hold the gate
            # exclusive now): those inside stay counted on it until they end (the last
            # closes it); this reader and the next take a new one.
            if self._hold is hold:
                self._hold = None
            await self._leave(hold)
        future: asyncio.Future[_Hold | None] = asyncio.get_running_loop().create_future()
        self._waiters[future] = deadline
        if self._attempt is None:
            self._attempt = asyncio.create_task(self._take())
        try:
            return await future
        except BaseException:
            self._waiters.pop(future, None)
            # Cancelled just after the attempt counted it in: it leaves, as if inside.
            if future.done() and not future.cancelled() and future.exception() is None:
                given = future.result()
                if given is not None:
                    await self._leave(given)
            raise

    @staticmethod
    async def _alive(connection: Connection) -> bool:
        """True when `connection` still answers (so its session still holds the lock)."""
        # One round trip per reader joining: nothing else finds out that the server ended
        # the session, and a reader must not join a lock that is gone.
        try:
            await connection.execute("SELECT 1")
        except psycopg.Error:
            return False
        return True

    async def _take(self) -> None:
        """Takes the gate shared on a new connection for the readers waiting, and hands it
        to those still waiting once held; gives each reader None once its deadline passed,
        and the attempt's error if it failed. Ends, closing, when no reader waits."""
        loop = asyncio.get_running_loop()
        connection: Connection | None = None
        held = False
        try:
            connection = await self._connect()
            while self._waiters:
                with unavailable_as_oserror():
                    cursor = await connection.execute(_TRY_LOCK[True], (GATE_LOCK,))
                    row = await cursor.fetchone()
                held = row is not None and bool(row[0])
                waiting = [future for future in self._waiters if not future.done()]
                if held:
                    self._waiters.clear()
                    if waiting:
                        self._attempt = None  # before any reader can look: they join the hold
                        hold = self._hold = _Hold(connection, len(waiting))
                        connection = None
                        for future in waiting:
                            future.set_result(hold)
                    return
                now = loop.time()
                for future in waiting:
                    if now >= self._waiters[future]:
                        del self._waiters[future]
                        future.set_result(None)
                if self._waiters:
                    await asyncio.sleep(GATE_POLL_SECONDS)
        except BaseException as error:
            self._attempt = None
            for future in self._waiters:
                if future.done():
                    continue
                if isinstance(error, Exception):
                    future.set_exception(error)
                else:
                    future.cancel()
            self._waiters.clear()
            if not isinstance(error, Exception):
                raise
        finally:
            # Before any await: a reader coming now starts an attempt of its own rather
            # than wait for this one, which is ending.
            if self._attempt is asyncio.current_task():
                self._attempt = None
            if connection is not None:
                await self._let_go(connection, held)

    async def _leave(self, hold: _Hold) -> None:
        """Counts a reader out of `hold`; the last lets go of the lock and the connection."""
        hold.readers -= 1
        if hold.readers:
            return
        if self._hold is hold:
            self._hold = None
        await self._let_go(hold.connection, True)

    async def _let_go(self, connection: Connection, held: bool) -> None:
        """Unlocks the gate if `held` and closes `connection`; done to the end even when the
        caller is cancelled meanwhile (exclusive work on another node waits for it)."""
        task = asyncio.create_task(self._close(connection, held))
        self._letting_go.add(task)  # kept from the garbage collector until done
        task.add_done_callback(self._letting_go.discard)
        await asyncio.shield(task)

    @staticmethod
    async def _close(connection: Connection, held: bool) -> None:
        with contextlib.suppress(psycopg.Error):
            if held:
                # Said, not left to the end of the session: the server ends a session a
                # moment after its client left, and the others should go on at once.
                await connection.execute(_UNLOCK[True], (GATE_LOCK,))
        with contextlib.suppress(psycopg.Error):
            await connection.close()
