"""The route table: one typed row per route (STYLE "One row per route").

The router (api.app), the OpenAPI document (api.openapi) and the route middleware
(api.middleware) read these rows and nothing else: a new route is one row here and its
handler method in api.handlers; a new shape of answer also needs its schema in
api.openapi.SCHEMAS, and tests/unit/test_docs.py asks for the route in README.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum

from aiohttp import web

from fa_restic.api.handlers import Handlers
from fa_restic.api.views import (
    BackupRequest,
    CancelRequest,
    FilesQuery,
    ListQuery,
    RequestBody,
    RestoreRequest,
)
from fa_restic.names import API_PREFIX

Handler = Callable[[Handlers, web.Request], Awaitable[web.StreamResponse]]
"""A method of Handlers, unbound: the router binds it to the app's Handlers."""


class Auth(Enum):
    """Who may call a route (SPEC §4)."""

    NONE = "none"
    """No token needed (healthz, openapi.json, /metrics)."""
    USER = "user"
    """Any valid token; else 401."""
    ADMIN = "admin"
    """An admin token; else 401, or 403 for a valid token that is not an admin's."""


@dataclass(frozen=True)
class RawAnswer:
    """A success that is not the envelope (its errors still are)."""

    content_type: str
    description: str
    schema_type: str
    """The JSON Schema type of the body."""


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    prefix: str | None = None
    """What a refused request's message starts with (SPEC §5): `<prefix>: <reason>`."""
    auth: Auth = Auth.USER
    body: type[RequestBody] | None = None
    """The JSON body the middleware parses before the handler runs; None: the body is ignored."""
    query: type[RequestBody] | None = None
    """The URL query the middleware parses before the handler runs; None: it is ignored."""
    data: str | None = None
    """The schema (api.openapi.SCHEMAS) of the envelope's `data` on success."""
    unknown_id_answers_4001: bool = False
    """An unknown (or another user's) id answers 200 with code 4001 rather than a 400."""
    raw: RawAnswer | None = None
    alias_of: str | None = None
    """The path this route is another name of."""

    @property
    def takes_id(self) -> bool:
        """True if the path holds `{id}`, which the middleware parses (a positive integer)."""
        return "{id}" in self.path

    @property
    def name(self) -> str:
        """The handler's name: the OpenAPI operationId, with `_alias` for an alias."""
        return self.handler.__name__ + ("_alias" if self.alias_of else "")

    def message(self, reason: str) -> str:
        """Returns a refusal's message: `<prefix>: <reason>`."""
        return f"{self.prefix}: {reason}" if self.prefix else reason


def alias(route: Route, path: str) -> Route:
    """Returns a row answering at `path` exactly as `route` does."""
    summary = f"{route.summary} (alias)"
    return dataclasses.replace(route, path=path, summary=summary, alias_of=route.path)


BACKUP = "err when backup file"
RESTORE = "err when restore file"
LOAD_BACKUP = "err when load backup"
LOAD_RESTORE = "err when load restore"
CANCEL_BACKUP = "err when cancel backup"
CANCEL_ALL_BACKUP = "err when cancel all backup"
CANCEL_RESTORE = "err when cancel restore"
CANCEL_ALL_RESTORE = "err when cancel all restore"
DESTROY = "err when destroy repo"
DELETE = "err when delete a backup"

_POST_BACKUP = Route(
    "POST",
    f"{API_PREFIX}/backup",
    Handlers.post_backup,
    "Start a backup of a file or folder",
    BACKUP,
    body=BackupRequest,
    data="Backup",
)
_POST_RESTORE = Route(
    "POST",
    f"{API_PREFIX}/restore",
    Handlers.post_restore,
    "Start a restore of a backup",
    RESTORE,
    body=RestoreRequest,
    data="Restore",
)

# Order matters: fixed paths before `{id}`, so `repo-destroyed` is not read as an id.
ROUTES: tuple[Route, ...] = (
    _POST_BACKUP,
    Route(
        "GET",
        f"{API_PREFIX}/backup",
        Handlers.list_backups,
        "Your backups, newest id first, a page at a time",
        LOAD_BACKUP,
        query=ListQuery,
        data="BackupPage",
    ),
    alias(_POST_BACKUP, f"{API_PREFIX}/backup/new"),
    Route(
        "POST",
        f"{API_PREFIX}/backup/cancel",
        Handlers.cancel_backup,
        "Cancel one backup",
        CANCEL_BACKUP,
        body=CancelRequest,
        data="Backup",
    ),
    Route(
        "POST",
        f"{API_PREFIX}/backup/cancel-all",
        Handlers.cancel_all_backups,
        "Cancel all your backups",
        CANCEL_ALL_BACKUP,
        data="Cancelled",
    ),
    Route(
        "POST",
        f"{API_PREFIX}/backup/destroy-repo",
        Handlers.destroy_repository,
        "Destroy the repository (admin)",
        DESTROY,
        Auth.ADMIN,
        data="DestroyReport",
    ),
    Route(
        "GET",
        f"{API_PREFIX}/backup/repo-destroyed",
        Handlers.repository_destroyed,
        "Was the repository destroyed?",
        data="Destroyed",
    ),
    Route(
        "GET",
        f"{API_PREFIX}/backup/{{id}}/files",
        Handlers.list_files,
        "One folder of a successful backup, a page at a time",
        LOAD_BACKUP,
        query=FilesQuery,
        data="Files",
        unknown_id_answers_4001=True,
    ),
    Route(
        "GET",
        f"{API_PREFIX}/backup/{{id}}",
        Handlers.get_backup,
        "A backup's status, sizes and progress",
        LOAD_BACKUP,
        data="Backup",
        unknown_id_answers_4001=True,
    ),
    Route(
        "DELETE",
        f"{API_PREFIX}/backup/{{id}}",
        Handlers.delete_backup,
        "Delete a finished backup",
        DELETE,
        data="Deleted",
    ),
    _POST_RESTORE,
    Route(
        "GET",
        f"{API_PREFIX}/restore",
        Handlers.list_restores,
        "Your restores, newest id first, a page at a time",
        LOAD_RESTORE,
        query=ListQuery,
        data="RestorePage",
    ),
    alias(_POST_RESTORE, f"{API_PREFIX}/restore/new"),
    Route(
        "POST",
        f"{API_PREFIX}/restore/cancel",
        Handlers.cancel_restore,
        "Cancel one restore",
        CANCEL_RESTORE,
        body=CancelRequest,
        data="Restore",
    ),
    Route(
        "POST",
        f"{API_PREFIX}/restore/cancel-all",
        Handlers.cancel_all_restores,
        "Cancel all your restores",
        CANCEL_ALL_RESTORE,
        data="Cancelled",
    ),
    Route(
        "GET",
        f"{API_PREFIX}/restore/{{id}}",
        Handlers.get_restore,
        "A restore's status, sizes and progress",
        LOAD_RESTORE,
        data="Restore",
        unknown_id_answers_4001=True,
    ),
    Route(
        "GET",
        f"{API_PREFIX}/healthz",
        Handlers.healthz,
        "Service and repository health",
        auth=Auth.NONE,
        data="Health",
    ),
    Route(
        "GET",
        f"{API_PREFIX}/openapi.json",
        Handlers.openapi_document,
        "This API's OpenAPI document",
        auth=Auth.NONE,
        raw=RawAnswer("application/json", "this document", "object"),
    ),
    Route(
        "GET",
        "/metrics",
        Handlers.metrics,
        "Prometheus metrics",
        auth=Auth.NONE,
        raw=RawAnswer("text/plain", "Prometheus text exposition", "string"),
    ),
)

METHOD_AND_PATH_TO_ROUTE: dict[tuple[str, str], Route] = {
    (route.method, route.path): route for route in ROUTES
}
