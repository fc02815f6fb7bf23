"""The OpenAPI 3.1 document, built from the route table so the two cannot drift apart.

Every answer but `/metrics` (Prometheus text) and `openapi.json` (this document) is the
envelope `{"code", "message", "data"}` (SPEC §5); each operation documents its success
`data`, the errors it can answer with, and a `default` envelope for the rest (405, 413, 500).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from fa_restic.api.views import MAX_ID, BackupRequest, CancelRequest, RestoreRequest

if TYPE_CHECKING:
    from fa_restic.api.app import Route

ENVELOPE_REF = "#/components/schemas/Envelope"

_ID = {"type": "integer", "minimum": 1, "maximum": MAX_ID}
_TIME = {"type": ["string", "null"], "format": "date-time"}
_PROGRESS = {
    "type": "object",
    "properties": {
        "percent_done": {"type": "number", "minimum": 0, "maximum": 1},
        "bytes_done": {"type": "integer", "minimum": 0},
        "total_bytes": {"type": "integer", "minimum": 0},
        "files_done": {"type": "integer", "minimum": 0},
        "total_files": {"type": "integer", "minimum": 0},
        "seconds_remaining": {"type": ["integer", "null"]},
    },
}
_JOB_COMMON = {
    "status": {"type": "string", "enum": ["pending", "running", "success", "failed", "cancel"]},
    "stat": {
        "type": "object",
        "properties": {
            "total_size": {"type": "integer", "minimum": 0},
            "pack_size": {"type": "integer", "minimum": 0},
        },
        "required": ["total_size", "pack_size"],
    },
    "extra": {"type": "string", "description": "empty on a clean success, else one line"},
    "progress": {"$ref": "#/components/schemas/Progress"},
    "snapshot_id": {"type": ["string", "null"], "description": "restic's full 64-hex id"},
    "created_at": _TIME,
    "started_at": _TIME,
    "finished_at": _TIME,
}

SCHEMAS: dict[str, Any] = {
    "Envelope": {
        "type": "object",
        "description": "Every answer: code 2001 on success, 4001 for an unknown id, else "
        "the HTTP status; data is null on every error.",
        "properties": {
            "code": {"type": "integer"},
            "message": {"type": "string"},
            "data": {},
        },
        "required": ["code", "message", "data"],
        "additionalProperties": False,
    },
    "Progress": _PROGRESS,
    "Backup": {
        "type": "object",
        "properties": {"id": _ID, "path": {"type": "string"}, **_JOB_COMMON},
        "required": ["id", "path", "status", "stat", "extra"],
    },
    "Restore": {
        "type": "object",
        "properties": {
            "restore_id": _ID,
            "backup_id": _ID,
            "dst_path": {"type": "string"},
            **_JOB_COMMON,
        },
        "required": ["restore_id", "backup_id", "dst_path", "status", "stat", "extra"],
    },
    "Deleted": {
        "type": "object",
        "properties": {
            "id": _ID,
            "forget": {"type": "string", "enum": ["queued", "no snapshot to forget"]},
        },
        "required": ["id", "forget"],
    },
    "Cancelled": {
        "type": "object",
        "properties": {"cancelled": {"type": "array", "items": _ID}},
        "required": ["cancelled"],
    },
    "DestroyReport": {
        "type": "object",
        "properties": {
            "destroyed": {"type": "boolean"},
            "method": {"type": "string"},
            "snapshots_removed": {"type": "integer", "minimum": 0},
            "backup_records_dropped": {"type": "integer", "minimum": 0},
        },
        "required": ["destroyed", "method", "snapshots_removed", "backup_records_dropped"],
    },
    "Destroyed": {
        "type": "object",
        "properties": {"destroyed": {"type": "boolean"}},
        "required": ["destroyed"],
    },
    "Health": {
        "type": "object",
        "properties": {
            "restic_version": {"type": "string"},
            "repository": {"type": "string", "description": '"ok", or why it is not'},
            "pending": {"type": "integer", "minimum": 0},
            "running": {"type": "integer", "minimum": 0},
        },
        "required": ["restic_version", "repository", "pending", "running"],
    },
    "BackupRequest": BackupRequest.model_json_schema(),
    "RestoreRequest": RestoreRequest.model_json_schema(),
    "CancelRequest": CancelRequest.model_json_schema(),
}

_HANDLER_TO_BODY = {
    "post_backup": "BackupRequest",
    "post_restore": "RestoreRequest",
    "cancel_backup": "CancelRequest",
    "cancel_restore": "CancelRequest",
}
_HANDLER_TO_DATA: dict[str, list[str]] = {
    "post_backup": ["Backup"],
    "get_backup": ["Backup"],
    "delete_backup": ["Deleted"],
    "cancel_backup": ["Backup"],
    "cancel_all_backups": ["Cancelled"],
    "destroy_repository": ["DestroyReport"],
    "repository_destroyed": ["Destroyed"],
    "post_restore": ["Restore"],
    "get_restore": ["Restore"],
    "cancel_restore": ["Restore"],
    "cancel_all_restores": ["Cancelled"],
    "healthz": ["Health"],
}
# Routes whose 200 may also be 4001 (unknown or not-yours id, data null).
_MAY_BE_UNKNOWN = {"get_backup", "get_restore"}
# Handlers that are not the envelope on success.
_RAW = {"metrics", "openapi_document"}


def _envelope(description: str, data: list[str] | None = None) -> dict[str, Any]:
    """Returns a response whose body is the envelope; `data` names the success schemas."""
    schema: dict[str, Any] = {"$ref": ENVELOPE_REF}
    if data:
        choices: list[dict[str, Any]] = [{"$ref": f"#/components/schemas/{name}"} for name in data]
        choices.append({"type": "null"})
        schema = {"allOf": [schema, {"properties": {"data": {"anyOf": choices}}}]}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _responses(route: Route) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    if route.handler == "metrics":
        responses["200"] = {
            "description": "Prometheus text exposition",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    elif route.handler == "openapi_document":
        responses["200"] = {
            "description": "this document",
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    else:
        success = "success (code 2001)"
        if route.handler in _MAY_BE_UNKNOWN:
            success += ", or code 4001 with data null for an unknown (or not-yours) id"
        responses["200"] = _envelope(success, _HANDLER_TO_DATA.get(route.handler))
    if route.authenticated:
        responses["400"] = _envelope(
            "invalid request: bad JSON, missing or wrong-typed field, id not a positive "
            "integer, path outside the home or missing, id in use, wrong job state"
        )
        responses["401"] = _envelope("missing, malformed, expired or badly signed token")
        if route.handler == "destroy_repository":
            responses["403"] = _envelope("not an admin token")
    responses["default"] = _envelope(
        "any other error (405 wrong method, 413 body too large, 500): short text, data null"
    )
    return responses


def _operation(route: Route) -> dict[str, Any]:
    alias = route.path.endswith("/new")
    operation: dict[str, Any] = {
        "operationId": route.handler + ("_alias" if alias else ""),
        "summary": route.summary,
        "tags": [route.path.removeprefix("/fa/api/v0/").split("/")[0]],
        "responses": _responses(route),
    }
    if alias:
        operation["description"] = f"The same as {route.path.removesuffix('/new')}."
    if "{id}" in route.path:
        operation["parameters"] = [{"name": "id", "in": "path", "required": True, "schema": _ID}]
    body = _HANDLER_TO_BODY.get(route.handler)
    if body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}},
        }
    operation["security"] = [{"bearer": []}] if route.authenticated else []
    return operation


def build_document(routes: Iterable[Route]) -> dict[str, Any]:
    """Returns the OpenAPI 3.1 document of `routes`."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "fa-restic",
            "version": "0",
            "description": "Back up, restore, cancel and delete users' files with restic. "
            'Every answer but /metrics and openapi.json is {"code", "message", "data"}.',
        },
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
    }
