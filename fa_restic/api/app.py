"""The aiohttp application: the route table, the middleware and the service's life cycle."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from fa_restic.api.auth import Authenticator
from fa_restic.api.errors import clip, error_middleware
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


class _BadHttpFilter(logging.Filter):
    """Turns aiohttp's log of a request it could not parse (a control character in a
    header, a broken request line) into one warning line without a traceback: a client's
    garbage is not the service's failure. aiohttp answers those itself, 400, before any
    route or middleware sees them.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            reason = " ".join(str(error.message).split())
            record.msg = "bad HTTP request from %s: %s"
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.args = (remote, clip(reason))
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


_BAD_HTTP_FILTER = _BadHttpFilter()


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
        handlers.close()

    # Logger.addFilter ignores a filter it already has: one per process however many apps.
    logging.getLogger("aiohttp.server").addFilter(_BAD_HTTP_FILTER)

    app.cleanup_ctx.append(lifecycle)
    return app
