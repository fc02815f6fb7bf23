"""The repository's state as the job layer sees it: one enum, kept in the store."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from enum import Enum

from fa_restic.jobs.ports import ResticRunner
from fa_restic.jobs.records import REPOSITORY_KEY, Records, meta_in, meta_put
from fa_restic.jobs.retry import retry_transient
from fa_restic.restic.errors import ResticError
from fa_restic.store import Collections, Put

log = logging.getLogger("fa_restic.jobs")


class RepositoryState(Enum):
    UNCHECKED = "unchecked"
    """Not looked at since the start: the first backup makes sure it exists."""
    READY = "ready"
    DESTROYING = "destroying"
    """destroy-repo is under way: no new job is accepted."""
    DESTROYED = "destroyed"
    """Removed by destroy-repo; the next backup initialises a new one."""


HEALTH_CACHE_SECONDS = 10.0
HEALTH_TIMEOUT_SECONDS = 15.0
PUBLIC_REASON_LIMIT = 200


@dataclass(frozen=True)
class Health:
    """Whether the repository answers, as of `checked_at` (time.monotonic)."""

    checked_at: float = -HEALTH_CACHE_SECONDS
    detail: str = "not checked yet"
    """What an admin and the log see: restic's own text where it failed."""
    public: str = "not checked yet"
    """What anyone sees: no backend account, host or repository path (SPEC §9)."""


class Repository:
    """Knows whether the repository exists, and initialises it when a backup needs it."""

    def __init__(self, restic: ResticRunner, records: Records, lock_wait: float) -> None:
        self.restic = restic
        self.records = records
        self.lock_wait = lock_wait
        self.state = RepositoryState.UNCHECKED
        self.serialised: Callable[[], AbstractAsyncContextManager[None]] = contextlib.nullcontext
        """Around creating the repository: a cluster's lock (its nodes start together)."""
        self._lock = asyncio.Lock()
        self._health = Health()
        self._health_lock = asyncio.Lock()

    def load(self, collections: Collections) -> None:
        """Takes the saved state: destroyed, or to be checked."""
        destroyed = bool(meta_in(collections, REPOSITORY_KEY).get("destroyed", False))
        self.state = RepositoryState.DESTROYED if destroyed else RepositoryState.UNCHECKED

    def refresh(self, collections: Collections) -> None:
        """Takes what another node of a cluster saved: a repository it destroyed is checked
        (and created) again before the next backup here."""
        destroyed = bool(meta_in(collections, REPOSITORY_KEY).get("destroyed", False))
        if destroyed and self.state is RepositoryState.READY:
            self.state = RepositoryState.UNCHECKED

    @property
    def destroyed(self) -> bool:
        return self.state is RepositoryState.DESTROYED

    def op(self) -> Put:
        """Returns the change that saves whether the repository is destroyed."""
        return meta_put(REPOSITORY_KEY, {"destroyed": self.destroyed})

    async def ensure(self) -> None:
        """Initialises the repository if it does not exist; raises ResticError."""
        async with self._lock:
            if self.state is RepositoryState.READY:
                return
            async with self.serialised():
                created = await retry_transient(
                    self.restic.ensure_initialised, self.lock_wait, "init"
                )
            was_destroyed = self.destroyed
            self.state = RepositoryState.READY
            self._health = Health(time.monotonic(), "ok", "ok")  # restic has just answered
            if created or was_destroyed:
                await self.records.write([self.op()])

    async def _ensured(self) -> None:
        async with self._lock:
            pass

    async def health(self) -> Health:
        """Returns whether the repository answers, asking restic at most every 10 s."""
        async with self._health_lock:
            if self._lock.locked():
                # The start (or a backup) is asking restic right now: its answer will do, and
                # a second restic would only slow both (healthz answers a start sooner).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._ensured(), HEALTH_TIMEOUT_SECONDS)
            if time.monotonic() - self._health.checked_at < HEALTH_CACHE_SECONDS:
                return self._health
            public = None
            if self.destroyed:
                detail = "destroyed; the next backup creates a new repository"
            else:
                try:
                    exists = await asyncio.wait_for(self.restic.exists(), HEALTH_TIMEOUT_SECONDS)
                    detail = "ok" if exists else "not initialised; the next backup creates it"
                except ResticError as error:
                    detail = error.message
                    reason = self.restic.redact(error.message)[:PUBLIC_REASON_LIMIT]
                    public = f"{error.kind.value}: {reason}"
                except TimeoutError:
                    detail = f"no answer from the repository within {HEALTH_TIMEOUT_SECONDS:.0f} s"
            if detail != self._health.detail and public is not None:
                log.warning("healthz: repository not reachable: %s", detail)
            self._health = Health(time.monotonic(), detail, public or detail)
            return self._health
