"""Request models (validated first) and response views (what GET shows)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from fa_restic.api.errors import RequestRefused
from fa_restic.jobs.models import BackupRecord, JobRecord, Progress, RestoreRecord, rfc3339
from fa_restic.names import MAX_ID

JobId = Annotated[StrictInt, Field(gt=0, le=MAX_ID)]


class RequestBody(BaseModel):
    """A route's JSON body (routes.Route.body)."""

    # The platform may send more fields than we use; they are ignored, not refused.
    model_config = ConfigDict(extra="ignore")


class BackupRequest(RequestBody):
    id: JobId
    path: StrictStr


class RestoreRequest(RequestBody):
    restore_id: JobId
    backup_id: JobId
    dst_path: StrictStr


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
    if field.endswith("id") or first["type"].startswith(("int", "greater", "less")):
        return f"{field}: must be a positive integer"
    return f"{field}: {first['msg'].lower()}"


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
        **_common(record, progress, show),
        "snapshot_id": record.snapshot_id,
    }
