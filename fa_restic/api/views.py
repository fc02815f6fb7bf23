"""Request models (validated first) and response views (what GET shows)."""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from fa_restic.jobs.models import BackupRecord, JobRecord, Progress, RestoreRecord
from fa_restic.jobs.service import rfc3339

MAX_ID = 2**63 - 1
"""The largest job id, in a body or in a URL (a signed 64-bit integer on the platform's side)."""
JobId = Annotated[StrictInt, Field(gt=0, le=MAX_ID)]


class _Request(BaseModel):
    # The platform may send more fields than we use; they are ignored, not refused.
    model_config = ConfigDict(extra="ignore")


class BackupRequest(_Request):
    id: JobId
    path: StrictStr


class RestoreRequest(_Request):
    restore_id: JobId
    backup_id: JobId
    dst_path: StrictStr


class CancelRequest(_Request):
    id: JobId


Model = TypeVar("Model", bound=_Request)


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


def _progress(progress: Progress) -> dict[str, Any]:
    return progress.model_dump()


def _common(record: JobRecord, progress: Progress) -> dict[str, Any]:
    return {
        "status": record.status.value,
        "stat": {"total_size": record.total_size, "pack_size": record.pack_size},
        "extra": record.extra,
        "progress": _progress(progress),
        "created_at": rfc3339(record.created_at),
        "started_at": rfc3339(record.started_at),
        "finished_at": rfc3339(record.finished_at),
    }


def backup_view(record: BackupRecord, progress: Progress) -> dict[str, Any]:
    return {
        "id": record.id,
        "path": record.path,
        **_common(record, progress),
        "snapshot_id": record.snapshot_id,
    }


def restore_view(record: RestoreRecord, progress: Progress) -> dict[str, Any]:
    return {
        "restore_id": record.id,
        "backup_id": record.backup_id,
        "dst_path": record.dst_path,
        **_common(record, progress),
        "snapshot_id": record.snapshot_id,
    }
