"""Finished job records held in a node's memory, kept true across nodes.

A GET of a finished backup or restore is then answered from memory, as the state file
answers it, instead of with a round trip to the database. A finished record changes only
when it is deleted, when its id is used again, or by an operator; SPEC §10 asks that a
change answered on one node be seen on any other at once. How:

- The database tells every node of every change to a finished record, whoever makes it
  (sql/004_finished_changes.sql, channel `fa_restic_finished`). Each node listens on a
  connection of its own and forgets what it is told, in the order it was committed.
- A node that changed finished records does not answer before every other node has read
  that far (`changed`): it asks on `fa_restic_sync`, and each node answers once it has read
  everything committed before the question, the changes included.
- A node that cannot hear the database (its listening connection slow or lost) stops
  answering from memory: it trusts what it holds only while a ping it sent through the
  database came back less than TRUST_SECONDS ago. A writer that hears nothing from a node
  waits that long at most, then goes on: by then that node reads the database again.

Only records that are not live (pending, running, unsettled) are held; live ones change
all the time, and their node answers them from its own memory or the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from typing import Any

import orjson
import psycopg

from fa_restic.cluster.database import Database, DatabaseUnavailable
from fa_restic.store import Value

log = logging.getLogger("fa_restic.cluster")

CHANGES = "fa_restic_finished"
"""Channel of the changes to finished records: "<kind> <id>", or "*" for all."""
SYNC = "fa_restic_sync"
"""Channel of the nodes' pings, questions and answers: "ping|sync <node> <n>", "ack <node>
<n> <answering node>"."""
PING_SECONDS = 0.5
"""How often a node pings itself through the database."""
TRUST_SECONDS = 1.5
"""How long after sending a ping that came back a node answers from memory."""
LOST_SECONDS = 10.0
"""A listening connection none of whose pings came back for this long is made anew."""
DEFAULT_LIMIT = 100_000
"""Finished records held per node (about 0.5 KB each); the least recently read go first."""


class FinishedRecords:
    """The finished records this node holds; `start` first, `stop` last."""

    def __init__(
        self, url: str, database: Database, node: str, *, limit: int = DEFAULT_LIMIT
    ) -> None:
        """`url`: the database's, for the listening connection; `database`: the node's pool
        (pings and answers go through it); `limit`: records held at most (0: none)."""
        self._url = url
        self._database = database
        self._node = node
        self.limit = limit
        self._held: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._generation = 0
        self._trusted_until = 0.0
        self._pings: dict[int, float] = {}
        self._heard: dict[str, float] = {}
        """Node -> when its last ping was heard: the nodes a question waits for."""
        self._counter = 0
        self._own_ping_heard = 0.0
        self._questions: dict[int, _Question] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._listener: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()

    # -- what the records read --------------------------------------------------------------

    @property
    def generation(self) -> int:
        """Changes heard so far: a record read from the database is held only if no change
        was heard while it was read (`hold`)."""
        return self._generation

    def get(self, kind: str, job_id: int) -> Value | None:
        """Returns a finished record held (a fresh dict), or None: not held, or not to be
        trusted now."""
        if time.monotonic() >= self._trusted_until:
            return None
        key = (kind, job_id)
        text = self._held.get(key)
        if text is None:
            return None
        self._held.move_to_end(key)
        value: Value = orjson.loads(text)
        return value

    def hold(self, kind: str, job_id: int, value: Value, generation: int) -> None:
        """Holds a finished record read from the database as the most recently read, unless
        a change was heard since `generation` (the record may be that change's old one)."""
        self.hold_text(kind, job_id, orjson.dumps(value), generation)

    def hold_text(
        self, kind: str, job_id: int, text: bytes, generation: int, *, first_to_go: bool = False
    ) -> None:
        """As `hold`, of a record as JSON text (what is read ahead comes so: no decoding);
        with `first_to_go` as the least recently read (read ahead, not asked for), and not
        at all when the limit is reached."""
        if generation != self._generation or self.limit <= 0:
            return
        key = (kind, job_id)
        if first_to_go and key not in self._held and len(self._held) >= self.limit:
            return
        self._held[key] = text
        self._held.move_to_end(key, last=not first_to_go)
        while len(self._held) > self.limit:
            self._held.popitem(last=False)

    def __len__(self) -> int:
        return len(self._held)

    @property
    def trusted(self) -> bool:
        """True while what is held may be answered."""
        return time.monotonic() < self._trusted_until

    async def listening(self) -> None:
        """Returns once the node listens (what it holds from then on is kept true)."""
        await self._listening.wait()

    # -- after a change ---------------------------------------------------------------------

    async def changed(self) -> None:
        """Returns once every node that may answer from memory has forgotten the finished
        records this node's committed transactions changed: each answered, or
        TRUST_SECONDS passed (a node that did not answer trusts its memory no longer).
        Raises nothing: if the question cannot be sent, waiting out the trust is enough."""
        self._counter += 1
        number = self._counter
        question = _Question(time.monotonic() + TRUST_SECONDS + 0.1)
        self._questions[number] = question
        try:
            with contextlib.suppress(DatabaseUnavailable, psycopg.Error):
                await self._notify(f"sync {self._node} {number}")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(_loop_time(question.deadline)):
                    await question.answered.wait()
            if not question.answered.is_set():
                missing = sorted(question.waiting) if question.waiting is not None else ["this"]
                log.warning(
                    "finished records: no answer from node %s within %.1f s; went on",
                    ", ".join(missing),
                    TRUST_SECONDS,
                )
        finally:
            del self._questions[number]

    # -- start and stop ---------------------------------------------------------------------

    def start(self) -> None:
        """Starts listening, and pinging."""
        self._listener = asyncio.create_task(self._listen(), name="finished records")

    async def stop(self) -> None:
        """Stops listening; nothing held is answered any more."""
        self._trusted_until = 0.0
        tasks = [task for task in (self._listener, *self._tasks) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._forget_all()

    # -- listening --------------------------------------------------------------------------

    async def _listen(self) -> None:
        while True:
            try:
                connection = await psycopg.AsyncConnection.connect(
                    self._url,
                    autocommit=True,
                    connect_timeout=max(2, round(self._database.timeout)),
                    application_name=f"fa-restic {self._node} finished"[:63],
                )
            except (psycopg.Error, OSError):
                await asyncio.sleep(PING_SECONDS)
                continue
            try:
                await connection.execute(f"LISTEN {CHANGES}; LISTEN {SYNC}")
                # Changes made while nobody listened were not heard: what is held is
                # forgotten, and what is read from now on is kept true.
                self._forget_all()
                self._listening.set()
                await self._hear(connection)
            except (psycopg.Error, OSError) as error:
                log.warning("finished records: the listening connection was lost (%s)", error)
            finally:
                self._trusted_until = 0.0
                with contextlib.suppress(psycopg.Error, OSError):
                    await connection.close()
            await asyncio.sleep(PING_SECONDS)

    async def _hear(self, connection: psycopg.AsyncConnection[Any]) -> None:
        """Hears the channels until the connection fails, or until no ping of this node's
        came back for LOST_SECONDS (a connection that went silent: listen anew)."""
        next_ping = 0.0
        self._own_ping_heard = time.monotonic()
        while True:
            now = time.monotonic()
            if now - self._own_ping_heard > LOST_SECONDS:
                raise OSError(f"no ping came back for {LOST_SECONDS:.0f} s")
            if now >= next_ping:
                next_ping = now + PING_SECONDS
                self._ping()
            async for note in connection.notifies(timeout=max(0.0, next_ping - now)):
                if note.channel == CHANGES:
                    self._forget(note.payload)
                else:
                    self._heard_sync(note.payload)
                if time.monotonic() >= next_ping:
                    break

    def _forget(self, payload: str) -> None:
        self._generation += 1
        if payload == "*":
            self._held.clear()
            return
        kind, _, job_id = payload.partition(" ")
        with contextlib.suppress(ValueError):
            self._held.pop((kind, int(job_id)), None)

    def _forget_all(self) -> None:
        self._generation += 1
        self._held.clear()

    def _heard_sync(self, payload: str) -> None:
        parts = payload.split(" ")
        if len(parts) < 3 or not parts[2].isdigit():
            return
        word, node, number = parts[0], parts[1], int(parts[2])
        now = time.monotonic()
        if word == "ping":
            self._heard[node] = now
            if node == self._node:
                self._heard_own_ping(number, now)
        elif word == "sync" and node == self._node:
            # Every change committed before the question has been heard here: wait for
            # the nodes heard lately, which may be answering from memory. One heard
            # earlier than this had stopped trusting its memory before the question.
            question = self._questions.get(number)
            if question is not None:
                recent = now - TRUST_SECONDS - PING_SECONDS
                question.waiting = {
                    heard for heard, at in self._heard.items() if at > recent and heard != node
                } - question.acks
                question.check()
        elif word == "sync":
            self._send(f"ack {node} {number} {self._node}")
        elif word == "ack" and node == self._node and len(parts) == 4:
            question = self._questions.get(number)
            if question is not None:
                question.acks.add(parts[3])
                if question.waiting is not None:
                    question.waiting.discard(parts[3])
                    question.check()

    def _heard_own_ping(self, number: int, now: float) -> None:
        self._own_ping_heard = now
        sent = self._pings.pop(number, None)
        if sent is not None:
            self._trusted_until = max(self._trusted_until, sent + TRUST_SECONDS)
        # Pings sent before this one and not heard are lost (a connection lost meanwhile).
        for older in [known for known in self._pings if known < number]:
            del self._pings[older]

    def _ping(self) -> None:
        self._counter += 1
        self._pings[self._counter] = time.monotonic()
        self._send(f"ping {self._node} {self._counter}")

    def _send(self, payload: str) -> None:
        """Sends `payload` on SYNC through the pool, in the background (the listening loop
        does not wait for the database)."""
        task = asyncio.create_task(self._quietly(payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _quietly(self, payload: str) -> None:
        with contextlib.suppress(DatabaseUnavailable, psycopg.Error):
            await self._notify(payload)

    async def _notify(self, payload: str) -> None:
        async with self._database.connection() as connection:
            await connection.execute("SELECT pg_notify(%s, %s)", (SYNC, payload))


class _Question:
    """A `changed` waiting for the other nodes' answers."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.answered = asyncio.Event()
        self.acks: set[str] = set()
        self.waiting: set[str] | None = None
        """The nodes still to answer; None until the question came back here."""

    def check(self) -> None:
        if self.waiting is not None and not self.waiting:
            self.answered.set()


def _loop_time(monotonic_deadline: float) -> float:
    """Returns the event loop's time at `monotonic_deadline` (time.monotonic's clock)."""
    loop = asyncio.get_running_loop()
    return loop.time() + (monotonic_deadline - time.monotonic())
