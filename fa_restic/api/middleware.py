"""The one middleware every request goes through: it finds the route's row (api.routes),
checks the token, parses the URL's id and the body as the row says, runs the handler, and
turns whatever it raises into the envelope `{"code", "message", "data"}` (SPEC §5)."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from fa_restic.api.auth import Authenticator
from fa_restic.api.context import BODY_KEY, CALLER_KEY, JOB_ID_KEY, QUERY_KEY
from fa_restic.api.errors import ApiError, RequestRefused, envelope, forbidden
from fa_restic.api.paths import PathRefused
from fa_restic.api.routes import METHOD_AND_PATH_TO_ROUTE, Auth, Route
from fa_restic.api.views import parse_body, parse_id, parse_query
from fa_restic.jobs.errors import Busy, JobError, UnknownJob
from fa_restic.names import NOT_FOUND_CODE
from fa_restic.restic.errors import ResticError
from fa_restic.store.errors import StoreUnavailable

log = logging.getLogger("fa_restic.api")

_HTTP_TEXT = {404: "not found", 405: "method not allowed", 413: "request body too large"}
_REFUSED = (RequestRefused, PathRefused, JobError)
"""What a handler raises for a request it refuses: a 400 `<prefix>: <reason>`."""


def route_of(request: web.Request) -> Route | None:
    """Returns the row of the route aiohttp matched; None for no route (404, 405)."""
    matched = request.match_info.route
    resource = matched.resource
    if resource is None:
        return None
    return METHOD_AND_PATH_TO_ROUTE.get((matched.method, resource.canonical))


async def _prepare(request: web.Request, route: Route, authenticator: Authenticator) -> None:
    """Puts the caller, the URL's id and the body where the handler finds them (api.context).

    Raises ApiError (401, 403), RequestRefused, or aiohttp's 413 for a body over the limit.
    """
    if route.auth is not Auth.NONE:
        caller = authenticator.authenticate(request.headers.get("Authorization"))
        if route.auth is Auth.ADMIN and not caller.admin:
            raise forbidden(f"{route.path.rsplit('/', 1)[-1]} needs an admin token")
        request[CALLER_KEY] = caller
    if route.takes_id:
        job_id = parse_id(request.match_info["id"])
        if job_id is None:
            raise RequestRefused("id must be a positive integer")
        request[JOB_ID_KEY] = job_id
    if route.query is not None:
        request[QUERY_KEY] = parse_query(dict(request.query), route.query)
    if route.body is not None:
        request[BODY_KEY] = parse_body(await request.read(), route.body)


def _known_failure(request: web.Request, route: Route, error: Exception) -> ApiError | None:
    """Returns the answer to a failure the route's row knows how to tell; None for others."""
    if isinstance(error, UnknownJob) and route.unknown_id_answers_4001:
        message = f"{route.prefix} [ {request[JOB_ID_KEY]} ]: no such record"
        return ApiError(200, NOT_FOUND_CODE, message)
    if isinstance(error, _REFUSED):
        return ApiError(400, 400, route.message(str(error)))
    if isinstance(error, StoreUnavailable):  # the records' database is down: try again
        return ApiError(503, 503, route.message(f"records unavailable: {error}"))
    if isinstance(error, Busy):
        return ApiError(503, 503, route.message(str(error)))
    # The repository's own failure is told in full to admins only (it may name the
    # repository); on a user's route it is an unexpected failure, in the log.
    if route.auth is Auth.ADMIN and isinstance(error, ResticError):
        return ApiError(500, 500, route.message(error.message))
    if route.auth is Auth.ADMIN and isinstance(error, OSError):
        return ApiError(500, 500, route.message(error.strerror or str(error)))
    return None


def _http_error(error: web.HTTPException) -> web.Response:
    """Returns aiohttp's own error (404, 405, 413, ...) as the envelope."""
    text = _HTTP_TEXT.get(error.status, error.reason.lower())
    response = envelope(error.status, text, None, error.status)
    # A 405 must say which methods the resource has (RFC 9110 §15.5.6).
    if "Allow" in error.headers:
        response.headers["Allow"] = error.headers["Allow"]
    return response


def route_middleware(authenticator: Authenticator) -> Middleware:
    """Returns the middleware; `authenticator` checks the tokens of the rows that need one."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = route_of(request)
        try:
            if route is not None:
                await _prepare(request, route, authenticator)
            return await handler(request)
        except web.HTTPException as error:
            if error.status < 400:
                raise
            return _http_error(error)
        except Exception as error:
            answer = error if isinstance(error, ApiError) else None
            if answer is None and route is not None:
                answer = _known_failure(request, route, error)
            if answer is None:
                log.exception("unexpected failure on %s %s", request.method, request.path)
                return envelope(500, "internal error", None, 500)
            return envelope(answer.code, answer.message, None, answer.http_status)

    return middleware
