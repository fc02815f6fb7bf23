"""restic's failures, classified: exit_error lines and 0.17+ exit codes first, 0.14's text last."""

from __future__ import annotations

import re
from collections.abc import Iterable
from enum import Enum

from fa_restic.restic.messages import ExitError, parse_stderr_line


class ErrorKind(Enum):
    FATAL = "fatal"
    REPOSITORY_MISSING = "repository does not exist"
    LOCKED = "repository is locked"
    WRONG_PASSWORD = "wrong password"  # noqa: S105 - a label, not a password
    BACKEND = "backend unreachable"
    INTERRUPTED = "interrupted"
    NO_SPACE = "no space left"
    BINARY = "restic could not be run"

    @property
    def is_transient(self) -> bool:
        """True for failures that may pass when tried again later."""
        return self in (ErrorKind.LOCKED, ErrorKind.BACKEND)


# 3 (snapshot made, some sources unreadable or, from 0.19, missing; 0.19 forget: some snapshots
# not removed) is no failure: the backup and forget callers look at it first.
EXIT_CODE_TO_KIND: dict[int, ErrorKind] = {
    10: ErrorKind.REPOSITORY_MISSING,
    11: ErrorKind.LOCKED,
    12: ErrorKind.WRONG_PASSWORD,
    130: ErrorKind.INTERRUPTED,  # 0.14 and 0.19 on SIGINT; 0.17-0.18 exit 1 ("context canceled")
}

# Checked in order: a backend that is down also prints "Is there a repository...", and
# so does 0.18 interrupted while it opens the repository ("context canceled"); 0.19 says
# "context canceled" in its exit_error too, with code 130.
TEXT_TO_KIND: tuple[tuple[str, ErrorKind], ...] = (
    ("context canceled", ErrorKind.INTERRUPTED),
    ("no space left on device", ErrorKind.NO_SPACE),
    ("connection refused", ErrorKind.BACKEND),
    ("no such host", ErrorKind.BACKEND),
    ("i/o timeout", ErrorKind.BACKEND),
    ("connection reset", ErrorKind.BACKEND),
    ("unexpected HTTP response (5", ErrorKind.BACKEND),
    ("already locked", ErrorKind.LOCKED),
    ("wrong password", ErrorKind.WRONG_PASSWORD),
    ("Is there a repository at the following location", ErrorKind.REPOSITORY_MISSING),
    ("repository does not exist", ErrorKind.REPOSITORY_MISSING),
)

# Lines restic prints while it runs, watched by fa_restic.restic.watch:
GO_CRASH_PREFIXES = ("panic: ", "fatal error: ")
"""A Go panic or fatal runtime error: its reason comes first, then a long stack."""
RETRYING = "returned error, retrying after"
"""restic's retry layer: `Save(<data/1b29>) returned error, retrying after 552ms: ...`."""
VANISHED_LOCK = re.compile(
    r"^Load\(<lock/[0-9a-f]+>[^)]*\) returned error, retrying after .*"
    r"(no such file or directory|does not exist|not found|404)",
    re.IGNORECASE,
)
"""restic < 0.17 retrying, for some 15 minutes, the read of a lock file another restic
removed after it was listed (restic#1523, fixed by restic#4520)."""
RECOVERED = "operation successful after"
"""...and once a retry works: `Save(<data/1b29>) operation successful after 3 retries`."""
GAVE_UP = re.compile(r"^[A-Z][A-Za-z]*\(<[^>]*>[^)]*\) failed: ")
"""restic's retry layer giving up (0.17+): `Save(<data/1b29541841>) failed: ...`."""

MESSAGE_LIMIT = 400
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class ResticError(Exception):
    """restic ended with an error; `message` is one human line, never a secret."""

    def __init__(self, kind: ErrorKind, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.exit_code = exit_code


def clean_line(text: str) -> str:
    """Returns `text` without ANSI escapes, on one line, capped at MESSAGE_LIMIT characters."""
    text = _ANSI.sub("", text)
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 1] + "…"


def _first_line(text: str) -> str:
    for line in _ANSI.sub("", text).splitlines():
        if line.strip():
            return line.strip()
    return ""


def _kind_from_text(text: str) -> ErrorKind | None:
    lowered = text.lower()
    for needle, kind in TEXT_TO_KIND:
        if needle.lower() in lowered:
            return kind
    return None


def classify(exit_code: int, stderr_tail: Iterable[str]) -> ResticError:
    """Returns the error that an exit code and the last stderr lines describe."""
    lines = [line for line in stderr_tail if line.strip()]
    exit_error: ExitError | None = None
    for line in reversed(lines):
        message = parse_stderr_line(line)
        if isinstance(message, ExitError):
            exit_error = message
            break
    text = exit_error.message if exit_error else "\n".join(_ANSI.sub("", line) for line in lines)
    # restic's exit code says what happened (>= 0.17); its text only where the code does not.
    kind = EXIT_CODE_TO_KIND.get(exit_code) or _kind_from_text(text) or ErrorKind.FATAL
    if exit_error is not None:
        summary = _first_line(exit_error.message)
    else:
        plain = [line for line in lines if parse_stderr_line(line) is None]
        fatal = [line for line in plain if "Fatal:" in line or "unable to" in line]
        summary = _first_line(fatal[-1] if fatal else (plain[-1] if plain else ""))
        if "Fatal: " in summary:
            # 0.14 may print its Fatal line glued to the end of a cleanup warning.
            summary = summary[summary.rindex("Fatal: ") :]
    if kind is ErrorKind.LOCKED:
        # restic's own first line names the lock holder; keep it, not the hint lines.
        locked = [line for line in text.splitlines() if "locked" in line]
        summary = _first_line(locked[0]) if locked else summary
    summary = summary.removeprefix("Fatal: ").strip() or f"restic exited with code {exit_code}"
    return ResticError(kind, clean_line(summary), exit_code)
