"""restic's subcommands as async methods that return typed results or raise ResticError."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fa_restic.restic import commands, runner, sandbox
from fa_restic.restic.commands import Binary, Command, Lock, Repository
from fa_restic.restic.errors import ErrorKind, ResticError, classify, clean_line
from fa_restic.restic.features import (
    MINIMUM_VERSION,
    Feature,
    ResticVersion,
    has_feature,
    parse_version,
)
from fa_restic.restic.messages import (
    BackupStatus,
    BackupSummary,
    ItemError,
    RestoreStatus,
    RestoreSummary,
    Snapshot,
    StatsResult,
    TreeNode,
    parse_backup_line,
    parse_ls_line,
    parse_missing_source,
    parse_restore_line,
    parse_snapshots,
    parse_stats,
    parse_stderr_line,
)
from fa_restic.restic.redact import redact
from fa_restic.restic.watch import StderrWatcher

log = logging.getLogger("fa_restic.restic")

EXIT_INCOMPLETE = 3
EXIT_GO_CRASH = 2
"""The Go runtime's exit code after an unrecovered panic or a fatal runtime error."""
STALE_LOCK_UNLOCK_SECONDS = 10.0
"""How long the unlock after a restic that had to be killed may take."""
FINISH_GRACE_SECONDS = 30.0
"""How long a backup's restic may keep running after it said it gave up (see Restic._run)."""
FULL_ID_LENGTH = 64
ITEM_ERRORS_KEPT = 5

BackupStatusHandler = Callable[[BackupStatus], None]
RestoreStatusHandler = Callable[[RestoreStatus], None]
NodeHandler = Callable[[TreeNode], None]


@dataclass(frozen=True)
class BackupResult:
    summary: BackupSummary
    snapshot_id: str
    """restic's full 64-hex id, whatever the version printed."""
    unreadable_count: int
    unreadable_examples: tuple[str, ...]

    @property
    def incomplete(self) -> bool:
        """True when restic made the snapshot but could not read some items (exit 3)."""
        return self.unreadable_count > 0


@dataclass(frozen=True)
class RestoreResult:
    bytes_restored: int
    files_restored: int


async def read_version(binary_path: str) -> ResticVersion:
    """Returns the version of a restic binary; raises ResticError if it is missing or too old."""
    try:
        completed = await runner.run(commands.version_command(binary_path).argv, {})
    except OSError as error:
        raise ResticError(ErrorKind.BINARY, f"cannot run {binary_path}: {error.strerror}") from None
    try:
        version = parse_version(completed.stdout)
    except ValueError:
        raise ResticError(
            ErrorKind.BINARY, f"{binary_path} is not restic: {clean_line(completed.stdout)}"
        ) from None
    if version < MINIMUM_VERSION:
        raise ResticError(
            ErrorKind.BINARY,
            f"restic {version} at {binary_path} is too old: "
            f"fa-restic needs {MINIMUM_VERSION} or newer",
        )
    return version


def _raise_if_crashed_or_refused(
    completed: runner.Completed, crash: str | None, confined: bool
) -> None:
    """Raises ResticError for a Go panic, or for a confinement the sandbox refused."""
    if completed.exit_code == EXIT_GO_CRASH and crash is not None:
        raise ResticError(ErrorKind.FATAL, clean_line(f"restic crashed: {crash}"), EXIT_GO_CRASH)
    last = completed.stderr_tail[-1] if completed.stderr_tail else ""
    if (
        confined
        and completed.exit_code == sandbox.EXIT_REFUSED
        and last.startswith(sandbox.MESSAGE_PREFIX)
    ):
        reason = last.removeprefix(sandbox.MESSAGE_PREFIX)
        raise ResticError(ErrorKind.FATAL, clean_line(reason), sandbox.EXIT_REFUSED)


class Restic:
    """One restic binary bound to one repository."""

    def __init__(
        self,
        binary: Binary,
        repository: Repository,
        *,
        progress_fps: float = 1.0,
        grace_seconds: float = 3.0,
        backend_wait_seconds: float = 0.0,
        host: str | None = None,
    ) -> None:
        """`host`: the host name backups give their snapshots (a cluster's one name, so that
        whichever node backs up a path finds the same parent); None: this machine's."""
        self.host = host
        self.binary = binary
        self.repository = repository
        self._environment = repository.environment(progress_fps)
        self._grace_seconds = grace_seconds
        self._backend_wait = backend_wait_seconds

    @property
    def version(self) -> ResticVersion:
        return self.binary.version

    def has(self, feature: Feature) -> bool:
        """Returns True when this restic has `feature`."""
        return has_feature(self.binary.version, feature)

    def redact(self, text: str) -> str:
        """Returns restic's `text` with the repository as `<repository>` and hosts as `<host>`."""
        return redact(text, self.repository.url)

    async def _run(
        self,
        command: Command,
        *,
        cwd: Path | None = None,
        on_stdout: runner.LineHandler | None = None,
        on_stderr: runner.LineHandler | None = None,
        on_start: runner.StartHandler | None = None,
        finish_grace: float | None = None,
        confinement: sandbox.Confinement | None = None,
    ) -> runner.Completed:
        """Runs restic; raises ResticError if it cannot start or crashed (a Go panic).

        With `finish_grace`, a restic that has said it gave up (a backend operation
        "failed:", a "Fatal:" line, an exit_error) but is still running that many seconds
        later is stopped, and its own reason raised: restic 0.18 can hang for good after a
        failed pack upload (a full disk, a backend that stayed down).

        With `confinement`, restic runs in it (fa_restic.restic.sandbox) instead of `cwd`.

        A restic that keeps retrying a backend operation for longer than the backend
        wait is stopped too, with a BACKEND error: restic >= 0.17 retries for 15 minutes,
        and nothing on its command line shortens that.
        """
        watcher = StderrWatcher(finish_grace, self._backend_wait, on_stderr)
        argv = command.argv
        environment = self._environment
        if confinement is not None:
            wrapped, extra = sandbox.wrap(argv, confinement)
            argv, environment, cwd = tuple(wrapped), {**environment, **extra}, None
        task = asyncio.ensure_future(
            runner.run(
                argv,
                environment,
                cwd=cwd,
                on_stdout=on_stdout,
                on_stderr=watcher,
                on_start=on_start,
                grace_seconds=self._grace_seconds,
                # A command that takes no lock leaves none; and an unlock that had to be killed
                # must not start another one (a backend that is down would chain them).
                after_forced_stop=(None if command.lock is Lock.NONE else self.remove_stale_locks),
            )
        )
        watcher.watch(task)
        try:
            completed = await task
        except OSError as error:
            raise ResticError(
                ErrorKind.BINARY, f"cannot run {argv[0]}: {error.strerror or error}"
            ) from None
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if watcher.reason is not None and current is not None and current.cancelling() == 0:
                raise watcher.reason from None  # the watcher stopped restic, not our caller
            raise
        finally:
            watcher.close()
        _raise_if_crashed_or_refused(completed, watcher.crash, confinement is not None)
        return completed

    async def remove_stale_locks(self) -> None:
        """Runs a bounded plain `unlock`; a lock left behind stays for the next maintenance.

        Never raises: it is clean-up after a failure.
        """
        # A restic killed by SIGTERM (0.14 does not handle it) or SIGKILL leaves its lock,
        # and so may one that failed (a read-only repository). Bounded: with the backend down
        # restic >= 0.17 retries for 15 minutes, and a cancel, a health check or a shutdown
        # waits for this; a lock left behind is removed by the next maintenance unlock.
        with contextlib.suppress(ResticError, OSError, TimeoutError):
            await asyncio.wait_for(self.unlock(), STALE_LOCK_UNLOCK_SECONDS)

    async def _checked(self, command: Command, **options: object) -> runner.Completed:
        completed = await self._run(command, **options)  # type: ignore[arg-type]
        if completed.exit_code != 0:
            raise classify(completed.exit_code, completed.stderr_tail)
        return completed

    async def exists(self) -> bool:
        """Returns True if the repository exists; raises ResticError if it cannot be reached."""
        try:
            await self._checked(commands.cat_config_command(self.binary))
        except ResticError as error:
            if error.kind is ErrorKind.REPOSITORY_MISSING:
                return False
            raise
        return True

    async def ensure_initialised(self) -> bool:
        """Creates the repository if it does not exist; returns True if it did."""
        if await self.exists():
            return False
        await self._checked(commands.init_command(self.binary))
        log.info("initialised restic repository")
        return True

    async def backup(
        self,
        cwd: Path,
        paths: Sequence[str],
        tags: Sequence[str],
        *,
        on_status: BackupStatusHandler | None = None,
        on_start: runner.StartHandler | None = None,
        confinement: sandbox.Confinement | None = None,
        excludes: Sequence[str] = (),
    ) -> BackupResult:
        """Backs `paths` (relative to `cwd`, or to the confinement's folder) up, without what
        `excludes` (restic patterns, passed as they are) match; returns the summary or raises
        ResticError."""
        summary: BackupSummary | None = None
        unreadable: list[str] = []
        unreadable_count = 0

        def on_stdout(line: str) -> None:
            nonlocal summary
            message = parse_backup_line(line)
            if isinstance(message, BackupSummary):
                summary = message
            elif isinstance(message, BackupStatus) and on_status is not None:
                on_status(message)

        def on_stderr(line: str) -> None:
            nonlocal unreadable_count
            message = parse_stderr_line(line)
            # restic reports an unreadable folder once while scanning and again while archiving.
            if isinstance(message, ItemError) and message.during != "scan":
                text = message.text
            elif (missing := parse_missing_source(line)) is not None:
                # A source gone since it was checked: 0.19 exits 3, older restic 0 (same here).
                text = f"{missing}: does not exist"
            else:
                return
            unreadable_count += 1
            if len(unreadable) < ITEM_ERRORS_KEPT:
                unreadable.append(clean_line(text))

        completed = await self._run(
            commands.backup_command(self.binary, tags, paths, excludes, self.host),
            cwd=cwd,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            on_start=on_start,
            finish_grace=FINISH_GRACE_SECONDS,
            confinement=confinement,
        )
        if completed.exit_code not in (0, EXIT_INCOMPLETE) or summary is None:
            if completed.exit_code == 0:
                raise ResticError(ErrorKind.FATAL, "restic ended without a backup summary", 0)
            raise classify(completed.exit_code, completed.stderr_tail)
        if completed.exit_code == EXIT_INCOMPLETE and unreadable_count == 0:
            unreadable_count = 1  # 0.14 may say only "at least one source file could not be read"
        snapshot_id = summary.snapshot_id
        if len(snapshot_id) < FULL_ID_LENGTH:
            snapshot_id = await self.full_snapshot_id(snapshot_id)
        return BackupResult(summary, snapshot_id, unreadable_count, tuple(unreadable))

    async def restore(
        self,
        snapshot_id: str,
        target: Path,
        *,
        on_status: RestoreStatusHandler | None = None,
        on_start: runner.StartHandler | None = None,
        confinement: sandbox.Confinement | None = None,
        include: Sequence[str] = (),
        overwrite: str | None = None,
    ) -> RestoreResult:
        """Restores a snapshot's tree into `target`; returns what was restored or raises.

        With `confinement`, restic runs in it (fa_restic.restic.sandbox): `target` is then
        a path as the confined restic sees it. `include`: only these entries (paths in the
        tree, a folder with its contents), laid out as in a full restore. `overwrite`:
        restic's own `--overwrite` (>= 0.17; ValueError on older restic unless `always`).
        """
        summary: RestoreSummary | None = None
        last_status: RestoreStatus | None = None

        def on_stdout(line: str) -> None:
            nonlocal summary, last_status
            message = parse_restore_line(line)
            if isinstance(message, RestoreSummary):
                summary = message
            elif isinstance(message, RestoreStatus):
                last_status = message
                if on_status is not None:
                    on_status(message)

        completed = await self._run(
            commands.restore_command(self.binary, snapshot_id, target, include, overwrite),
            on_stdout=on_stdout,
            on_start=on_start,
            confinement=confinement,
        )
        if completed.exit_code != 0:
            raise classify(completed.exit_code, completed.stderr_tail)
        if summary is not None:
            return RestoreResult(summary.bytes_restored, summary.files_restored)
        # restic < 0.16 prints no summary: measure what landed.
        stats = await self.stats(snapshot_id)
        return RestoreResult(stats.total_size, stats.total_file_count)

    async def ls(
        self, snapshot_id: str, on_node: NodeHandler, paths: Sequence[str] = ()
    ) -> Snapshot:
        """Streams every node of a snapshot's tree to `on_node`, line by line as restic
        prints them (never the whole listing in one buffer); returns the snapshot. With
        `paths` (absolute in the snapshot), only each one's node and what is directly in it.

        Raises ResticError, also for an unknown snapshot (0.14 then exits 0, silent), and
        what `on_node` raises (restic is stopped then).
        """
        snapshot: Snapshot | None = None

        def on_stdout(line: str) -> None:
            nonlocal snapshot
            message = parse_ls_line(line)
            if isinstance(message, TreeNode):
                on_node(message)
            elif isinstance(message, Snapshot) and snapshot is None:
                snapshot = message

        command = commands.ls_command(self.binary, snapshot_id, paths)
        completed = await self._run(command, on_stdout=on_stdout)
        if completed.exit_code != 0:
            raise classify(completed.exit_code, completed.stderr_tail)
        if snapshot is None:
            raise ResticError(ErrorKind.FATAL, f"snapshot {snapshot_id[:12]} not found")
        return snapshot

    async def snapshots(
        self, tags: Sequence[str] = (), snapshot_ids: Sequence[str] = ()
    ) -> list[Snapshot]:
        """Returns the snapshots having all `tags` (and among `snapshot_ids`, if given)."""
        completed = await self._checked(commands.snapshots_command(self.binary, tags, snapshot_ids))
        try:
            return parse_snapshots(completed.stdout)
        except ValueError as error:
            raise ResticError(ErrorKind.FATAL, f"unreadable snapshots list: {error}") from None

    async def full_snapshot_id(self, short_id: str) -> str:
        """Returns the full id of a snapshot given by a unique prefix."""
        found = await self.snapshots(snapshot_ids=[short_id])
        if len(found) != 1:
            raise ResticError(ErrorKind.FATAL, f"snapshot {short_id} not found after backup")
        return found[0].id

    async def stats(self, snapshot_id: str) -> StatsResult:
        """Returns the restore size of a snapshot."""
        completed = await self._checked(commands.stats_command(self.binary, snapshot_id))
        try:
            return parse_stats(completed.stdout)
        except ValueError as error:
            raise ResticError(ErrorKind.FATAL, f"unreadable stats: {error}") from None

    async def backup_sizes(self, snapshot: Snapshot) -> tuple[int, int]:
        """Returns (bytes processed, bytes added) of the backup that made `snapshot`.

        restic >= 0.17 keeps the backup summary in the snapshot; before that the
        processed size is the snapshot's restore size and the added size is unknown (0).
        """
        if snapshot.summary is not None:
            return snapshot.summary.total_bytes_processed, snapshot.summary.pack_size
        return (await self.stats(snapshot.id)).total_size, 0

    async def forget(self, snapshot_ids: Sequence[str], lock_wait: float = 0) -> None:
        """Forgets snapshots by id; what is really gone must be checked afterwards.

        restic exits 0 for unknown ids, and for snapshots it could not remove (an
        append-only server) 0 before 0.19 and 3 from 0.19 on: neither raises here.
        """
        argv = commands.forget_command(self.binary, snapshot_ids, lock_wait)
        completed = await self._run(argv)
        if completed.exit_code == EXIT_INCOMPLETE:
            log.warning("forget: restic could not remove every snapshot (exit 3)")
        elif completed.exit_code != 0:
            raise classify(completed.exit_code, completed.stderr_tail)

    async def prune(
        self, lock_wait: float = 0, on_start: runner.StartHandler | None = None
    ) -> None:
        """Removes data no snapshot references."""
        await self._checked(commands.prune_command(self.binary, lock_wait), on_start=on_start)

    async def unlock(self) -> None:
        """Removes stale locks (plain `unlock`: a live process's lock stays)."""
        await self._checked(commands.unlock_command(self.binary))

    async def lock_ids(self) -> list[str]:
        """Returns the ids of the lock files in the repository."""
        completed = await self._checked(commands.list_locks_command(self.binary))
        return [line.strip() for line in completed.stdout.splitlines() if line.strip()]

    async def check(self) -> None:
        """Runs `restic check`; raises ResticError when it finds a problem."""
        await self._checked(commands.check_command(self.binary))
