"""Thin route handlers: parse a request model, call the job layer, answer a view."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from fa_restic.api.auth import Authenticator
from fa_restic.api.errors import (
    NOT_FOUND_CODE,
    ApiError,
    bad_request,
    envelope,
    forbidden,
    success,
)
from fa_restic.api.paths import PathRefused, PathResolver
from fa_restic.api.views import (
    BackupRequest,
    BodyRefused,
    CancelRequest,
    Model,
    RestoreRequest,
    backup_view,
    describe_validation,
    load_body,
    parse_id,
    restore_view,
)
from fa_restic.jobs.errors import JobError, UnknownJob
from fa_restic.jobs.models import BackupRecord, RestoreRecord
from fa_restic.jobs.service import Caller, JobService
from fa_restic.metrics import CONTENT_TYPE
from fa_restic.names import JobKind
from fa_restic.restic.errors import ResticError

log = logging.getLogger("fa_restic.api")

BACKUP = "err when backup file"
RESTORE = "err when restore file"
CANCEL_BACKUP = "err when cancel backup"
CANCEL_ALL_BACKUP = "err when cancel all backup"
CANCEL_RESTORE = "err when cancel restore"
CANCEL_ALL_RESTORE = "err when cancel all restore"
DESTROY = "err when destroy repo"
DELETE = "err when delete a backup"
LOAD_BACKUP = "err when load backup"
LOAD_RESTORE = "err when load restore"


def _as_is(text: str) -> str:
    return text


class Handlers:
    """The routes of SPEC §5."""

    def __init__(
        self,
        service: JobService,
        authenticator: Authenticator,
        data_root: Path,
        openapi: dict[str, Any],
    ) -> None:
        self.service = service
        self.authenticator = authenticator
        self.data_root = data_root
        self.openapi = openapi
        self.paths = PathResolver(data_root)

    def close(self) -> None:
        """Stops the path resolver's threads."""
        self.paths.close()

    # -- helpers -----------------------------------------------------------------------

    def _caller(self, request: web.Request) -> Caller:
        return self.authenticator.authenticate(request.headers.get("Authorization"))

    def _redact(self, text: str) -> str:
        return self.service.restic.redact(text)

    def _show(self, caller: Caller) -> Callable[[str], str]:
        """Returns how `extra` is shown to `caller`: admins see restic's text as it is."""
        return _as_is if caller.admin else self._redact

    @staticmethod
    async def _body(request: web.Request, model: type[Model], prefix: str) -> Model:
        try:
            data = load_body(await request.read())
        except BodyRefused as error:
            raise bad_request(prefix, str(error)) from None
        try:
            return model.model_validate(data)
        except ValidationError as error:
            raise bad_request(prefix, describe_validation(error)) from None

    @staticmethod
    def _url_id(request: web.Request, prefix: str) -> int:
        job_id = parse_id(request.match_info["id"])
        if job_id is None:
            raise bad_request(prefix, "id must be a positive integer")
        return job_id

    async def _resolve(
        self,
        caller: Caller,
        given: str,
        prefix: str,
        *,
        must_exist: bool,
        folder: bool = False,
        field: str = "path",
    ) -> Path:
        # realpath and stat can block on a slow file system: not on the event loop, and not
        # on the shared thread pool either (PathResolver).
        try:
            return await self.paths.resolve(
                caller.user, given, must_exist=must_exist, folder=folder, field=field
            )
        except PathRefused as error:
            raise bad_request(prefix, str(error)) from None

    # -- backups -----------------------------------------------------------------------

    async def post_backup(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        body = await self._body(request, BackupRequest, BACKUP)
        path = await self._resolve(caller, body.path, BACKUP, must_exist=True)
        try:
            record = await self.service.submit_backup(caller, body.id, path)
        except JobError as error:
            raise bad_request(BACKUP, str(error)) from None
        return success(
            backup_view(record, self.service.progress("backup", record), self._show(caller))
        )

    async def get_backup(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        backup_id = self._url_id(request, LOAD_BACKUP)
        try:
            record = self.service.get_backup(caller, backup_id)
        except UnknownJob:
            return envelope(NOT_FOUND_CODE, f"{LOAD_BACKUP} [ {backup_id} ]: no such record", None)
        return success(
            backup_view(record, self.service.progress("backup", record), self._show(caller))
        )

    async def delete_backup(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        backup_id = self._url_id(request, DELETE)
        try:
            snapshot_id = await self.service.delete_backup(caller, backup_id)
        except JobError as error:
            raise bad_request(DELETE, str(error)) from None
        return success(
            {"id": backup_id, "forget": "queued" if snapshot_id else "no snapshot to forget"}
        )

    async def _cancel(self, request: web.Request, kind: JobKind, prefix: str) -> web.Response:
        caller = self._caller(request)
        body = await self._body(request, CancelRequest, prefix)
        try:
            record = await self.service.cancel(caller, kind, body.id)
        except JobError as error:
            raise bad_request(prefix, str(error)) from None
        progress = self.service.progress(kind.value, record)
        if isinstance(record, BackupRecord):
            return success(backup_view(record, progress, self._show(caller)))
        assert isinstance(record, RestoreRecord)
        return success(restore_view(record, progress, self._show(caller)))

    async def _cancel_all(self, request: web.Request, kind: JobKind) -> web.Response:
        caller = self._caller(request)
        cancelled = await self.service.cancel_all(caller, kind)
        return success({"cancelled": cancelled})

    async def cancel_backup(self, request: web.Request) -> web.Response:
        return await self._cancel(request, JobKind.BACKUP, CANCEL_BACKUP)

    async def cancel_all_backups(self, request: web.Request) -> web.Response:
        return await self._cancel_all(request, JobKind.BACKUP)

    async def cancel_restore(self, request: web.Request) -> web.Response:
        return await self._cancel(request, JobKind.RESTORE, CANCEL_RESTORE)

    async def cancel_all_restores(self, request: web.Request) -> web.Response:
        return await self._cancel_all(request, JobKind.RESTORE)

    # -- restores ----------------------------------------------------------------------

    async def post_restore(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        body = await self._body(request, RestoreRequest, RESTORE)
        target = await self._resolve(
            caller, body.dst_path, RESTORE, must_exist=False, folder=True, field="dst_path"
        )
        try:
            record = await self.service.submit_restore(
                caller, body.restore_id, body.backup_id, target
            )
        except JobError as error:
            raise bad_request(RESTORE, str(error)) from None
        return success(
            restore_view(record, self.service.progress("restore", record), self._show(caller))
        )

    async def get_restore(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        restore_id = self._url_id(request, LOAD_RESTORE)
        try:
            record = self.service.get_restore(caller, restore_id)
        except UnknownJob:
            return envelope(
                NOT_FOUND_CODE, f"{LOAD_RESTORE} [ {restore_id} ]: no such record", None
            )
        return success(
            restore_view(record, self.service.progress("restore", record), self._show(caller))
        )

    # -- the repository ----------------------------------------------------------------

    async def destroy_repository(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        if not caller.admin:
            raise forbidden("destroy-repo needs an admin token")
        try:
            report = await self.service.destroy_repository(caller)
        except JobError as error:
            raise bad_request(DESTROY, str(error)) from None
        except ResticError as error:
            raise ApiError(500, 500, f"{DESTROY}: {error.message}") from None
        except OSError as error:
            raise ApiError(500, 500, f"{DESTROY}: {error.strerror or error}") from None
        return success(report)

    async def repository_destroyed(self, request: web.Request) -> web.Response:
        self._caller(request)
        return success({"destroyed": self.service.destroyed})

    # -- open routes -------------------------------------------------------------------

    def _admin_or_none(self, request: web.Request) -> bool:
        """True if the request carries an admin token; healthz needs none and refuses none."""
        if "Authorization" not in request.headers:
            return False
        try:
            return self._caller(request).admin
        except ApiError:
            return False

    async def healthz(self, request: web.Request) -> web.Response:
        health = self.service.health()
        repository = await self.service.repository.health()
        return success(
            {
                "restic_version": str(self.service.restic.version),
                "repository": (
                    repository.detail if self._admin_or_none(request) else repository.public
                ),
                "pending": health.pending,
                "running": health.running,
            }
        )

    async def metrics(self, request: web.Request) -> web.Response:
        body = self.service.metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def openapi_document(self, request: web.Request) -> web.Response:
        return web.json_response(self.openapi)
