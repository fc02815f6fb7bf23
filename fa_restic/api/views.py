"""Request models (validated first) and response views (what GET shows)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
)

from fa_restic.api.errors import RequestRefused, clip
from fa_restic.api.paths import PathRefused, check_limits
from fa_restic.jobs.models import BackupRecord, JobRecord, Progress, RestoreRecord, rfc3339
from fa_restic.names import MAX_ID, JobStatus, Overwrite

JobId = Annotated[StrictInt, Field(gt=0, le=MAX_ID)]

MAX_EXCLUDES = 100
MAX_PATTERN_BYTES = 255
MAX_INCLUDES = 1000
"""A selective restore's entries; the 1 MiB body bounds their bytes (restic's argv)."""
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100


def _check_excludes(patterns: list[str]) -> list[str]:
    """Returns restic exclude patterns as given; raises ValueError (the first bad one)."""
    if len(patterns) > MAX_EXCLUDES:
        raise ValueError(f"at most {MAX_EXCLUDES} patterns ({len(patterns)} given)")
    for pattern in patterns:
        if "\x00" in pattern or len(pattern.encode("utf-8", "replace")) > MAX_PATTERN_BYTES:
            raise ValueError(
                f"pattern {clip(pattern)!r} holds a NUL or is longer than {MAX_PATTERN_BYTES} bytes"
            )
        parts = pattern.removeprefix("!").split("/")
        if not pattern.removeprefix("!").strip("/") or ".." in parts or "." in parts:
            # `/`, `.` or `..` would reach the backed-up folder itself or above it.
            raise ValueError(f"pattern {clip(pattern)!r} names no entry below the backup")
    return patterns


def _check_include(entries: list[str]) -> list[str]:
    """Returns a selective restore's entries as given; raises ValueError (the first bad one)."""
    if len(entries) > MAX_INCLUDES:
        raise ValueError(f"at most {MAX_INCLUDES} entries ({len(entries)} given)")
    for entry in entries:
        try:
            check_limits(entry, "entry")
        except PathRefused as error:
            raise ValueError(f"{clip(entry)!r}: {error}") from None
        parts = [part for part in entry.split("/") if part not in ("", ".")]
        if "\x00" in entry or ".." in parts or not parts:
            raise ValueError(
                f"{clip(entry)!r} is not a path in the backup (relative, no '..', no NUL)"
            )
    return entries


class RequestBody(BaseModel):
    """A route's JSON body (routes.Route.body)."""

    # The platform may send more fields than we use; they are ignored, not refused.
    model_config = ConfigDict(extra="ignore")


class BackupRequest(RequestBody):
    id: JobId
    path: StrictStr
    exclude: Annotated[list[StrictStr], AfterValidator(_check_excludes)] = Field(
        default_factory=list,
        description=f"restic --exclude patterns relative to `path`; at most {MAX_EXCLUDES} "
        f"of at most {MAX_PATTERN_BYTES} bytes",
    )


class RestoreRequest(RequestBody):
    restore_id: JobId
    backup_id: JobId
    dst_path: StrictStr
    include: Annotated[list[StrictStr], AfterValidator(_check_include)] = Field(
        default_factory=list,
        description="only these entries (relative to what was backed up; a folder brings "
        "its contents); each must be in the backup. Empty: everything",
    )
    overwrite: Overwrite = Field(
        default=Overwrite.ALWAYS, description="what happens to a file already in dst_path"
    )


class ListQuery(RequestBody):
    """The query of `GET /backup` and `GET /restore` (strings, read leniently)."""

    # A parameter it does not know is a mistake worth saying (`?stauts=failed` would list all).
    model_config = ConfigDict(extra="forbid")

    status: JobStatus | None = None
    limit: Annotated[int, Field(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT
    after: Annotated[int, Field(gt=0, le=MAX_ID)] | None = Field(
        default=None, description="the `next_after` of the previous page"
    )
    user: str | None = Field(default=None, description="admin tokens only: one user's")


class FilesQuery(RequestBody):
    """The query of `GET /backup/{id}/files`."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(default="", description="a folder in the backup; empty: its top")
    limit: Annotated[int, Field(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT
    after: str | None = Field(default=None, description="the `next_after` of the previous page")


class CancelRequest(RequestBody):
    id: JobId


Model = TypeVar("Model", bound=RequestBody)

MAX_JSON_DEPTH = 100
"""Deeper bodies are refused (SPEC §9); none of ours is deeper than 1."""
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class BodyRefused(RequestRefused):
    """A body that is not JSON text this service reads; the message is the reason."""


def _check_value(value: Any) -> None:
    """Raises BodyRefused if `value` is nested deeper than MAX_JSON_DEPTH or holds a string
    (or key) that is not valid Unicode (a lone surrogate from a `\\ud800` escape)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    raise BodyRefused(
                        "body holds a string that is not text (a lone surrogate)"
                    ) from None
        elif isinstance(item, dict | list):
            if depth >= MAX_JSON_DEPTH:
                raise BodyRefused(f"body is nested deeper than {MAX_JSON_DEPTH} levels")
            inner = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((element, depth + 1) for element in inner)


def load_body(raw: bytes) -> Any:
    """Returns the JSON value of a request body (an empty body is null).

    Raises BodyRefused: not UTF-8, not JSON, nested deeper than MAX_JSON_DEPTH, or a lone
    surrogate in a string. Linear in the body's size; the walk over the value only runs for
    a body that may break a rule (brackets enough, or a surrogate escape).
    """
    try:
        text = raw.decode("utf-8")  # RFC 8259 §8.1; strict: no encoded surrogates either
    except UnicodeDecodeError:
        raise BodyRefused("body is not valid JSON") from None
    try:
        value = json.loads(text or "null")
    except RecursionError:  # the C decoder gives up near 1,000 levels
        raise BodyRefused(f"body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError:
        raise BodyRefused("body is not valid JSON") from None
    brackets = text.count("[") + text.count("{")
    if brackets > MAX_JSON_DEPTH or _SURROGATE_ESCAPE.search(text):
        _check_value(value)
    return value


def parse_body(raw: bytes, model: type[Model]) -> Model:
    """Returns the body as `model`; raises BodyRefused (load_body's reasons, or the first
    field that does not fit, as `field: reason`)."""
    data = load_body(raw)
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise BodyRefused(describe_validation(error)) from None


def describe_validation(error: ValidationError) -> str:
    """Returns the first problem as `field: reason`."""
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "body"
    if first["type"] == "missing":
        return f"{field}: required"
    if first["type"] == "model_type":
        return "body must be a JSON object"
    if first["type"] == "value_error":
        return f"{field}: {first['ctx']['error']}"
    if field == "limit" or first["type"] == "enum":
        return f"{field}: {first['msg'].lower()}"
    if field.endswith("id") or first["type"].startswith(("int", "greater", "less")):
        return f"{field}: must be a positive integer"
    return f"{field}: {first['msg'].lower()}"


def parse_query(query: dict[str, str], model: type[Model]) -> Model:
    """Returns a URL's query as `model`; raises BodyRefused (`field: reason`)."""
    for value in query.values():
        _check_value(value)
    try:
        return model.model_validate(query)
    except ValidationError as error:
        first = error.errors()[0]
        if first["type"] == "extra_forbidden":
            name = str(first["loc"][0]) if first["loc"] else ""
            raise BodyRefused(f"unknown query parameter {name[:50]!r}") from None
        raise BodyRefused(describe_validation(error)) from None


def parse_id(text: str) -> int | None:
    """Returns a URL's id if it is a positive integer in plain decimal, else None.

    The same range as a body's id (1..MAX_ID): an id that can be posted can be fetched.
    """
    if not text.isascii() or not text.isdigit() or len(text) > len(str(MAX_ID)):
        return None
    value = int(text)
    return value if 0 < value <= MAX_ID else None


def _common(record: JobRecord, progress: Progress, show: Callable[[str], str]) -> dict[str, Any]:
    return {
        "status": record.status.value,
        "stat": {"total_size": record.total_size, "pack_size": record.pack_size},
        "extra": show(record.extra),
        "progress": progress.model_dump(),
        "created_at": rfc3339(record.created_at),
        "started_at": rfc3339(record.started_at),
        "finished_at": rfc3339(record.finished_at),
    }


def backup_view(
    record: BackupRecord, progress: Progress, show: Callable[[str], str]
) -> dict[str, Any]:
    """Returns what GET shows of a backup; `show` is applied to `extra` (redaction)."""
    return {
        "id": record.id,
        "path": record.path,
        "exclude": record.exclude,
        **_common(record, progress, show),
        "snapshot_id": record.snapshot_id,
    }


def restore_view(
    record: RestoreRecord, progress: Progress, show: Callable[[str], str]
) -> dict[str, Any]:
    """Returns what GET shows of a restore; `show` is applied to `extra` (redaction)."""
    return {
        "restore_id": record.id,
        "backup_id": record.backup_id,
        "dst_path": record.dst_path,
        "include": record.include,
        "overwrite": record.overwrite.value,
        **_common(record, progress, show),
        "snapshot_id": record.snapshot_id,
    }
