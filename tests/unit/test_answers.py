"""A success's JSON (orjson, with the standard library for what orjson does not take) and
the users' redacted `extra`, remembered per text: the same answers as before, cheaper."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web

import fa_restic.api.handlers as handlers_module
from fa_restic.api.errors import envelope, json_bytes, success
from fa_restic.api.handlers import Handlers
from fa_restic.api.views import backup_view
from fa_restic.jobs.models import BackupRecord, Progress
from fa_restic.jobs.service import Caller
from fa_restic.names import JobStatus, Overwrite
from fa_restic.restic.redact import redact

REPOSITORY_URL = "rest:http://fauser:secret@10.0.0.5:8000/repo/"

VALUES: list[Any] = [
    None,
    {"code": 2001, "message": "success", "data": {"id": 1, "exclude": ["*.tmp"]}},
    {"path": "ünïcödé/日本/😀", "control": "tab\tnew\nline\x00", "quote": '"\\'},
    {"floats": [0.0, -0.0, 1.0, 0.1, 1e16, 1.5e-7, 123456789.125], "flag": True},
    {"status": JobStatus.SUCCESS, "overwrite": Overwrite.ALWAYS},
    {"tuple": (1, 2), "nested": [[{"a": []}]]},
    {"big": 2**64 - 1, "negative": -(2**63)},
    # What orjson does not take; the standard library writes them as before.
    {"surrogate": "file-\udcff.txt"},
    {1: "an integer key"},
    {"huge": 2**70},
]


@pytest.mark.parametrize("value", VALUES)
def test_json_is_the_same_value_as_the_standard_librarys(value: Any) -> None:
    assert json.loads(json_bytes(value)) == json.loads(json.dumps(value))


def test_what_the_standard_library_refuses_is_still_refused() -> None:
    for value in (datetime.now(UTC), Progress(), object()):
        with pytest.raises(TypeError):
            json.dumps(value)
        with pytest.raises(TypeError):
            json_bytes({"data": value})


def test_success_answers_as_json_response_did() -> None:
    data = {"id": 1, "path": "/data/users/alice/ü", "extra": ""}
    response = success(data)
    before = web.json_response({"code": 2001, "message": "success", "data": data})
    assert response.status == before.status == 200
    assert response.headers["Content-Type"] == before.headers["Content-Type"]
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    assert isinstance(response.body, bytes) and isinstance(before.body, bytes)
    assert json.loads(response.body) == json.loads(before.body)


def test_a_failure_keeps_the_standard_librarys_text() -> None:
    response = envelope(4001, "err when load backup [ 33 ]: no such record", None, 200)
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    assert response.text == (
        '{"code": 4001, "message": "err when load backup [ 33 ]: no such record", "data": null}'
    )


def test_a_backup_view_encodes_as_before() -> None:
    moment = datetime(2025, 1, 2, 3, 4, 5, 600_000, tzinfo=UTC)
    record = BackupRecord(
        id=7,
        user="alice",
        path="/data/users/alice/ü",
        status=JobStatus.SUCCESS,
        total_size=10,
        pack_size=5,
        created_at=moment,
        started_at=moment,
        finished_at=moment,
        snapshot_id="ab" * 32,
        exclude=["*.tmp"],
    )
    view = backup_view(record, Progress(percent_done=1.0, bytes_done=10), lambda text: text)
    assert json.loads(json_bytes(view)) == json.loads(json.dumps(view))


class _Restic:
    """restic.redact over REPOSITORY_URL, counting its calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def redact(self, text: str) -> str:
        self.calls.append(text)
        return redact(text, REPOSITORY_URL)


@pytest.fixture
def handlers(tmp_path: Path) -> Iterator[Handlers]:
    service: Any = SimpleNamespace(restic=_Restic())
    made = Handlers(service, authenticator=None, data_root=tmp_path, openapi={})  # type: ignore[arg-type]
    yield made
    made.close()


def _calls(handlers: Handlers) -> list[str]:
    restic = handlers.service.restic
    assert isinstance(restic, _Restic)
    return restic.calls


def test_users_see_extra_redacted_admins_as_is(handlers: Handlers) -> None:
    text = "Fatal: unable to open config file: Head http://fauser:***@10.0.0.5:8000/repo/config"
    user, admin = handlers._show(Caller("alice")), handlers._show(Caller("root", admin=True))
    assert user(text) == redact(text, REPOSITORY_URL) != text
    assert "10.0.0.5" not in user(text)
    assert admin(text) == text


def test_a_redacted_text_is_remembered_and_empty_needs_no_redaction(handlers: Handlers) -> None:
    show = handlers._show(Caller("alice"))
    text = "dial tcp 10.0.0.5:8000: connect: connection refused"
    assert [show(text) for _ in range(3)] == [redact(text, REPOSITORY_URL)] * 3
    assert show("") == ""
    assert _calls(handlers) == [text]


def test_the_remembered_texts_are_bounded(
    handlers: Handlers, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(handlers_module, "REDACTED_CACHE_SIZE", 2)
    monkeypatch.setattr(handlers_module, "REDACTED_CACHE_TEXT", 20)
    show = handlers._show(Caller("alice"))
    for text in ("one 10.0.0.1", "two 10.0.0.2", "three 10.0.0.3", "one 10.0.0.1"):
        assert show(text) == redact(text, REPOSITORY_URL)
    long = "x" * 21 + " 10.0.0.9"
    assert show(long) == show(long) == redact(long, REPOSITORY_URL)
    # "one" was forgotten for "three", then redacted again; the long text is never kept.
    redacted = ["one 10.0.0.1", "two 10.0.0.2", "three 10.0.0.3", "one 10.0.0.1", long, long]
    assert _calls(handlers) == redacted
    assert len(handlers._redacted) == 2
