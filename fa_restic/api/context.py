"""What the route middleware learnt of a request before its handler runs: the caller, the
id in the URL and the parsed body, each as its route's row (api.routes) asks."""

from __future__ import annotations

from typing import TypeVar

from aiohttp import web

from fa_restic.api.views import RequestBody
from fa_restic.jobs.service import Caller

CALLER_KEY = web.RequestKey("caller", Caller)
JOB_ID_KEY = web.RequestKey("job_id", int)
BODY_KEY = web.RequestKey("body", RequestBody)
QUERY_KEY = web.RequestKey("query", RequestBody)

Body = TypeVar("Body", bound=RequestBody)


def caller_of(request: web.Request) -> Caller:
    """Returns who is calling; only on a route that needs a token."""
    return request[CALLER_KEY]


def job_id_of(request: web.Request) -> int:
    """Returns the id in the URL (`{id}`), a positive integer."""
    return request[JOB_ID_KEY]


def body_of(request: web.Request, model: type[Body]) -> Body:
    """Returns the body, parsed as the route's row says; `model` is that same model."""
    body = request[BODY_KEY]
    assert isinstance(body, model), f"the route's body is {type(body).__name__}"
    return body


def query_of(request: web.Request, model: type[Body]) -> Body:
    """Returns the URL's query, parsed as the route's row says; `model` is that same model."""
    query = request[QUERY_KEY]
    assert isinstance(query, model), f"the route's query is {type(query).__name__}"
    return query
