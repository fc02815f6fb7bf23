"""The aiohttp application: the routes of the route table (api.routes), the one middleware
(api.middleware) and the service's life cycle."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from fa_restic.api.auth import Authenticator
from fa_restic.api.errors import clip
from fa_restic.api.handlers import Handlers
from fa_restic.api.middleware import route_middleware
from fa_restic.api.openapi import build_document
from fa_restic.api.routes import ROUTES
from fa_restic.jobs.service import JobService

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
    app = web.Application(middlewares=[route_middleware(authenticator)], client_max_size=1 << 20)
    app[SERVICE_KEY] = service
    handlers = Handlers(service, authenticator, data_root, build_document(ROUTES))
    for route in ROUTES:
        app.router.add_route(route.method, route.path, functools.partial(route.handler, handlers))

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        await service.start()
        yield
        await service.stop()
        handlers.close()

    # Logger.addFilter ignores a filter it already has: one per process however many apps.
    logging.getLogger("aiohttp.server").addFilter(_BAD_HTTP_FILTER)

    app.cleanup_ctx.append(lifecycle)
    return app
