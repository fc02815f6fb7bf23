"""The OpenAPI 3 document, built from the route table so the two cannot drift apart."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from fa_restic.api.views import BackupRequest, CancelRequest, RestoreRequest

if TYPE_CHECKING:
    from fa_restic.api.app import Route

_PROGRESS = {
    "type": "object",
    "properties": {
        "percent_done": {"type": "number"},
        "bytes_done": {"type": "integer"},
        "total_bytes": {"type": "integer"},
        "files_done": {"type": "integer"},
        "total_files": {"type": "integer"},
        "seconds_remaining": {"type": ["integer", "null"]},
    },
}
_JOB_COMMON = {
    "status": {"type": "string", "enum": ["pending", "running", "success", "failed", "cancel"]},
    "stat": {
        "type": "object",
        "properties": {"total_size": {"type": "integer"}, "pack_size": {"type": "integer"}},
        "required": ["total_size", "pack_size"],
    },
    "extra": {"type": "string"},
    "progress": {"$ref": "#/components/schemas/Progress"},
    "snapshot_id": {"type": ["string", "null"]},
    "created_at": {"type": ["string", "null"], "format": "date-time"},
    "started_at": {"type": ["string", "null"], "format": "date-time"},
    "finished_at": {"type": ["string", "null"], "format": "date-time"},
}

SCHEMAS: dict[str, Any] = {
    "Envelope": {
        "type": "object",
        "properties": {
            "code": {"type": "integer"},
            "message": {"type": "string"},
            "data": {},
        },
        "required": ["code", "message", "data"],
    },
    "Progress": _PROGRESS,
    "Backup": {
        "type": "object",
        "properties": {"id": {"type": "integer"}, "path": {"type": "string"}, **_JOB_COMMON},
        "required": ["id", "path", "status", "stat", "extra"],
    },
    "Restore": {
        "type": "object",
        "properties": {
            "restore_id": {"type": "integer"},
            "backup_id": {"type": "integer"},
            "dst_path": {"type": "string"},
            **_JOB_COMMON,
        },
        "required": ["restore_id", "backup_id", "dst_path", "status", "stat", "extra"],
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
_HANDLER_TO_DATA = {
    "post_backup": "Backup",
    "get_backup": "Backup",
    "cancel_backup": "Backup",
    "post_restore": "Restore",
    "get_restore": "Restore",
    "cancel_restore": "Restore",
}


def _envelope(description: str, data: str | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"$ref": "#/components/schemas/Envelope"}
    if data is not None:
        schema = {
            "allOf": [
                schema,
                {
                    "properties": {
                        "data": {
                            "anyOf": [{"$ref": f"#/components/schemas/{data}"}, {"type": "null"}]
                        }
                    }
                },
            ]
        }
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _operation(route: Route) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": route.handler + ("_alias" if route.path.endswith("/new") else ""),
        "summary": route.summary,
        "responses": {
            "200": _envelope(
                "success (2001), or 4001 for an unknown id", _HANDLER_TO_DATA.get(route.handler)
            )
        },
    }
    if route.path == "/metrics":
        operation["responses"] = {
            "200": {
                "description": "Prometheus text",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        }
    elif route.handler == "openapi_document":
        operation["responses"] = {
            "200": {
                "description": "this document",
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
        }
    if "{id}" in route.path:
        operation["parameters"] = [
            {
                "name": "id",
                "in": "path",
                "required": True,
                "schema": {"type": "integer", "minimum": 1},
            }
        ]
    body = _HANDLER_TO_BODY.get(route.handler)
    if body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}},
        }
    if route.authenticated:
        operation["security"] = [{"bearer": []}]
        operation["responses"]["400"] = _envelope("invalid request")
        operation["responses"]["401"] = _envelope("missing or bad token")
        if route.handler == "destroy_repository":
            operation["responses"]["403"] = _envelope("not an admin token")
    return operation


def build_document(routes: Iterable[Route]) -> dict[str, Any]:
    """Returns the OpenAPI 3.1 document of `routes`."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {"title": "fa-restic", "version": "0", "description": "Backup API over restic"},
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
    }
