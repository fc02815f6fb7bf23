"""Errors that carry their HTTP answer, and the one middleware that turns every
failure into the envelope `{"code", "message", "data"}`."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

log = logging.getLogger("fa_restic.api")

SUCCESS_CODE = 2001
NOT_FOUND_CODE = 4001
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


def bad_request(prefix: str, reason: str) -> ApiError:
    return ApiError(400, 400, f"{prefix}: {reason}")


def unauthorized(reason: str) -> ApiError:
    return ApiError(401, 401, f"unauthorized: {reason}")


def forbidden(reason: str) -> ApiError:
    return ApiError(403, 403, f"forbidden: {reason}")


def envelope(code: int, message: str, data: Any, http_status: int = 200) -> web.Response:
    """Returns the JSON envelope every route answers with."""
    return web.json_response({"code": code, "message": message, "data": data}, status=http_status)


def success(data: Any) -> web.Response:
    return envelope(SUCCESS_CODE, "success", data)


_HTTP_TEXT = {404: "not found", 405: "method not allowed", 413: "request body too large"}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Maps ApiError, aiohttp's HTTP errors and anything unexpected onto the envelope."""
    try:
        return await handler(request)
    except ApiError as error:
        return envelope(error.code, error.message, None, error.http_status)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        text = _HTTP_TEXT.get(error.status, error.reason.lower())
        response = envelope(error.status, text, None, error.status)
        # A 405 must say which methods the resource has (RFC 9110 §15.5.6).
        if "Allow" in error.headers:
            response.headers["Allow"] = error.headers["Allow"]
        return response
    except Exception:
        log.exception("unexpected failure on %s %s", request.method, request.path)
        return envelope(500, "internal error", None, 500)
