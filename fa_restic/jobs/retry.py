"""Transient restic failures (a held lock, an unreachable backend) are tried again with backoff."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
)

from fa_restic.restic.errors import ResticError

log = logging.getLogger("fa_restic.jobs")

T = TypeVar("T")


def _is_transient(error: BaseException) -> bool:
    return isinstance(error, ResticError) and error.kind.is_transient


async def retry_transient(
    operation: Callable[[], Awaitable[T]], max_wait_seconds: float, what: str
) -> T:
    """Returns `operation()`, tried again with backoff while it fails transiently.

    After `max_wait_seconds` the last ResticError is raised.
    """

    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.warning(
            "%s: %s; trying again in %.0fs",
            what,
            error,
            state.next_action.sleep if state.next_action else 0,
        )

    retrying = AsyncRetrying(
        retry=retry_if_exception(_is_transient),
        wait=wait_exponential(multiplier=1, min=1, max=30),
        stop=stop_after_delay(max_wait_seconds),
        before_sleep=before_sleep,
        reraise=True,
    )

    async def attempt() -> T:  # tenacity awaits only what `async def` functions return
        return await operation()

    return await retrying(attempt)
