"""The OpenAPI 3.1 document, built from the route table so the two cannot drift apart.

Every answer but `/metrics` (Prometheus text) and `openapi.json` (this document) is the
envelope `{"code", "message", "data"}` (SPEC §5); each operation documents its success
`data`, the errors it can answer with, and a `default` envelope for the rest (405, 413, 500,
503).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel

from fa_restic.api.routes import ROUTES, Auth, Route
from fa_restic.names import API_PREFIX, MAX_ID, JobStatus, Overwrite

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
    "status": {"type": "string", "enum": [status.value for status in JobStatus]},
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
        "properties": {
            "id": _ID,
            "path": {"type": "string"},
            "exclude": {"type": "array", "items": {"type": "string"}},
            **_JOB_COMMON,
        },
        "required": ["id", "path", "status", "stat", "extra"],
    },
    "BackupPage": {
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/components/schemas/Backup"}},
            "next_after": {**_ID, "type": ["integer", "null"]},
        },
        "required": ["items", "next_after"],
    },
    "RestorePage": {
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/components/schemas/Restore"}},
            "next_after": {**_ID, "type": ["integer", "null"]},
        },
        "required": ["items", "next_after"],
    },
    "Files": {
        "type": "object",
        "properties": {
            "path": {"type": "string", "description": "relative to what was backed up"},
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "type": {
                            "type": "string",
                            "description": "file, dir, symlink, dev, chardev, fifo, socket",
                        },
                        "size": {"type": "integer", "minimum": 0},
                        "mtime": {"type": "string", "format": "date-time"},
                    },
                    "required": ["name", "type", "size", "mtime"],
                },
            },
            "next_after": {"type": ["string", "null"]},
        },
        "required": ["path", "items", "next_after"],
    },
    "Restore": {
        "type": "object",
        "properties": {
            "restore_id": _ID,
            "backup_id": _ID,
            "dst_path": {"type": "string"},
            "include": {"type": "array", "items": {"type": "string"}},
            "overwrite": {"type": "string", "enum": [policy.value for policy in Overwrite]},
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
            "pending": {
                "type": "integer",
                "minimum": 0,
                "description": "jobs waiting for a slot (with [cluster]: on any node)",
            },
            "running": {
                "type": "integer",
                "minimum": 0,
                "description": "jobs running (with [cluster]: on this node)",
            },
            "nodes_alive": {
                "type": "integer",
                "minimum": 0,
                "description": "nodes whose lease is current; only with [cluster]",
            },
            "node": {
                "type": "string",
                "description": "this node's name; only with [cluster] (records in PostgreSQL)",
            },
            "database": {
                "type": "string",
                "description": '"ok", or why the database is not usable; only with [cluster]',
            },
        },
        "required": ["restic_version", "repository", "pending", "running"],
    },
}

_REF_TEMPLATE = "#/components/schemas/{model}"


def _model_schema(model: type[BaseModel]) -> dict[str, Any]:
    """Returns a model's JSON Schema; the schemas it refers to (enums) go to SCHEMAS."""
    schema = model.model_json_schema(ref_template=_REF_TEMPLATE)
    SCHEMAS.update(schema.pop("$defs", {}))
    return schema


# The request bodies, as the route table names them.
SCHEMAS.update({route.body.__name__: _model_schema(route.body) for route in ROUTES if route.body})


def _envelope(description: str, data: str | None = None) -> dict[str, Any]:
    """Returns a response whose body is the envelope; `data` names the success schema."""
    schema: dict[str, Any] = {"$ref": ENVELOPE_REF}
    if data:
        choices = [{"$ref": f"#/components/schemas/{data}"}, {"type": "null"}]
        schema = {"allOf": [schema, {"properties": {"data": {"anyOf": choices}}}]}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _responses(route: Route) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    if route.raw is not None:
        responses["200"] = {
            "description": route.raw.description,
            "content": {route.raw.content_type: {"schema": {"type": route.raw.schema_type}}},
        }
    else:
        success = "success (code 2001)"
        if route.unknown_id_answers_4001:
            success += ", or code 4001 with data null for an unknown (or not-yours) id"
        responses["200"] = _envelope(success, route.data)
    if route.auth is not Auth.NONE:
        responses["400"] = _envelope(
            "invalid request: bad JSON, missing or wrong-typed field, id not a positive "
            "integer, path outside the home or missing, id in use, wrong job state"
        )
        responses["401"] = _envelope("missing, malformed, expired or badly signed token")
        if route.auth is Auth.ADMIN:
            responses["403"] = _envelope("not an admin token")
    responses["default"] = _envelope(
        "any other error (405 wrong method, 413 body too large, 500, 503 records' database "
        "unavailable in cluster mode): short text, data null"
    )
    return responses


def _operation(route: Route) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": route.name,
        "summary": route.summary,
        "tags": [route.path.removeprefix(f"{API_PREFIX}/").split("/")[0]],
        "responses": _responses(route),
    }
    if route.alias_of:
        operation["description"] = f"The same as {route.alias_of}."
    parameters: list[dict[str, Any]] = []
    if route.takes_id:
        parameters.append({"name": "id", "in": "path", "required": True, "schema": _ID})
    if route.query is not None:
        for name, field in _model_schema(route.query)["properties"].items():
            field.pop("title", None)
            parameters.append({"name": name, "in": "query", "required": False, "schema": field})
    if parameters:
        operation["parameters"] = parameters
    if route.body is not None:
        schema = {"$ref": f"#/components/schemas/{route.body.__name__}"}
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": schema}},
        }
    operation["security"] = [] if route.auth is Auth.NONE else [{"bearer": []}]
    return operation


def build_document(routes: Iterable[Route] = ROUTES) -> dict[str, Any]:
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
