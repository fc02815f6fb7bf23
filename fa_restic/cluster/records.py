"""The job records in the cluster's database, and the primitives nodes schedule with.

The collections are those of the single-node store (fa_restic.jobs.records), spelled here
again because this package sits below the job layer and may not import it (the
import-linter layers in pyproject.toml); tests/cluster checks the two spellings agree:

- "backup" and "restore": the `jobs` table, one row per (kind, id), the record as jsonb;
- "forget": the `forgets` table, by snapshot id;
- "meta": the `meta` table, by name.

Every write is committed before the call returns, so what one node acknowledged any other
reads at once. Every operation raises DatabaseUnavailable (an OSError) when the database
cannot be reached.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, LiteralString

from psycopg import sql
from psycopg.types.json import Jsonb

from fa_restic.cluster.database import Connection, Database
from fa_restic.cluster.finished import FinishedRecords
from fa_restic.names import JobKind, JobStatus
from fa_restic.store import Clear, Cleared, Delete, Operation, Put, Update, Value

BACKUPS = JobKind.BACKUP.value
RESTORES = JobKind.RESTORE.value
FORGETS = "forget"
META = "meta"
JOB_COLLECTIONS = frozenset({BACKUPS, RESTORES})
COLLECTIONS = (BACKUPS, RESTORES, FORGETS, META)

_PENDING = JobStatus.PENDING.value
_RUNNING = JobStatus.RUNNING.value
_FAILED = JobStatus.FAILED.value
_CANCEL = JobStatus.CANCEL.value

INIT_LOCK = 0x66612D696E6974
"""Held by a node creating the repository ("fa-init" in ASCII): two nodes started together
on no repository must not both run `restic init` (the second overwrites the first's keys).
One key, fixed forever."""

GATE_LOCK = 0x66612D67617465
"""The cluster's gate ("fa-gate" in ASCII): every claim takes it shared for its transaction,
and a node doing exclusive repository work holds it exclusive (DatabaseCoordination.exclusive)
so that no node claims a job meanwhile. One key, fixed forever, other than the migrations'
lock and the store's locks."""

_RECORD_AND_PROGRESS = sql.SQL("record, CASE WHEN status = 'running' THEN progress END")
"""A job's columns as `read` and `page` select them: the progress only of a running job
(a finished job's last progress may linger in its row)."""

_READ_JOB = sql.SQL("SELECT {}, live FROM jobs WHERE kind = %s AND id = %s").format(
    _RECORD_AND_PROGRESS
)
"""One job's record, its progress, and whether it is live (a finished one may be held)."""

LINE_LOOKAHEAD = 4
"""A claim of n slots considers the 4·n users at the head of the line: enough when other
nodes claim at the same moment and hold some of their jobs (SKIP LOCKED), without locking
a job of every waiting user."""


@dataclass(frozen=True)
class _Table:
    """Where a collection's records are: table, key column, value column."""

    name: str
    key: str
    value: str


_JOBS = _Table("jobs", "id", "record")
_COLLECTION_TO_TABLE = {
    BACKUPS: _JOBS,
    RESTORES: _JOBS,
    FORGETS: _Table("forgets", "snapshot_id", "record"),
    META: _Table("meta", "key", "value"),
}


@dataclass(frozen=True)
class Job:
    """A backup or restore record as a claim or a requeue left it."""

    kind: str
    id: int
    record: Value


def _table(collection: str) -> _Table:
    try:
        return _COLLECTION_TO_TABLE[collection]
    except KeyError:
        raise ValueError(f"unknown collection {collection!r}") from None


def job_kind(kind: str) -> str:
    """Returns `kind` if it is a job collection ("backup", "restore"); raises ValueError."""
    if kind not in JOB_COLLECTIONS:
        raise ValueError(f"not a job collection: {kind!r}")
    return kind


def _now_text() -> str:
    """Returns this moment as the job layer writes times (RFC 3339, UTC, with a Z)."""
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _statement(operation: Operation) -> tuple[sql.Composed, tuple[Any, ...]]:
    """Returns the statement and parameters that apply one store operation; raises
    ValueError for an unknown collection or a job key that is not an integer."""
    table = _table(operation.collection)
    is_job = table is _JOBS
    name, key_column, value_column = (
        sql.Identifier(table.name),
        sql.Identifier(table.key),
        sql.Identifier(table.value),
    )
    # Jobs are keyed by (kind, id); the other tables by their key alone.
    where = sql.SQL("kind = %s AND id = %s") if is_job else sql.SQL("{} = %s").format(key_column)
    key: tuple[Any, ...] = ()
    if not isinstance(operation, Clear):
        key = (operation.collection, int(operation.key)) if is_job else (operation.key,)
    if isinstance(operation, Put):
        columns = (
            sql.SQL("kind, id, record")
            if is_job
            else sql.SQL("{}, {}").format(key_column, value_column)
        )
        conflict = sql.SQL("kind, id") if is_job else key_column
        query = sql.SQL(
            "INSERT INTO {table} ({columns}) VALUES ({placeholders}, %s)"
            " ON CONFLICT ({conflict}) DO UPDATE SET {value} = EXCLUDED.{value}"
        ).format(
            table=name,
            columns=columns,
            placeholders=sql.SQL(", ").join(sql.Placeholder() for _ in key),
            conflict=conflict,
            value=value_column,
        )
        return query, (*key, Jsonb(operation.value))
    if isinstance(operation, Update):
        # jsonb's || is the shallow merge of Update; a missing record stays missing.
        query = sql.SQL("UPDATE {table} SET {value} = {value} || %s WHERE {where}").format(
            table=name, value=value_column, where=where
        )
        return query, (Jsonb(operation.fields), *key)
    if isinstance(operation, Delete):
        query = sql.SQL("DELETE FROM {table} WHERE {where}").format(table=name, where=where)
        return query, key
    if is_job:
        return sql.SQL("DELETE FROM jobs WHERE kind = %s").format(), (operation.collection,)
    return sql.SQL("DELETE FROM {table}").format(table=name), ()


class DatabaseRecords:
    """The records of every node, and the claims and leases that share the work."""

    def __init__(self, database: Database, finished: FinishedRecords | None = None) -> None:
        """`finished`: the finished records this node holds in memory, if any: `read`
        answers from them, and `write` returns once every node forgot those it changed."""
        self.database = database
        self.finished = finished

    # -- writing -------------------------------------------------------------------------

    async def insert(self, kind: str, job_id: int, user: str, value: Value) -> bool:
        """Adds a new job record; returns False, changing nothing, if (kind, id) exists.

        Of several nodes inserting one id at once exactly one gets True. Committed when it
        returns. Raises ValueError if `value` names another id or user than given.
        """
        if value.get("id", job_id) != job_id or value.get("user", user) != user:
            raise ValueError("the record's id and user must be those given")
        async with self.database.connection() as connection:
            cursor = await connection.execute(
                "INSERT INTO jobs (kind, id, record) VALUES (%s, %s, %s)"
                " ON CONFLICT (kind, id) DO NOTHING RETURNING id",
                (job_kind(kind), job_id, Jsonb(value)),
            )
            return await cursor.fetchone() is not None

    async def write(self, operations: Iterable[Operation]) -> Cleared:
        """Applies a batch of store operations atomically, in order, in one transaction;
        returns once it is committed (and every node forgot the finished records it
        changed: `finished`), with how many rows each Clear deleted (the database's own
        count, exact whatever other nodes did before).

        Raises DatabaseUnavailable (nothing changed then, unless the commit itself was cut
        short) or ValueError for an unknown collection or a job key that is not an integer
        (nothing is sent then).
        """
        cleared, changed = await self.commit(operations)
        if changed and self.finished is not None:
            await self.finished.changed()
        return cleared

    async def commit(self, operations: Iterable[Operation]) -> tuple[Cleared, bool]:
        """As `write`, without waiting for the other nodes: returns also whether a finished
        record changed (the caller then awaits `finished.changed()` before it answers)."""
        batch = list(operations)
        statements = [_statement(operation) for operation in batch]
        cleared: Cleared = {}
        if not statements:
            return cleared, False
        async with self.database.transaction() as connection:
            # Runs of one statement go as one executemany (pipelined): a cancel-all's 50,000
            # updates cost round trips by the batch, not by the record.
            start = 0
            while start < len(statements):
                query = statements[start][0]
                if isinstance(batch[start], Clear):
                    # Alone, so that its row count is its own.
                    cursor = await connection.execute(query, statements[start][1])
                    name = batch[start].collection
                    cleared[name] = cleared.get(name, 0) + max(cursor.rowcount, 0)
                    start += 1
                    continue
                end = start + 1
                while end < len(statements) and statements[end][0] == query:
                    end += 1
                async with connection.cursor() as cursor:
                    await cursor.executemany(query, [params for _, params in statements[start:end]])
                start = end
            # Only a node holding finished records asks (import-state has none to forget).
            changed = self.finished is not None and await _finished_changed(connection)
        return cleared, changed

    async def next_sequence(self) -> int:
        """Returns the next queue position, unique and increasing across every node."""
        async with self.database.connection() as connection:
            cursor = await connection.execute("SELECT nextval('job_sequence')")
            row = await cursor.fetchone()
        assert row is not None
        return int(row[0])

    async def raise_sequence(self, at_least: int) -> None:
        """Makes `next_sequence` return more than `at_least` from now on (after an import)."""
        async with self.database.connection() as connection:
            await connection.execute(
                "SELECT setval('job_sequence',"
                " greatest(%s, (SELECT last_value FROM job_sequence)))",
                (max(at_least, 1),),
            )

    async def analyze(self) -> None:
        """Has PostgreSQL gather its statistics of the tables (after many writes at once)."""
        async with self.database.connection() as connection:
            await connection.execute("ANALYZE jobs, forgets, meta")

    # -- reading -------------------------------------------------------------------------

    async def read(self, collection: str, key: str | int) -> Value | None:
        """Returns one record, or None; raises ValueError for an unknown collection.

        A running job's record has the live progress its node published (share_progress)
        as "progress". A finished job's record is answered from this node's memory when it
        holds it (`finished`), and held once read."""
        table = _table(collection)
        if table is _JOBS:
            try:
                job_id = int(key)
            except ValueError:
                return None
            return await self._read_job(collection, job_id)
        query = sql.SQL("SELECT {value} FROM {table} WHERE {key} = %s").format(
            value=sql.Identifier(table.value),
            table=sql.Identifier(table.name),
            key=sql.Identifier(table.key),
        )
        async with self.database.connection() as connection:
            cursor = await connection.execute(query, (str(key),))
            row = await cursor.fetchone()
        return None if row is None else dict(row[0])

    async def _read_job(self, kind: str, job_id: int) -> Value | None:
        finished = self.finished
        if finished is not None:
            held = finished.get(kind, job_id)
            if held is not None:
                return held
            generation = finished.generation
        async with self.database.connection() as connection:
            cursor = await connection.execute(_READ_JOB, (kind, job_id))
            row = await cursor.fetchone()
        if row is None:
            return None
        record, progress, live = row
        if finished is not None and not live:
            finished.hold(kind, job_id, record, generation)
        return _with_progress(record, progress)

    async def page(
        self,
        kind: str,
        *,
        owner: str | None = None,
        label: str | None = None,
        before: int | None = None,
        limit: int = 100,
    ) -> list[Value]:
        """Returns up to `limit` records of `kind` (of `owner`, with status `label`, if given)
        with an id below `before`, highest id first; through an index, so the cost is the
        page's, whatever the number of records (StateStore.page's semantics). Running jobs
        have their live progress as `read` gives it."""
        conditions = [sql.SQL("kind = %s")]
        params: list[Any] = [job_kind(kind)]
        for condition, value in (
            ("owner = %s", owner),
            ("status = %s", label),
            ("id < %s", before),
        ):
            if value is not None:
                conditions.append(sql.SQL(condition))
                params.append(value)
        query = sql.SQL("SELECT {} FROM jobs WHERE {} ORDER BY id DESC LIMIT %s").format(
            _RECORD_AND_PROGRESS, sql.SQL(" AND ").join(conditions)
        )
        async with self.database.connection() as connection:
            cursor = await connection.execute(query, (*params, max(limit, 0)))
            return [
                _with_progress(record, progress) for record, progress in await cursor.fetchall()
            ]

    async def counts(self, kind: str, *, live_only: bool = False) -> dict[str, int]:
        """Returns status -> how many records of `kind` (statuses with none left out); with
        `live_only`, of the pending and running ones only (through their own indexes: the
        cost is theirs, not the finished records')."""
        query: LiteralString = "SELECT status, count(*) FROM jobs WHERE kind = %s GROUP BY status"
        if live_only:
            query = (
                "SELECT 'pending', count(*) FROM jobs WHERE status = 'pending' AND kind = %s"
                " UNION ALL"
                " SELECT 'running', count(*) FROM jobs WHERE status = 'running' AND kind = %s"
            )
        params = (job_kind(kind),) * (2 if live_only else 1)
        async with self.database.connection() as connection:
            cursor = await connection.execute(query, params)
            return {status: int(number) for status, number in await cursor.fetchall() if number}

    async def total(self, collection: str) -> int:
        """Returns how many records `collection` holds."""
        table = _table(collection)
        async with self.database.connection() as connection:
            if table is _JOBS:
                cursor = await connection.execute(
                    "SELECT count(*) FROM jobs WHERE kind = %s", (collection,)
                )
            else:
                query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table.name))
                cursor = await connection.execute(query)
            row = await cursor.fetchone()
        assert row is not None
        return int(row[0])

    async def live(self, kind: str, node: str | None = None) -> dict[str, Value]:
        """Returns id (as text, as the store keys it) -> record of every live record of
        `kind`: pending, running or with an attempt to settle (jobs.records.is_live); with
        `node`, only those the database says that node runs or ran, and those of no node
        (pending ones, and what a single node or an import left: whichever node starts
        first takes them up)."""
        query = "SELECT id, record FROM jobs WHERE kind = %s AND live"
        params: tuple[Any, ...] = (job_kind(kind),)
        if node is not None:
            query += " AND (node = %s OR node IS NULL)"
            params += (node,)
        async with self.database.connection() as connection:
            cursor = await connection.execute(query + " ORDER BY id", params)
            return {str(job_id): dict(record) for job_id, record in await cursor.fetchall()}

    async def finished_page(
        self, kind: str, before: int | None, limit: int
    ) -> list[tuple[int, bytes]]:
        """Returns up to `limit` (id, record as JSON text) of `kind`'s records that are not
        live, with an id below `before` (any, if None), highest id first."""
        async with self.database.connection() as connection:
            cursor = await connection.execute(
                "SELECT id, record::text FROM jobs WHERE kind = %s AND NOT live AND id < %s"
                " ORDER BY id DESC LIMIT %s",
                (job_kind(kind), before if before is not None else 2**63 - 1, limit),
            )
            return [(int(job_id), text.encode()) for job_id, text in await cursor.fetchall()]

    async def every(self, collection: str) -> dict[str, Value]:
        """Returns key -> record of every record of a small collection (forget, meta)."""
        table = _table(collection)
        if table is _JOBS:
            raise ValueError("a job collection is read by page or live, not whole")
        query = sql.SQL("SELECT {key}, {value} FROM {table}").format(
            key=sql.Identifier(table.key),
            value=sql.Identifier(table.value),
            table=sql.Identifier(table.name),
        )
        async with self.database.connection() as connection:
            cursor = await connection.execute(query)
            return {key: dict(value) for key, value in await cursor.fetchall()}

    async def load(self, node: str | None = None) -> dict[str, dict[str, Value]]:
        """Returns what a node keeps in memory, as Store.load does: the live jobs, the
        forget queue and the meta values.

        With `node`, only the live jobs of that node (rows it claimed or ran): a node of a
        cluster claims pending jobs rather than loading them. Without, every live job (a
        single node's records, an import, a rebuild)."""
        return {
            BACKUPS: await self.live(BACKUPS, node),
            RESTORES: await self.live(RESTORES, node),
            FORGETS: await self.every(FORGETS),
            META: await self.every(META),
        }

    # -- nodes and their leases ------------------------------------------------------------

    async def heartbeat(self, node: str) -> None:
        """Renews `node`'s lease (adds the node on its first beat); times are the
        database's, so the nodes' clocks need not agree."""
        async with self.database.connection() as connection:
            await connection.execute(
                "INSERT INTO nodes (name) VALUES (%s)"
                " ON CONFLICT (name) DO UPDATE SET heartbeat_at = now()",
                (node,),
            )

    async def alive_nodes(self, lease_seconds: float) -> list[str]:
        """Returns the names of the nodes whose last heartbeat is younger than the lease."""
        async with self.database.connection() as connection:
            cursor = await connection.execute(
                "SELECT name FROM nodes"
                " WHERE heartbeat_at > now() - make_interval(secs => %s) ORDER BY name",
                (lease_seconds,),
            )
            return [name for (name,) in await cursor.fetchall()]

    # -- claims ----------------------------------------------------------------------------

    async def claim(self, node: str, slots: int) -> list[Job]:
        """Takes up to `slots` pending jobs for `node` and returns them, now running on it.

        Fair between users (SPEC §9): users stand in one line, the one who has waited
        longest for a turn first (a user joins at its back when a job of theirs becomes
        pending with none waiting, and goes back to it after a turn); each user's jobs
        start in ascending `sequence`. Jobs another node is claiming at this moment are
        skipped (FOR UPDATE SKIP LOCKED): two nodes never take the same job, and neither
        waits for the other.

        A claimed record changes as it does when a single node starts the job: running,
        `started_at` now, one more attempt, `extra` and restic's pid cleared; the job layer
        then runs it and writes what follows.

        Returns [] while a node holds GATE_LOCK exclusive (DatabaseCoordination.exclusive):
        a claim holds it shared until it commits, so the holder never sees a claim half done.
        Raises DatabaseUnavailable.
        """
        if slots <= 0:
            return []
        async with self.database.transaction() as connection:
            cursor = await connection.execute(
                "SELECT pg_try_advisory_xact_lock_shared(%s)", (GATE_LOCK,)
            )
            gate = await cursor.fetchone()
            if gate is None or not gate[0]:
                return []
            line = await self._line(connection, slots * LINE_LOOKAHEAD)
            waiting = await self._lock_pending(connection, [owner for owner, _ in line], slots)
            taken = _take_turns(_in_turn_order(line, waiting), waiting, slots)
            if not taken:
                return []
            now = _now_text()
            claimed = [
                Job(
                    kind,
                    job_id,
                    {
                        **record,
                        "status": _RUNNING,
                        "started_at": now,
                        "attempts": int(record.get("attempts") or 0) + 1,
                        "extra": "",
                        "pid": None,
                        "pid_start": None,
                    },
                )
                for kind, job_id, record in taken
            ]
            async with connection.cursor() as cursor:
                await cursor.executemany(
                    "UPDATE jobs SET record = %s, node = %s, claimed_at = now()"
                    " WHERE kind = %s AND id = %s",
                    [(Jsonb(job.record), node, job.kind, job.id) for job in claimed],
                )
            await self._note_turns(connection, [str(job.record.get("user", "")) for job in claimed])
        return claimed

    @staticmethod
    async def _line(connection: Connection, length: int) -> list[tuple[str, int]]:
        """Returns the first `length` users with pending jobs and the `sequence` of each
        one's first pending job, head of the line first: a user's place is their last turn,
        or when their oldest waiting job became pending if that is later (they had nothing
        waiting at their last turn)."""
        cursor = await connection.execute(
            "SELECT waiting.owner, waiting.first"
            " FROM (SELECT owner, min(coalesce(queued, 0)) AS since, min(sequence) AS first"
            "       FROM jobs WHERE status = 'pending' GROUP BY owner) AS waiting"
            " LEFT JOIN turns ON turns.owner = waiting.owner"
            " ORDER BY greatest(turns.turn, waiting.since), waiting.owner LIMIT %s",
            (length,),
        )
        return [(owner, int(first)) for owner, first in await cursor.fetchall()]

    @staticmethod
    async def _lock_pending(
        connection: Connection, owners: Sequence[str], slots: int
    ) -> dict[str, deque[tuple[str, int, Value]]]:
        """Locks and returns up to `slots` pending jobs of each of `owners`, each user's in
        queue order, skipping those another transaction holds."""
        if not owners:
            return {}
        cursor = await connection.execute(
            "SELECT picked.owner, picked.kind, picked.id, picked.record"
            " FROM unnest(%s::text[]) AS users (owner)"
            " CROSS JOIN LATERAL ("
            "     SELECT owner, kind, id, record, sequence FROM jobs"
            "     WHERE status = 'pending' AND owner = users.owner"
            "     ORDER BY sequence, kind, id LIMIT %s"
            "     FOR UPDATE SKIP LOCKED) AS picked"
            " ORDER BY picked.owner, picked.sequence, picked.kind, picked.id",
            (list(owners), slots),
        )
        waiting: dict[str, deque[tuple[str, int, Value]]] = {}
        for owner, kind, job_id, record in await cursor.fetchall():
            waiting.setdefault(owner, deque()).append((kind, job_id, dict(record)))
        return waiting

    @staticmethod
    async def _note_turns(connection: Connection, owners: list[str]) -> None:
        """Records that `owners` had a turn, in this order (later turns stand further back)."""
        cursor = await connection.execute(
            "SELECT nextval('line_clock') FROM generate_series(1, %s)", (len(owners),)
        )
        ticks = sorted(tick for (tick,) in await cursor.fetchall())
        last_turn = dict(zip(owners, ticks, strict=True))  # a user's last turn wins
        async with connection.cursor() as upsert:
            # In one order on every node: two claims that both give alice and bob a turn
            # wait for each other's row locks instead of deadlocking.
            await upsert.executemany(
                "INSERT INTO turns (owner, turn) VALUES (%s, %s)"
                " ON CONFLICT (owner) DO UPDATE SET turn = greatest(turns.turn, EXCLUDED.turn)",
                sorted(last_turn.items()),
            )

    async def requeue_dead(self, lease_seconds: float, max_attempts: int) -> list[Job]:
        """Puts the running jobs of dead nodes (no heartbeat within the lease; or of no
        known node) back to pending, fails them after `max_attempts`, or cancels those
        another node asked to cancel (`cancel_by`); returns them as changed.

        As a single node does at start (jobs.recovery.scrub) with what it was running: the
        attempt counts, and a backup is marked `unsettled` so that a snapshot the
        interrupted attempt may have saved is looked for before it runs again. Jobs another
        node is requeueing at this moment are skipped. Raises DatabaseUnavailable.
        """
        async with self.database.transaction() as connection:
            cursor = await connection.execute(
                "SELECT kind, id, record, node, cancel_by FROM jobs"
                " WHERE status = 'running' AND NOT EXISTS ("
                "     SELECT 1 FROM nodes WHERE nodes.name = jobs.node"
                "     AND nodes.heartbeat_at > now() - make_interval(secs => %s))"
                " ORDER BY kind, id FOR UPDATE SKIP LOCKED",
                (lease_seconds,),
            )
            return await _put_back(connection, await cursor.fetchall(), max_attempts, "stopped")

    async def release(
        self, node: str, running: Iterable[tuple[str, int]], max_attempts: int
    ) -> list[Job]:
        """As `requeue_dead`, for the jobs the database says run on `node` but that are not
        among `running` (kind, id): the node restarted, or lost its lease meanwhile and its
        restic processes with it. Returns them as changed; raises DatabaseUnavailable.

        A job `node` claims while this runs is not among `running` yet: the caller does not
        release while it claims."""
        kinds: list[str] = []
        ids: list[int] = []
        for kind, job_id in running:
            kinds.append(kind)
            ids.append(job_id)
        async with self.database.transaction() as connection:
            cursor = await connection.execute(
                "SELECT kind, id, record, node, cancel_by FROM jobs"
                " WHERE status = 'running' AND node = %s AND NOT EXISTS ("
                "     SELECT 1 FROM unnest(%s::text[], %s::bigint[]) AS kept (kind, id)"
                "     WHERE kept.kind = jobs.kind AND kept.id = jobs.id)"
                " ORDER BY kind, id FOR UPDATE SKIP LOCKED",
                (node, kinds, ids),
            )
            return await _put_back(
                connection, await cursor.fetchall(), max_attempts, "restarted or lost its lease"
            )


def _in_turn_order(
    line: list[tuple[str, int]], waiting: dict[str, deque[tuple[str, int, Value]]]
) -> list[str]:
    """Returns the users of `line` who may have a turn in this claim, in the line's order.

    A user whose first job another node is claiming at this moment (locked: what `waiting`
    holds of theirs starts later) has their turn there: they come after the others, and
    not at all while some user's jobs are all locked (that claim may leave those, and this
    one's slot is theirs once it commits: at the next claim)."""
    hidden = any(not waiting.get(owner) for owner, _ in line)
    here: list[str] = []
    elsewhere: list[str] = []
    for owner, first in line:
        jobs = waiting.get(owner)
        if not jobs:
            continue
        if int(jobs[0][2].get("sequence") or 0) <= first:
            here.append(owner)
        elif not hidden:
            elsewhere.append(owner)
    return here + elsewhere


def _take_turns(
    line: list[str], waiting: dict[str, deque[tuple[str, int, Value]]], slots: int
) -> list[tuple[str, int, Value]]:
    """Returns up to `slots` jobs taken round robin from the users of `line` (head first),
    each user's in queue order; a user whose locked jobs run out leaves the line."""
    queue = deque(owner for owner in line if waiting.get(owner))
    taken: list[tuple[str, int, Value]] = []
    while queue and len(taken) < slots:
        owner = queue.popleft()
        jobs = waiting[owner]
        taken.append(jobs.popleft())
        if jobs:
            queue.append(owner)
    return taken


async def _put_back(
    connection: Connection,
    found: Sequence[tuple[str, int, Value, str | None, str | None]],
    max_attempts: int,
    what: str,
) -> list[Job]:
    """Writes the interrupted jobs `found` (kind, id, record, node, cancel_by; locked by the
    caller's transaction) as they run again, fail or are cancelled; returns them so."""
    if not found:
        return []
    now = _now_text()
    changed = [
        Job(kind, job_id, _interrupted(kind, dict(record), node, by, max_attempts, now, what))
        for kind, job_id, record, node, by in found
    ]
    async with connection.cursor() as update:
        # The trigger of 002_nodes.sql (003_cluster.sql) queues a job put back to pending at
        # the back of its user's place and releases it from its node.
        await update.executemany(
            "UPDATE jobs SET record = %s WHERE kind = %s AND id = %s",
            [(Jsonb(job.record), job.kind, job.id) for job in changed],
        )
    return changed


def _interrupted(
    kind: str,
    record: Value,
    node: str | None,
    cancel_by: str | None,
    max_attempts: int,
    now: str,
    what: str = "stopped",
) -> Value:
    """Returns `record`, a job its node was running until it `what` (stopped, restarted),
    as it runs again, fails, or ends cancelled when someone asked to cancel it."""
    attempts = int(record.get("attempts") or 0)
    where = f"node {node}" if node else "its node"
    changed: Value = {**record, "pid": None, "pid_start": None}
    if kind == BACKUPS:
        # Whatever happens next, the interrupted attempt may have saved a snapshot.
        changed["unsettled"] = True
    if cancel_by:
        # Asked to stop and now stopped: running it again would undo the cancel.
        changed["status"] = _CANCEL
        changed["finished_at"] = now
        changed["extra"] = f"cancelled by {cancel_by}"
    elif attempts < max_attempts:
        changed["status"] = _PENDING
        changed["extra"] = (
            f"interrupted: {where} {what} (attempt {attempts} of {max_attempts}); runs again"
        )
    else:
        changed["status"] = _FAILED
        changed["finished_at"] = now
        changed["extra"] = (
            f"interrupted: {where} {what} during attempt {attempts} of {max_attempts}; "
            "not tried again"
        )
    return changed


async def _finished_changed(connection: Connection) -> bool:
    """Returns whether the transaction under way changed a finished job record (told by
    sql/004_finished_changes.sql's trigger)."""
    cursor = await connection.execute(
        "SELECT coalesce(current_setting('fa_restic.finished_changed', true), '') <> ''"
    )
    row = await cursor.fetchone()
    return row is not None and bool(row[0])


def _with_progress(record: Value, progress: Value | None) -> Value:
    """Returns `record` (a row's) with the live progress its node published, if any."""
    value = dict(record)
    if progress is not None:
        value["progress"] = dict(progress)
    return value
