"""Thin route handlers: take what the middleware parsed, call the job layer, answer a view.

A handler raises what goes wrong (JobError, PathRefused, ...); the route middleware
(api.middleware) answers it with the envelope and the route's prefix (api.routes).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from fa_restic.api.auth import Authenticator
from fa_restic.api.context import body_of, caller_of, job_id_of, query_of
from fa_restic.api.errors import ApiError, forbidden, success
from fa_restic.api.paths import PathResolver
from fa_restic.api.views import (
    BackupRequest,
    CancelRequest,
    FilesQuery,
    ListQuery,
    RestoreRequest,
    backup_view,
    restore_view,
)
from fa_restic.jobs.models import BackupRecord, JobRecord, RestoreRecord
from fa_restic.jobs.service import Caller, JobService
from fa_restic.metrics import CONTENT_TYPE
from fa_restic.names import JobKind

REDACTED_CACHE_SIZE = 1024
"""Texts whose redaction is remembered: a user's failed jobs often repeat one message."""
REDACTED_CACHE_TEXT = 4096
"""Longer texts are redacted every time, not remembered."""


def _as_is(text: str) -> str:
    return text


class Handlers:
    """The routes of SPEC §5; api.routes says which route each one answers."""

    def __init__(
        self,
        service: JobService,
        authenticator: Authenticator,
        data_root: Path,
        openapi: dict[str, Any],
    ) -> None:
        self.service = service
        self.authenticator = authenticator
        self.openapi = openapi
        self.paths = PathResolver(data_root)
        self._redacted: dict[str, str] = {}

    def close(self) -> None:
        """Stops the path resolver's threads."""
        self.paths.close()

    # -- helpers -----------------------------------------------------------------------

    def _show(self, caller: Caller) -> Callable[[str], str]:
        """Returns how `extra` is shown to `caller`: admins see restic's text as it is."""
        return _as_is if caller.admin else self._redact

    def _redact(self, text: str) -> str:
        """Returns restic.redact(text): some 10 regular expressions, so remembered per text
        (bounded; the service's repository, which it depends on, is fixed). Most `extra`s
        are empty, which nothing changes."""
        if not text:
            return text
        shown = self._redacted.get(text)
        if shown is None:
            shown = self.service.restic.redact(text)
            if len(text) <= REDACTED_CACHE_TEXT:
                if len(self._redacted) >= REDACTED_CACHE_SIZE:
                    del self._redacted[next(iter(self._redacted))]  # the oldest
                self._redacted[text] = shown
        return shown

    def _view(self, caller: Caller, record: JobRecord) -> dict[str, Any]:
        """Returns what the caller sees of a backup or a restore."""
        if isinstance(record, BackupRecord):
            progress = self.service.progress(JobKind.BACKUP, record)
            return backup_view(record, progress, self._show(caller))
        assert isinstance(record, RestoreRecord)
        progress = self.service.progress(JobKind.RESTORE, record)
        return restore_view(record, progress, self._show(caller))

    # -- backups -----------------------------------------------------------------------

    async def post_backup(self, request: web.Request) -> web.Response:
        caller, body = caller_of(request), body_of(request, BackupRequest)
        # realpath and stat can block on a slow file system: not on the event loop, and not
        # on the shared thread pool either (PathResolver).
        path = await self.paths.resolve(caller.user, body.path, must_exist=True)
        record = await self.service.submit_backup(caller, body.id, path, body.exclude)
        return success(self._view(caller, record))

    async def _list(self, request: web.Request, kind: JobKind) -> web.Response:
        caller, query = caller_of(request), query_of(request, ListQuery)
        if query.user is not None and query.user != caller.user and not caller.admin:
            raise forbidden("user= needs an admin token")
        records, next_after = await self.service.page(
            caller, kind, query.user, status=query.status, after=query.after, limit=query.limit
        )
        items = [self._view(caller, record) for record in records]
        return success({"items": items, "next_after": next_after})

    async def list_backups(self, request: web.Request) -> web.Response:
        return await self._list(request, JobKind.BACKUP)

    async def list_restores(self, request: web.Request) -> web.Response:
        return await self._list(request, JobKind.RESTORE)

    async def list_files(self, request: web.Request) -> web.Response:
        caller, query = caller_of(request), query_of(request, FilesQuery)
        level = await self.service.files(
            caller, job_id_of(request), query.path, after=query.after, limit=query.limit
        )
        return success({"path": level.path, "items": level.items, "next_after": level.next_after})

    async def get_backup(self, request: web.Request) -> web.Response:
        caller = caller_of(request)
        record = await self.service.get_backup(caller, job_id_of(request))
        return success(self._view(caller, record))

    async def delete_backup(self, request: web.Request) -> web.Response:
        backup_id = job_id_of(request)
        snapshot_id = await self.service.delete_backup(caller_of(request), backup_id)
        forget = "queued" if snapshot_id else "no snapshot to forget"
        return success({"id": backup_id, "forget": forget})

    async def _cancel(self, request: web.Request, kind: JobKind) -> web.Response:
        caller, body = caller_of(request), body_of(request, CancelRequest)
        return success(self._view(caller, await self.service.cancel(caller, kind, body.id)))

    async def _cancel_all(self, request: web.Request, kind: JobKind) -> web.Response:
        return success({"cancelled": await self.service.cancel_all(caller_of(request), kind)})

    async def cancel_backup(self, request: web.Request) -> web.Response:
        return await self._cancel(request, JobKind.BACKUP)

    async def cancel_all_backups(self, request: web.Request) -> web.Response:
        return await self._cancel_all(request, JobKind.BACKUP)

    async def cancel_restore(self, request: web.Request) -> web.Response:
        return await self._cancel(request, JobKind.RESTORE)

    async def cancel_all_restores(self, request: web.Request) -> web.Response:
        return await self._cancel_all(request, JobKind.RESTORE)

    # -- restores ----------------------------------------------------------------------

    async def post_restore(self, request: web.Request) -> web.Response:
        caller, body = caller_of(request), body_of(request, RestoreRequest)
        target = await self.paths.resolve(
            caller.user, body.dst_path, must_exist=False, folder=True, field="dst_path"
        )
        record = await self.service.submit_restore(
            caller, body.restore_id, body.backup_id, target, body.include, body.overwrite
        )
        return success(self._view(caller, record))

    async def get_restore(self, request: web.Request) -> web.Response:
        caller = caller_of(request)
        record = await self.service.get_restore(caller, job_id_of(request))
        return success(self._view(caller, record))

    # -- the repository ----------------------------------------------------------------

    async def destroy_repository(self, request: web.Request) -> web.Response:
        return success(await self.service.destroy_repository(caller_of(request)))

    async def repository_destroyed(self, request: web.Request) -> web.Response:
        return success({"destroyed": self.service.destroyed})

    # -- open routes -------------------------------------------------------------------

    def _admin_or_none(self, request: web.Request) -> bool:
        """True if the request carries an admin token; healthz needs none and refuses none."""
        if "Authorization" not in request.headers:
            return False
        try:
            return self.authenticator.authenticate(request.headers["Authorization"]).admin
        except ApiError:
            return False

    async def healthz(self, request: web.Request) -> web.Response:
        health = self.service.health()
        repository = await self.service.repository.health()
        admin = self._admin_or_none(request)
        data: dict[str, Any] = {
            "restic_version": str(self.service.restic.version),
            "repository": repository.detail if admin else repository.public,
            "pending": health.pending,
            "running": health.running,
        }
        if health.node is not None:  # records in the cluster's database (SPEC §10)
            data["node"] = health.node
            data["database"] = health.database
        if health.nodes_alive is not None:
            data["nodes_alive"] = health.nodes_alive
        return success(data)

    async def metrics(self, request: web.Request) -> web.Response:
        body = self.service.metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def openapi_document(self, request: web.Request) -> web.Response:
        return web.json_response(self.openapi)
