"""Client commands that talk to a running fa-restic over HTTP.

`fa-restic backup PATH --id N [--exclude PATTERN...] [--wait]`,
`restore --id N --backup-id M --dst PATH [--include ENTRY...] [--overwrite POLICY] [--wait]`,
`status {backup,restore} ID`, `cancel {backup,restore} ID`, `cancel-all {backup,restore}`,
`delete ID`, `list [backup|restore] [--status S] [--limit N] [--after ID] [--user U] [--all]`,
`ls ID [PATH] [--limit N] [--after NAME] [--all]`. The token comes from the environment
(FA_RESTIC_TOKEN) or a file (--token-file), never from the command line, which every user
of the machine can read.

Output: the envelope's `data` as JSON on stdout; progress (`--wait`) and errors on stderr.
Exit codes: 0 success; 1 the job failed or was cancelled, or the API answered an error (its
message goes to stderr); 2 a usage error; 130 Ctrl-C (the job itself goes on).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlencode

import aiohttp

from fa_restic.names import (
    API_PREFIX,
    MAX_ID,
    SUCCESS_CODE,
    TERMINAL_STATUSES,
    JobKind,
    JobStatus,
    Overwrite,
)

DEFAULT_URL = "http://127.0.0.1:8080"
URL_ENV = "FA_RESTIC_URL"
TOKEN_ENV = "FA_RESTIC_TOKEN"  # noqa: S105 - the variable's name, not a token

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

POLL_SECONDS = 0.5
PLAIN_LINE_SECONDS = 5.0
REQUEST_TIMEOUT_SECONDS = 30.0
# While waiting, how long the service may be unreachable (a restart) before giving up.
RECONNECT_SECONDS = 60.0
BAR_WIDTH = 20

# argparse's type of `add_subparsers()`; it has no public name.
SubParsers = argparse._SubParsersAction


class UsageError(Exception):
    """A command line that cannot be run (exit code 2)."""


class ApiFailure(Exception):
    """The API answered an error, or did not answer (exit code 1)."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.transient = transient


# -- arguments ---------------------------------------------------------------------------------


def _positive_id(text: str) -> int:
    """argparse type: a positive integer id."""
    if not text.isascii() or not text.isdigit() or not 0 < int(text) <= MAX_ID:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return int(text)


def add_client_commands(commands: SubParsers[argparse.ArgumentParser]) -> None:
    """Adds the client subcommands to the parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        help=f"the service's base URL (default: ${URL_ENV} or {DEFAULT_URL})",
    )
    common.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help=f"read the bearer token from FILE (default: ${TOKEN_ENV})",
    )

    backup = commands.add_parser(
        "backup", parents=[common], help="start a backup of PATH (relative to your home)"
    )
    backup.add_argument("path", metavar="PATH")
    backup.add_argument("--id", type=_positive_id, required=True, help="the backup id")
    backup.add_argument("--wait", action="store_true", help="wait for the end, show progress")
    backup.set_defaults(run=_backup)

    restore = commands.add_parser(
        "restore", parents=[common], help="restore a backup into --dst (relative to your home)"
    )
    restore.add_argument("--id", type=_positive_id, required=True, help="the restore id")
    restore.add_argument("--backup-id", type=_positive_id, required=True)
    restore.add_argument("--dst", required=True, metavar="PATH")
    restore.add_argument("--wait", action="store_true", help="wait for the end, show progress")
    restore.set_defaults(run=_restore)
    _add_selection(backup, restore)

    status = commands.add_parser("status", parents=[common], help="show a backup or restore")
    status.add_argument("kind", choices=list(JobKind))
    status.add_argument("id", type=_positive_id)
    status.set_defaults(run=_status)

    cancel = commands.add_parser("cancel", parents=[common], help="cancel a backup or restore")
    cancel.add_argument("kind", choices=list(JobKind))
    cancel.add_argument("id", type=_positive_id)
    cancel.set_defaults(run=_cancel)

    cancel_all = commands.add_parser(
        "cancel-all", parents=[common], help="cancel all your pending/running backups or restores"
    )
    cancel_all.add_argument("kind", choices=list(JobKind))
    cancel_all.set_defaults(run=_cancel_all)

    delete = commands.add_parser(
        "delete", parents=[common], help="delete a finished backup (and forget its snapshot)"
    )
    delete.add_argument("id", type=_positive_id)
    delete.set_defaults(run=_delete)
    _add_finding(commands, common)


def _add_selection(backup: argparse.ArgumentParser, restore: argparse.ArgumentParser) -> None:
    """Adds backup --exclude, restore --include and --overwrite (SPEC §11)."""
    backup.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="leave out what this restic pattern matches, relative to PATH (repeatable)",
    )
    restore.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="ENTRY",
        help="restore only this file or folder of the backup, relative to what was backed "
        "up (repeatable)",
    )
    restore.add_argument(
        "--overwrite",
        choices=list(Overwrite),
        help="what happens to a file already in --dst (default: always)",
    )


def _add_finding(commands: SubParsers[argparse.ArgumentParser], common: Any) -> None:
    """Adds `list` and `ls` (SPEC §11)."""
    paging = argparse.ArgumentParser(add_help=False)
    paging.add_argument("--limit", type=_positive_id, help="at most this many (max 1000)")
    paging.add_argument("--all", action="store_true", help="every page, not just the first")
    listing = commands.add_parser(
        "list", parents=[common, paging], help="list your backups or restores, newest first"
    )
    listing.add_argument("kind", nargs="?", choices=list(JobKind), default=JobKind.BACKUP)
    listing.add_argument("--status", choices=list(JobStatus))
    listing.add_argument("--after", type=_positive_id, help="the next_after of a page")
    listing.add_argument("--user", help="one user's (admin tokens)")
    listing.set_defaults(run=_list)
    files = commands.add_parser(
        "ls", parents=[common, paging], help="list a folder of a backup (default: its top)"
    )
    files.add_argument("id", type=_positive_id)
    files.add_argument("path", nargs="?", default="", metavar="PATH")
    files.add_argument("--after", metavar="NAME", help="the next_after of a page")
    files.set_defaults(run=_ls)


@dataclass(frozen=True)
class Target:
    """Where the API is and how to authenticate to it."""

    base: str
    token: str


def api_base(url: str) -> str:
    """Returns the API root for a service URL (`…/fa/api/v0` is added unless given)."""
    base = url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise UsageError(f"the URL must start with http:// or https://, not {url!r}")
    return base if base.endswith(API_PREFIX) else base + API_PREFIX


def read_token(token_file: Path | None) -> str:
    """Returns the token from `token_file`, else from $FA_RESTIC_TOKEN."""
    if token_file is not None:
        source = f"--token-file {token_file}"
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except OSError as error:
            raise UsageError(f"cannot read {source}: {error.strerror or error}") from None
        except UnicodeDecodeError:
            raise UsageError(f"{source} is not UTF-8 text") from None
    else:
        source = f"${TOKEN_ENV}"
        token = os.environ.get(TOKEN_ENV, "").strip()
        if not token:
            raise UsageError(f"no token: set {TOKEN_ENV} or pass --token-file FILE")
    if not token:
        raise UsageError(f"{source} is empty")
    if not all(character.isprintable() and not character.isspace() for character in token):
        # It goes into an HTTP header: a line break there would be refused (or worse).
        raise UsageError(f"{source} holds more than one token (spaces or line breaks)")
    return token


def _target(arguments: argparse.Namespace) -> Target:
    url = arguments.url or os.environ.get(URL_ENV) or DEFAULT_URL
    return Target(api_base(url), read_token(arguments.token_file))


# -- HTTP ----------------------------------------------------------------------------------


class Client:
    """Calls the API and unwraps its envelope."""

    def __init__(self, session: aiohttp.ClientSession, target: Target) -> None:
        self.session = session
        self.target = target

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """Returns the envelope's `data`; raises ApiFailure with the envelope's message."""
        url = self.target.base + path
        headers = {"Authorization": f"Bearer {self.target.token}"}
        try:
            async with self.session.request(method, url, json=body, headers=headers) as response:
                text = await response.text(errors="replace")
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as error:
            reason = str(error) or type(error).__name__
            raise ApiFailure(f"cannot reach {self.target.base}: {reason}", transient=True) from None
        try:
            answer = json.loads(text)
        except ValueError:
            answer = None
        if not (isinstance(answer, dict) and isinstance(answer.get("message"), str)):
            raise ApiFailure(
                f"HTTP {status} from {url}: not an fa-restic answer", transient=status >= 502
            )
        if answer.get("code") != SUCCESS_CODE:
            raise ApiFailure(answer["message"], transient=status >= 502)
        return answer.get("data")


async def _with_client(target: Target, action: Callable[[Client], Awaitable[int]]) -> int:
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        return await action(Client(session, target))


def _run(
    arguments: argparse.Namespace,
    action: Callable[[Client], Awaitable[int]],
    interrupted: str = "interrupted",
) -> int:
    """Runs `action` against the API; maps failures onto exit codes."""
    try:
        target = _target(arguments)
    except UsageError as error:
        print(f"fa-restic: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return asyncio.run(_with_client(target, action))
    except ApiFailure as error:
        print(f"fa-restic: {error.message}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        if sys.stderr.isatty():
            print(file=sys.stderr)  # off the progress line
        print(f"fa-restic: {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2), flush=True)


# -- progress --------------------------------------------------------------------------------


def human_bytes(count: int) -> str:
    """Returns `count` bytes as `512 B`, `1.5 KiB`, `3.2 GiB`, …"""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: int | None) -> str:
    """Returns seconds as `m:ss` or `h:mm:ss`; `--:--` when unknown."""
    if seconds is None or seconds < 0:
        return "--:--"
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def describe_progress(kind: str, job_id: int, data: dict[str, Any], *, bar_width: int = 0) -> str:
    """Returns one line: status, percent, bytes done/total, ETA, and a bar if `bar_width`."""
    status = str(data.get("status", "?"))
    if status == JobStatus.PENDING:
        return f"{kind} {job_id}: pending (waiting for a free slot)"
    progress = data.get("progress") or {}
    fraction = min(max(float(progress.get("percent_done") or 0.0), 0.0), 1.0)
    done = int(progress.get("bytes_done") or 0)
    total = int(progress.get("total_bytes") or 0)
    sizes = f"{human_bytes(done)} / {human_bytes(total)}" if total else human_bytes(done)
    eta = human_duration(progress.get("seconds_remaining"))
    shown = f"{kind} {job_id}: {status} "
    if bar_width > 0:
        filled = round(fraction * bar_width)
        shown += "[" + "#" * filled + "." * (bar_width - filled) + "] "
    return f"{shown}{fraction * 100:5.1f}%  {sizes}  ETA {eta}"


def describe_end(kind: str, job_id: int, data: dict[str, Any]) -> str:
    """Returns the final line: status, sizes and restic's reason if any."""
    stat = data.get("stat") or {}
    total = human_bytes(int(stat.get("total_size") or 0))
    if kind == JobKind.BACKUP:
        sizes = f"{total} processed, {human_bytes(int(stat.get('pack_size') or 0))} added"
    else:
        sizes = f"{total} restored"
    line = f"{kind} {job_id}: {data.get('status')}, {sizes}"
    extra = data.get("extra")
    return f"{line}: {extra}" if extra else line


class ProgressReport:
    """Shows a job's progress: one rewritten line on a terminal, else a line every ~5 s."""

    def __init__(
        self,
        kind: str,
        job_id: int,
        stream: TextIO,
        *,
        live: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kind = kind
        self.job_id = job_id
        self.stream = stream
        self.live = live
        self.clock = clock
        self._shown = 0  # width of the live line on screen
        self._last_line_at: float | None = None

    @staticmethod
    def _width() -> int:
        return max(shutil.get_terminal_size().columns - 1, 20)

    def _live(self, text: str) -> None:
        text = text[: self._width()]
        self.stream.write("\r" + text + " " * max(self._shown - len(text), 0))
        self.stream.flush()
        self._shown = len(text)

    def update(self, data: dict[str, Any]) -> None:
        """Shows a GET's data."""
        if self.live:
            # The bar takes what room the terminal leaves (none on a narrow one).
            room = self._width() - len(describe_progress(self.kind, self.job_id, data)) - 3
            bar_width = min(BAR_WIDTH, room) if room >= 5 else 0
            self._live(describe_progress(self.kind, self.job_id, data, bar_width=bar_width))
            return
        self._line(describe_progress(self.kind, self.job_id, data))

    def _line(self, text: str) -> None:
        if self.live:
            self._live(text)
            return
        now = self.clock()
        if self._last_line_at is None or now - self._last_line_at >= PLAIN_LINE_SECONDS:
            print(text, file=self.stream)
            self.stream.flush()
            self._last_line_at = now

    def note(self, text: str) -> None:
        """Shows a passing problem (the service not answering)."""
        self._line(f"{self.kind} {self.job_id}: {text}")

    def finish(self, data: dict[str, Any]) -> None:
        """Shows the final status on its own line."""
        if self.live and self._shown:
            self.stream.write("\r" + " " * self._shown + "\r")
            self._shown = 0
        print(describe_end(self.kind, self.job_id, data), file=self.stream)
        self.stream.flush()


async def wait_for(client: Client, kind: str, job_id: int, report: ProgressReport) -> Any:
    """Polls the job every 0.5 s until it ends; returns its last data."""
    answered_at = time.monotonic()
    while True:
        try:
            data = await client.call("GET", f"/{kind}/{job_id}")
        except ApiFailure as error:
            # A restarting service runs its interrupted jobs again: keep waiting for a while.
            if not error.transient or time.monotonic() - answered_at > RECONNECT_SECONDS:
                raise
            report.note(f"{error.message}; retrying")
            await asyncio.sleep(1.0)
            continue
        answered_at = time.monotonic()
        if data.get("status") in TERMINAL_STATUSES:
            report.finish(data)
            return data
        report.update(data)
        await asyncio.sleep(POLL_SECONDS)


async def _start_and_maybe_wait(
    client: Client, kind: str, job_id: int, body: dict[str, Any], wait: bool
) -> int:
    data = await client.call("POST", f"/{kind}", body)
    if not wait:
        _print_json(data)
        return EXIT_OK
    report = ProgressReport(kind, job_id, sys.stderr, live=sys.stderr.isatty())
    data = await wait_for(client, kind, job_id, report)
    _print_json(data)
    return EXIT_OK if data.get("status") == JobStatus.SUCCESS else EXIT_FAILED


def _interrupted(kind: str, job_id: int) -> str:
    """What Ctrl-C says: the job is not cancelled by it."""
    return (
        f"stopped waiting; {kind} {job_id} goes on in the service "
        f"(fa-restic cancel {kind} {job_id} stops it)"
    )


# -- the commands ------------------------------------------------------------------------------


def _backup(arguments: argparse.Namespace) -> int:
    body: dict[str, Any] = {"id": arguments.id, "path": arguments.path}
    if arguments.exclude:
        body["exclude"] = arguments.exclude
    return _run(
        arguments,
        lambda client: _start_and_maybe_wait(
            client, JobKind.BACKUP, arguments.id, body, arguments.wait
        ),
        _interrupted(JobKind.BACKUP, arguments.id),
    )


def _restore(arguments: argparse.Namespace) -> int:
    body: dict[str, Any] = {
        "restore_id": arguments.id,
        "backup_id": arguments.backup_id,
        "dst_path": arguments.dst,
    }
    if arguments.include:
        body["include"] = arguments.include
    if arguments.overwrite:
        body["overwrite"] = arguments.overwrite
    return _run(
        arguments,
        lambda client: _start_and_maybe_wait(
            client, JobKind.RESTORE, arguments.id, body, arguments.wait
        ),
        _interrupted(JobKind.RESTORE, arguments.id),
    )


def _printing(
    method: str, path: str, body: dict[str, Any] | None = None
) -> Callable[[Client], Awaitable[int]]:
    """Returns an action that makes one call and prints its data as JSON."""

    async def action(client: Client) -> int:
        _print_json(await client.call(method, path, body))
        return EXIT_OK

    return action


def _status(arguments: argparse.Namespace) -> int:
    return _run(arguments, _printing("GET", f"/{arguments.kind}/{arguments.id}"))


def _cancel(arguments: argparse.Namespace) -> int:
    return _run(arguments, _printing("POST", f"/{arguments.kind}/cancel", {"id": arguments.id}))


def _cancel_all(arguments: argparse.Namespace) -> int:
    return _run(arguments, _printing("POST", f"/{arguments.kind}/cancel-all"))


def _delete(arguments: argparse.Namespace) -> int:
    return _run(arguments, _printing("DELETE", f"/backup/{arguments.id}"))


def _query(**values: Any) -> str:
    """Returns `?a=1&b=x` of the values that are set (empty string if none)."""
    chosen = {key: value for key, value in values.items() if value not in (None, "")}
    return f"?{urlencode(chosen)}" if chosen else ""


def _pages(
    arguments: argparse.Namespace, path: str, query: dict[str, Any]
) -> Callable[[Client], Awaitable[int]]:
    """Returns an action that prints the pages of a listing: the first one's data as JSON,
    or with --all every item as one JSON array."""

    async def action(client: Client) -> int:
        after = arguments.after
        items: list[Any] = []
        while True:
            data = await client.call("GET", path + _query(**query, after=after))
            if not arguments.all:
                _print_json(data)
                return EXIT_OK
            items += data["items"]
            after = data["next_after"]
            if after is None:
                _print_json(items)
                return EXIT_OK

    return action


def _list(arguments: argparse.Namespace) -> int:
    query = {"status": arguments.status, "limit": arguments.limit, "user": arguments.user}
    return _run(arguments, _pages(arguments, f"/{arguments.kind}", query))


def _ls(arguments: argparse.Namespace) -> int:
    query = {"path": arguments.path, "limit": arguments.limit}
    return _run(arguments, _pages(arguments, f"/backup/{arguments.id}/files", query))
