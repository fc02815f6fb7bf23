"""Answers other than success, and the envelope `{"code", "message", "data"}` every route
answers with. The route middleware (api.middleware) turns failures into these."""

from __future__ import annotations

import json
from typing import Any

import orjson
from aiohttp import web

from fa_restic.names import SUCCESS_CODE

ECHO_LIMIT = 200
"""The most characters of user input an answer repeats (SPEC §9)."""
MESSAGE_LIMIT = 600
"""A message is cut here whatever it holds: a prefix, a reason and at most ECHO_LIMIT echoed."""


def clip(text: str, limit: int = ECHO_LIMIT) -> str:
    """Returns `text` cut to at most `limit` characters, the last one `…` if it was cut.

    Every piece of user input that goes into a message goes through here.
    """
    return text if len(text) <= limit else text[: limit - 1] + "…"


class ApiError(Exception):
    """An answer other than success: HTTP status, envelope code and message."""

    def __init__(self, http_status: int, code: int, message: str) -> None:
        message = clip(message, MESSAGE_LIMIT)
        super().__init__(message)
        self.http_status = http_status
        self.code = code
        self.message = message


class RequestRefused(ValueError):
    """A request that is not what its route takes (its body, the id in its URL); the message
    is the reason, which the middleware puts after the route's prefix (a 400)."""


def unauthorized(reason: str) -> ApiError:
    return ApiError(401, 401, f"unauthorized: {reason}")


def forbidden(reason: str) -> ApiError:
    return ApiError(403, 403, f"forbidden: {reason}")


_ORJSON_AS_JSON = (
    orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)
"""orjson leaves to the standard library what it would take and `json.dumps` would not
(a datetime, a dataclass: a TypeError) or would write otherwise (a subclass of str)."""


def json_bytes(value: Any) -> bytes:
    """Returns `value` as JSON text: orjson's (some 10x faster), or the standard library's
    for what orjson does not take (a lone surrogate from a file name, a key that is not a
    string, an integer beyond 64 bits, _ORJSON_AS_JSON). The same JSON value either way."""
    try:
        return orjson.dumps(value, option=_ORJSON_AS_JSON)
    except TypeError:  # orjson.JSONEncodeError
        return json.dumps(value).encode()


def envelope(code: int, message: str, data: Any, http_status: int = 200) -> web.Response:
    """Returns the JSON envelope every route answers with."""
    return web.json_response({"code": code, "message": message, "data": data}, status=http_status)


def success(data: Any) -> web.Response:
    """Returns the envelope of a success, encoded by orjson: a GET of a record is mostly
    this. Its JSON text has no spaces; a failure's (envelope) keeps the standard library's
    `{"code": 4001, "message": ...}`, byte for byte (tests/integration/test_api_errors)."""
    body = json_bytes({"code": SUCCESS_CODE, "message": "success", "data": data})
    # The Content-Type aiohttp's json_response gives (its text is UTF-8).
    return web.Response(body=body, content_type="application/json", charset="utf-8")
