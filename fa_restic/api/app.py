"""The aiohttp application: the route table, the middleware and the service's life cycle."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from fa_restic.api.auth import Authenticator
from fa_restic.api.errors import error_middleware
from fa_restic.api.handlers import Handlers
from fa_restic.api.openapi import build_document
from fa_restic.jobs.service import JobService

API = "/fa/api/v0"


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: str
    summary: str
    authenticated: bool = True


# Order matters: fixed paths before `{id}`, so `repo-destroyed` is not read as an id.
ROUTES: tuple[Route, ...] = (
    Route("POST", f"{API}/backup", "post_backup", "Start a backup of a file or folder"),
    Route("POST", f"{API}/backup/new", "post_backup", "Start a backup (alias)"),
    Route("POST", f"{API}/backup/cancel", "cancel_backup", "Cancel one backup"),
    Route("POST", f"{API}/backup/cancel-all", "cancel_all_backups", "Cancel all your backups"),
    Route(
        "POST", f"{API}/backup/destroy-repo", "destroy_repository", "Destroy the repository (admin)"
    ),
    Route(
        "GET",
        f"{API}/backup/repo-destroyed",
        "repository_destroyed",
        "Was the repository destroyed?",
    ),
    Route("GET", f"{API}/backup/{{id}}", "get_backup", "A backup's status, sizes and progress"),
    Route("DELETE", f"{API}/backup/{{id}}", "delete_backup", "Delete a finished backup"),
    Route("POST", f"{API}/restore", "post_restore", "Start a restore of a backup"),
    Route("POST", f"{API}/restore/new", "post_restore", "Start a restore (alias)"),
    Route("POST", f"{API}/restore/cancel", "cancel_restore", "Cancel one restore"),
    Route("POST", f"{API}/restore/cancel-all", "cancel_all_restores", "Cancel all your restores"),
    Route("GET", f"{API}/restore/{{id}}", "get_restore", "A restore's status, sizes and progress"),
    Route("GET", f"{API}/healthz", "healthz", "Service and repository health", False),
    Route("GET", f"{API}/openapi.json", "openapi_document", "This API's OpenAPI document", False),
    Route("GET", "/metrics", "metrics", "Prometheus metrics", False),
)

SERVICE_KEY = web.AppKey("service", JobService)


def make_app(service: JobService, authenticator: Authenticator, data_root: Path) -> web.Application:
    """Returns the application; the service starts with the app and stops with it."""
    app = web.Application(middlewares=[error_middleware], client_max_size=1 << 20)
    app[SERVICE_KEY] = service
    handlers = Handlers(service, authenticator, data_root, build_document(ROUTES))
    for route in ROUTES:
        app.router.add_route(route.method, route.path, getattr(handlers, route.handler))

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        await service.start()
        yield
        await service.stop()

    app.cleanup_ctx.append(lifecycle)
    return app
