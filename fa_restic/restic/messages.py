"""restic's JSON output, typed at the boundary.

restic omits every field that is zero or empty, prints plain text between JSON
lines (0.14 often ignores --json), and 0.14 has no restore JSON at all, so every
field has a default and unparseable lines are skipped.
"""

from __future__ import annotations

import json
import re
from typing import Any, NamedTuple

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class BackupStatus(_Message):
    percent_done: float = 0.0
    total_files: int = 0
    files_done: int = 0
    total_bytes: int = 0
    bytes_done: int = 0
    seconds_elapsed: int = 0
    seconds_remaining: int | None = None
    error_count: int = 0


class BackupTotals(_Message):
    """A backup's counts and sizes: the summary line, or a snapshot's `summary` (>= 0.17)."""

    files_new: int = 0
    files_changed: int = 0
    files_unmodified: int = 0
    dirs_new: int = 0
    data_added: int = 0
    data_added_packed: int | None = None
    total_files_processed: int = 0
    total_bytes_processed: int = 0
    total_duration: float = 0.0

    @property
    def pack_size(self) -> int:
        """Bytes added to the repository: packed where restic tells it (>= 0.17)."""
        return self.data_added if self.data_added_packed is None else self.data_added_packed


class BackupSummary(BackupTotals):
    """The last line of `backup --json`; a snapshot's stored summary has no snapshot_id."""

    snapshot_id: str


class RestoreStatus(_Message):
    percent_done: float = 0.0
    total_files: int = 0
    files_restored: int = 0
    total_bytes: int = 0
    bytes_restored: int = 0
    seconds_elapsed: int = 0
    seconds_remaining: int | None = None


class RestoreSummary(RestoreStatus):
    files_skipped: int = 0
    bytes_skipped: int = 0


class ItemError(_Message):
    """A file restic could not read (stderr, during backup)."""

    error: dict[str, Any] = Field(default_factory=dict)
    during: str = ""
    item: str = ""

    @property
    def text(self) -> str:
        """Returns restic's reason, or the item alone when 0.14 gave an empty error."""
        message = self.error.get("message")
        if isinstance(message, str) and message:
            return message
        return self.item


class ExitError(_Message):
    """0.18's last stderr line with --json: the exit code and the fatal message."""

    code: int
    message: str = ""


class Snapshot(_Message):
    id: str
    short_id: str = ""
    time: str = ""
    paths: list[str] = Field(default_factory=list)
    tags: list[str] | None = None
    hostname: str = ""
    summary: BackupTotals | None = None

    def tag_value(self, key: str) -> str | None:
        """Returns the value of the first tag `key=value`, or None."""
        prefix = f"{key}="
        for tag in self.tags or ():
            if tag.startswith(prefix):
                return tag[len(prefix) :]
        return None


class StatsResult(_Message):
    total_size: int = 0
    total_file_count: int = 0


class TreeNode(NamedTuple):
    """One entry of `ls --json`: a tuple, not a model, since a listing holds 100,000s."""

    path: str
    """The entry's path in the snapshot's tree, from `/`."""
    name: str
    type: str
    """`file`, `dir`, `symlink`, `dev`, `chardev`, `fifo`, `socket` (restic's words)."""
    size: int
    mtime: str
    """As restic prints it: RFC 3339 with nanoseconds, in the backing-up machine's zone."""


_new_node = tuple.__new__
"""Makes a TreeNode from a tuple without NamedTuple's keyword-parsing __new__ (per line)."""

BackupMessage = BackupStatus | BackupSummary
RestoreMessage = RestoreStatus | RestoreSummary
StderrMessage = ItemError | ExitError


def _decode(line: str) -> dict[str, Any] | None:
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def parse_backup_line(line: str) -> BackupMessage | None:
    """Returns the status or summary on a `backup --json` stdout line, None for anything else."""
    data = _decode(line)
    if data is None:
        return None
    try:
        match data.get("message_type"):
            # 0.14 sends its -v `scan_finished` record as a "status" with an "action".
            case "status" if "action" not in data:
                return BackupStatus.model_validate(data)
            case "summary":
                return BackupSummary.model_validate(data)
    except ValidationError:
        return None
    return None


def parse_restore_line(line: str) -> RestoreMessage | None:
    """Returns the status or summary on a `restore --json` stdout line, None for anything else."""
    data = _decode(line)
    if data is None:
        return None
    try:
        match data.get("message_type"):
            case "status":
                return RestoreStatus.model_validate(data)
            case "summary":
                return RestoreSummary.model_validate(data)
    except ValidationError:
        return None
    return None


def parse_stderr_line(line: str) -> StderrMessage | None:
    """Returns the item error or exit error on a stderr line, None for plain text."""
    data = _decode(line)
    if data is None:
        return None
    try:
        match data.get("message_type"):
            case "error":
                return ItemError.model_validate(data)
            case "exit_error":
                return ExitError.model_validate(data)
    except ValidationError:
        return None
    return None


def parse_ls_line(line: str) -> TreeNode | Snapshot | None:
    """Returns the node or the snapshot on an `ls --json` stdout line, None for anything else.

    Called once per line of a listing that may have millions: orjson and plain dict reads,
    a model only for the one snapshot line.
    """
    if not line.startswith("{"):
        return None
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    kind = data.get("struct_type")
    if kind == "node":
        path, name, size = data.get("path"), data.get("name"), data.get("size", 0)
        if path.__class__ is not str or name.__class__ is not str:
            return None
        node_type, mtime = data.get("type", ""), data.get("mtime", "")
        return _new_node(
            TreeNode,
            (
                path,
                name,
                node_type if node_type.__class__ is str else "",
                size if size.__class__ is int else 0,
                mtime if mtime.__class__ is str else "",
            ),
        )
    if kind == "snapshot":
        try:
            return Snapshot.model_validate(data)
        except ValidationError:
            return None
    return None


# Plain text on stderr, also with --json (every version): a backup source that is not there.
# 0.14-0.18 then exit 0 when another source exists, 0.19 exits 3 (an incomplete snapshot).
_MISSING_SOURCE = re.compile(r"^(?P<path>.+) does not exist, skipping$")


def parse_missing_source(line: str) -> str | None:
    """Returns the backup source path a `<path> does not exist, skipping` line names, or None."""
    match = _MISSING_SOURCE.match(line.strip("\r\n"))
    return match.group("path") if match is not None else None


def parse_snapshots(output: str) -> list[Snapshot]:
    """Returns the snapshots of `snapshots --json`; raises ValueError if it is not a JSON list."""
    for line in output.splitlines():
        if line.startswith("["):
            value = json.loads(line)
            if not isinstance(value, list):
                break
            return [Snapshot.model_validate(item) for item in value]
    raise ValueError("no JSON list in `snapshots --json` output")


def parse_stats(output: str) -> StatsResult:
    """Returns the sizes of `stats --json`; raises ValueError if there is no JSON object."""
    for line in output.splitlines():
        data = _decode(line)
        if data is not None:
            return StatsResult.model_validate(data)
    raise ValueError("no JSON object in `stats --json` output")
