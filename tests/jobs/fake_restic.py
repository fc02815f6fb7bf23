"""A hand-written restic for the job layer's tests: it records what it was asked and
answers what the test scripted (the model: Backrest's testtaskrunner_test.go).

It keeps a tiny repository of its own (snapshots with their tags and sizes), so
`snapshots`, `forget`, `backup_sizes` and `stats` answer as restic would. A call can be
held (`hold`): restic then "runs" until the test releases it, so a test decides when a
backup finishes, and sees whether it was interrupted (SIGINT is a task cancel here).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fa_restic.jobs.ports import ResticRunner, StartHandler
from fa_restic.restic.client import BackupResult, RestoreResult
from fa_restic.restic.errors import ErrorKind, ResticError
from fa_restic.restic.features import Feature, ResticVersion
from fa_restic.restic.messages import (
    BackupStatus,
    BackupSummary,
    BackupTotals,
    RestoreStatus,
    Snapshot,
    StatsResult,
    TreeNode,
)
from fa_restic.restic.sandbox import Confinement

FAKE_PID = 4_194_321
"""Above PID_MAX_LIMIT (2**22): no process has it, so nothing is ever signalled or killed."""
VERSION = ResticVersion(0, 18, 0)
EPOCH = datetime(2025, 1, 1, tzinfo=UTC)


def snapshot_id_for(seed: str) -> str:
    """Returns a full 64-hex restic id made from `seed` (stable, so tests can name it)."""
    return hashlib.sha256(seed.encode()).hexdigest()


@dataclass
class Call:
    """One thing restic was asked."""

    name: str
    args: tuple[object, ...] = ()
    backup_id: int | None = None
    """For a backup: the `fa:id=` of its tags."""
    options: dict[str, object] = field(default_factory=dict)
    """Keyword options beyond `args` (a backup's excludes; a restore's include, overwrite)."""


class Gate:
    """A held call: `entered` once restic "runs", `release()` to let it answer.

    `interrupted` says the call was cancelled (restic got SIGINT) while it ran.
    """

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self._released = asyncio.Event()
        self.interrupted = False
        self.answered = False

    def release(self) -> None:
        self._released.set()

    async def pass_through(self) -> None:
        self.entered.set()
        try:
            await self._released.wait()
        except asyncio.CancelledError:
            self.interrupted = True
            raise


@dataclass
class BackupScript:
    """What one backup answers (every field has the plain success's default)."""

    error: ResticError | None = None
    """Raised instead of answering (after the statuses were reported)."""
    statuses: list[BackupStatus] = field(default_factory=list)
    """Reported through on_status, in order, before the answer (and before a hold)."""
    total_bytes: int = 1000
    added_packed: int = 400
    files: int = 3
    unreadable: tuple[str, ...] = ()
    """Items that could not be read: a snapshot is made all the same (exit 3)."""
    snapshot_id: str | None = None
    """The snapshot made (default: one derived from the backup id and the call number)."""
    pid: int | None = FAKE_PID
    """Given to on_start; None: restic never started (on_start is not called)."""


def _tag_value(tags: Sequence[str], prefix: str) -> str | None:
    for tag in tags:
        if tag.startswith(prefix):
            return tag[len(prefix) :]
    return None


class FakeRestic:
    """A ResticRunner that answers from scripts and a repository in memory."""

    def __init__(self, version: ResticVersion = VERSION) -> None:
        self._version = version
        self.calls: list[Call] = []
        self.snapshots_by_id: dict[str, Snapshot] = {}
        self.initialised = True
        self.backup_scripts: dict[int, list[BackupScript]] = {}
        self.restore_results: list[RestoreResult | ResticError] = []
        self.trees: dict[str, list[TreeNode]] = {}
        """Per snapshot id, the nodes `ls` answers (default: none)."""
        self.nodes_fed = 0
        """Nodes `ls` has given its callers, in all."""
        self.errors: dict[str, list[ResticError]] = {}
        """Per method name, errors the next calls raise (one each, first in first out)."""
        self.gates: dict[str, list[Gate]] = {}
        """Per call key ("backup:7", "prune", ...), gates the next calls pass through."""
        self.running: set[str] = set()
        self.most_at_once = 0
        """The most backups and restores that ran at the same time."""
        self.on_call: Callable[[Call], None] | None = None
        """Called (synchronously) as each call begins: a test's look at the world then."""
        self._counter = itertools.count(1)

    # -- what a test scripts ------------------------------------------------------------

    def script_backup(self, backup_id: int, script: BackupScript | None = None) -> BackupScript:
        """Queues the answer of backup `backup_id`'s next run; returns it."""
        script = script or BackupScript()
        self.backup_scripts.setdefault(backup_id, []).append(script)
        return script

    def fail_next(self, name: str, error: ResticError) -> None:
        """Makes the next call of method `name` raise `error`."""
        self.errors.setdefault(name, []).append(error)

    def hold(self, key: str) -> Gate:
        """Holds the next call of `key` ("backup:<id>", "restore", "prune", "forget",
        "remove_stale_locks", ...) until the test releases it."""
        gate = Gate()
        self.gates.setdefault(key, []).append(gate)
        return gate

    def add_snapshot(
        self,
        backup_id: int,
        user: str,
        *,
        seed: str = "",
        minutes: int = 0,
        total_bytes: int = 1000,
        added_packed: int = 400,
    ) -> Snapshot:
        """Puts a snapshot tagged as the service tags backup `backup_id` of `user`
        into the repository (as if an earlier run made it) and returns it."""
        snapshot = Snapshot(
            id=snapshot_id_for(seed or f"{backup_id}-{user}-{minutes}"),
            time=(EPOCH + timedelta(minutes=minutes)).isoformat(),
            tags=[f"fa:id={backup_id}", f"fa:user={user}"],
            paths=["/"],
            summary=BackupTotals(
                total_bytes_processed=total_bytes,
                data_added=added_packed,
                data_added_packed=added_packed,
                total_files_processed=1,
            ),
        )
        self.snapshots_by_id[snapshot.id] = snapshot
        return snapshot

    # -- what a test reads ---------------------------------------------------------------

    def names(self) -> list[str]:
        return [call.name for call in self.calls]

    def calls_of(self, name: str) -> list[Call]:
        return [call for call in self.calls if call.name == name]

    def backed_up(self) -> list[int]:
        """The backup ids restic was asked to back up, in the order asked."""
        return [call.backup_id for call in self.calls_of("backup") if call.backup_id is not None]

    def forgotten(self) -> list[str]:
        """The snapshot ids restic was asked to forget, in the order asked."""
        return [
            snapshot_id
            for call in self.calls_of("forget")
            for snapshot_id in call.args[0]  # type: ignore[attr-defined]
        ]

    # -- inside ----------------------------------------------------------------------------

    def _begin(self, call: Call) -> None:
        self.calls.append(call)
        if self.on_call is not None:
            self.on_call(call)
        errors = self.errors.get(call.name)
        if errors:
            raise errors.pop(0)

    async def _gate(self, key: str) -> Gate | None:
        gates = self.gates.get(key)
        if not gates:
            return None
        gate = gates.pop(0)
        await gate.pass_through()
        return gate

    # -- ResticRunner --------------------------------------------------------------------

    @property
    def version(self) -> ResticVersion:
        return self._version

    def has(self, feature: Feature) -> bool:
        return True

    def redact(self, text: str) -> str:
        return text.replace("/srv/repo", "<repository>")

    async def exists(self) -> bool:
        self._begin(Call("exists"))
        return self.initialised

    async def ensure_initialised(self) -> bool:
        self._begin(Call("ensure_initialised"))
        created = not self.initialised
        self.initialised = True
        return created

    async def backup(
        self,
        cwd: Path,
        paths: Sequence[str],
        tags: Sequence[str],
        *,
        on_status: Callable[[BackupStatus], None] | None = None,
        on_start: StartHandler | None = None,
        confinement: Confinement | None = None,
        excludes: Sequence[str] = (),
    ) -> BackupResult:
        id_tag = _tag_value(tags, "fa:id=")
        backup_id = int(id_tag) if id_tag is not None else None
        arguments = (cwd, tuple(paths), tuple(tags), confinement)
        self._begin(Call("backup", arguments, backup_id, {"excludes": tuple(excludes)}))
        scripts = self.backup_scripts.get(backup_id or 0)
        script = scripts.pop(0) if scripts else BackupScript()
        key = f"backup:{backup_id}"
        self.running.add(key)
        self.most_at_once = max(self.most_at_once, len(self.running))
        try:
            if script.pid is not None and on_start is not None:
                await on_start(script.pid)
            for status in script.statuses:
                if on_status is not None:
                    on_status(status)
            gate = await self._gate(key)
            if script.error is not None:
                raise script.error
            number = next(self._counter)
            snapshot_id = script.snapshot_id or snapshot_id_for(f"backup-{backup_id}-{number}")
            totals = BackupTotals(
                files_new=script.files,
                data_added=script.added_packed,
                data_added_packed=script.added_packed,
                total_files_processed=script.files,
                total_bytes_processed=script.total_bytes,
            )
            self.snapshots_by_id[snapshot_id] = Snapshot(
                id=snapshot_id,
                short_id=snapshot_id[:8],
                time=(EPOCH + timedelta(minutes=number)).isoformat(),
                paths=[str(cwd)],
                tags=list(tags),
                summary=totals,
            )
            summary = BackupSummary(snapshot_id=snapshot_id, **totals.model_dump())
            if gate is not None:
                gate.answered = True
            return BackupResult(summary, snapshot_id, len(script.unreadable), script.unreadable)
        finally:
            self.running.discard(key)

    async def restore(
        self,
        snapshot_id: str,
        target: Path,
        *,
        on_status: Callable[[RestoreStatus], None] | None = None,
        on_start: StartHandler | None = None,
        confinement: Confinement | None = None,
        include: Sequence[str] = (),
        overwrite: str | None = None,
    ) -> RestoreResult:
        options: dict[str, object] = {"include": tuple(include), "overwrite": overwrite}
        self._begin(Call("restore", (snapshot_id, target), options=options))
        self.running.add("restore")
        try:
            if on_start is not None:
                await on_start(FAKE_PID)
            await self._gate("restore")
            answer = self.restore_results.pop(0) if self.restore_results else None
            if isinstance(answer, ResticError):
                raise answer
            (target / "restored.txt").write_text("restored\n")
            return answer or RestoreResult(bytes_restored=9, files_restored=1)
        finally:
            self.running.discard("restore")

    async def ls(
        self, snapshot_id: str, on_node: Callable[[TreeNode], None], paths: Sequence[str] = ()
    ) -> Snapshot:
        self._begin(Call("ls", (snapshot_id, *paths)))
        await self._gate("ls")
        snapshot = self.snapshots_by_id.get(snapshot_id)
        if snapshot is None:
            raise ResticError(ErrorKind.FATAL, f"snapshot {snapshot_id[:12]} not found")
        for node in self.trees.get(snapshot_id, []):
            parent = node.path.rpartition("/")[0] or "/"
            # As restic: with paths, each one's node and the nodes directly in it.
            if not paths or node.path in paths or parent in paths:
                self.nodes_fed += 1
                on_node(node)
        return snapshot

    async def snapshots(
        self, tags: Sequence[str] = (), snapshot_ids: Sequence[str] = ()
    ) -> list[Snapshot]:
        self._begin(Call("snapshots", (tuple(tags), tuple(snapshot_ids))))
        await self._gate("snapshots")
        found = [
            snapshot
            for snapshot in self.snapshots_by_id.values()
            if all(tag in (snapshot.tags or ()) for tag in tags)
        ]
        if snapshot_ids:
            found = [snapshot for snapshot in found if snapshot.id in snapshot_ids]
        return found

    async def stats(self, snapshot_id: str) -> StatsResult:
        self._begin(Call("stats", (snapshot_id,)))
        snapshot = self.snapshots_by_id[snapshot_id]
        summary = snapshot.summary or BackupTotals()
        return StatsResult(
            total_size=summary.total_bytes_processed,
            total_file_count=summary.total_files_processed,
        )

    async def backup_sizes(self, snapshot: Snapshot) -> tuple[int, int]:
        self._begin(Call("backup_sizes", (snapshot.id,)))
        summary = snapshot.summary or BackupTotals()
        return summary.total_bytes_processed, summary.pack_size

    async def forget(self, snapshot_ids: Sequence[str], lock_wait: float = 0) -> None:
        self._begin(Call("forget", (tuple(snapshot_ids), lock_wait)))
        await self._gate("forget")
        for snapshot_id in snapshot_ids:
            self.snapshots_by_id.pop(snapshot_id, None)

    async def prune(self, lock_wait: float = 0, on_start: StartHandler | None = None) -> None:
        self._begin(Call("prune", (lock_wait,)))
        await self._gate("prune")

    async def unlock(self) -> None:
        self._begin(Call("unlock"))
        await self._gate("unlock")

    async def remove_stale_locks(self) -> None:
        try:
            self._begin(Call("remove_stale_locks"))
        except ResticError:
            return  # never raises, as the real one
        await self._gate("remove_stale_locks")


def _conforms(restic: FakeRestic) -> ResticRunner:
    """mypy checks here that FakeRestic is a ResticRunner."""
    return restic
