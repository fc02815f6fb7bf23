"""Bad input from hostile users (SPEC §9), against a real service and the real restic: long
paths refused before any resolution and never echoed whole, one user's slow paths not
holding another's, text that is not text, deep JSON and broken HTTP answered 400/401 in the
envelope without a traceback, log lines that cannot be forged, private files, and a
repository that is down described to users without its account, host or path."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import stat
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from fa_restic.__main__ import LOG_FORMAT, OneLineFormatter
from fa_restic.api import paths as paths_module
from tests.conftest import Api, RestServer
from tests.helpers import API, auth, make_small_tree, token_for

ONE_MB_PATH = "docs/" + "a/../" * 200_000  # the 1 MB path: 7.7 s of realpath before
ECHO_LIMIT = 200


@pytest.fixture
async def one(make_api: Any, newest_restic: str) -> Api:
    """A service on the newest restic: these answers do not depend on restic's version."""
    api: Api = await make_api(newest_restic)
    make_small_tree(api.home("alice") / "docs")
    (api.home("bob") / "docs").mkdir(parents=True)
    return api


@pytest.fixture
def no_traceback(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Fails the test if anything was logged at ERROR or with a traceback."""
    caplog.set_level(logging.DEBUG)
    yield caplog
    bad = [
        (record.name, record.levelname, record.getMessage()[:300])
        for record in caplog.records
        if record.levelno >= logging.ERROR or record.exc_info or record.exc_text
    ]
    assert not bad, bad
    assert "Traceback" not in caplog.text


def _bad(message: str) -> tuple[int, dict[str, Any]]:
    return 400, {"code": 400, "message": message, "data": None}


async def _raw_post(api: Api, path: str, body: bytes | io.BytesIO, user: str = "alice") -> Any:
    response = await api.client.post(API + path, headers=auth(user), data=body)
    return response.status, await response.json()


async def _raw_http(api: Api, request: bytes) -> tuple[int, bytes]:
    """Sends bytes as they are (no client checks them) and returns the status and body."""
    reader, writer = await asyncio.open_connection(api.client.host, api.client.port)
    writer.write(request)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def _get(path: str, headers: bytes = b"") -> bytes:
    return (
        f"GET {API}{path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode() + headers + b"\r\n"
    )


# -- limits --------------------------------------------------------------------------------


async def test_long_paths_and_names_are_refused(one: Api, no_traceback: Any) -> None:
    prefix = "err when backup file"
    for path, reason in (
        ("a" * 4097, "path is too long (4097 bytes; at most 4096)"),
        ("é" * 2049, "path is too long (4098 bytes; at most 4096)"),  # 2049 characters
        (ONE_MB_PATH, "path is too long (1000005 bytes; at most 4096)"),
        ("docs/" + "n" * 256, "path has a name of 256 bytes (at most 255 a name)"),
        ("docs/" + "ü" * 128, "path has a name of 256 bytes (at most 255 a name)"),
    ):
        assert await one.call("POST", "/backup", json={"id": 1, "path": path}) == _bad(
            f"{prefix}: {reason}"
        )
    body = {"restore_id": 1, "backup_id": 1, "dst_path": "r/" + "x" * 5000}
    assert await one.call("POST", "/restore", json=body) == _bad(
        "err when restore file: dst_path is too long (5002 bytes; at most 4096)"
    )
    # 255 bytes a name and 4096 bytes a path are allowed; what is echoed is clipped.
    longest = "a/../" * 818 + "n" * 6  # 4096 bytes
    status, answer = await one.call("POST", "/backup", json={"id": 1, "path": longest})
    assert status == 400
    echoed = answer["message"].removeprefix(f"{prefix}: path does not exist: ")
    assert len(echoed) == ECHO_LIMIT and echoed.endswith("…") and longest.startswith(echoed[:-1])
    status, answer = await one.call("POST", "/backup", json={"id": 1, "path": "m" * 255})
    assert answer["message"] == f"{prefix}: path does not exist: {'m' * 199}…"
    status, answer = await one.call("POST", "/backup", json={"id": 1, "path": "../" + "o" * 250})
    assert answer["message"] == f"{prefix}: path leaves the home of alice: ../{'o' * 196}…"


async def test_alice_is_answered_while_bob_sends_four_1mb_paths(
    one: Api, no_traceback: Any
) -> None:
    async def bob(job_id: int) -> tuple[int, dict[str, Any]]:
        return await one.call("POST", "/backup", "bob", json={"id": job_id, "path": ONE_MB_PATH})

    async def alice() -> float:
        started = time.monotonic()
        status, body = await one.call("POST", "/backup", json={"id": 100, "path": "docs"})
        assert (status, body["code"]) == (200, 2001), body
        return time.monotonic() - started

    sending = asyncio.gather(*(bob(job_id) for job_id in range(1, 5)))
    await asyncio.sleep(0.01)  # bob's four bodies are on their way
    took = await alice()
    bobs = await sending
    print(f"alice's POST answered in {took:.3f} s while bob sent four 1 MB paths")
    assert took < 3.0
    for status, body in bobs:
        assert (status, body["code"]) == (400, 400), body
        assert len(body["message"]) < 100, body
    assert (await one.wait("backup", 100))["status"] == "success"


async def test_a_stuck_file_system_holds_only_its_users_turn(
    one: Api, no_traceback: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bob's home hangs (a stuck network file system): his resolutions queue behind each
    other on their own threads; alice's POST and the shared thread pool are not held."""
    release = threading.Event()
    running: list[str] = []
    real = paths_module.resolve_in_home

    def resolve(data_root: Path, user: str, given: str, **options: Any) -> Path:
        running.append(user)
        if user == "bob":
            release.wait(30)
        return real(data_root, user, given, **options)

    monkeypatch.setattr(paths_module, "resolve_in_home", resolve)
    bobs = [
        asyncio.ensure_future(
            one.call("POST", "/backup", "bob", json={"id": job_id, "path": "docs"})
        )
        for job_id in range(1, 9)
    ]
    await asyncio.sleep(0.5)
    assert running.count("bob") == 1  # the other seven wait for bob's turn, not on threads
    started = time.monotonic()
    status, body = await one.call("POST", "/backup", json={"id": 100, "path": "docs"})
    assert (status, body["code"]) == (200, 2001), body
    assert await asyncio.wait_for(asyncio.to_thread(lambda: "free"), 1) == "free"
    took = time.monotonic() - started
    print(f"alice's POST and a to_thread call took {took:.3f} s while bob's home hung")
    assert took < 3.0
    release.set()
    answers = await asyncio.gather(*bobs)
    assert [body["code"] for _, body in answers].count(2001) == 8, answers


# -- text that is not text, deep JSON, broken HTTP ----------------------------------------


async def test_lone_surrogates_are_refused(one: Api, no_traceback: Any) -> None:
    surrogate = "err when {}: body holds a string that is not text (a lone surrogate)"
    for route, body, prefix in (
        ("/backup", b'{"id": 1, "path": "docs/\\ud800"}', "backup file"),
        ("/backup", b'{"id": 1, "path": "\\uDFFF"}', "backup file"),
        ("/backup", b'{"id": 1, "path": "docs", "note": ["\\udcff"]}', "backup file"),
        ("/backup", b'{"id": 1, "path": "docs", "\\ud800": 1}', "backup file"),
        (
            "/restore",
            b'{"restore_id": 1, "backup_id": 1, "dst_path": "\\ud83d"}',
            "restore file",
        ),
        ("/backup/cancel", b'{"id": 1, "x": "\\ude00"}', "cancel backup"),
    ):
        assert await _raw_post(one, route, body) == _bad(surrogate.format(prefix)), body
    # UTF-8 bytes of a surrogate are not UTF-8.
    assert await _raw_post(one, "/backup", b'{"id": 1, "path": "\xed\xa0\x80"}') == _bad(
        "err when backup file: body is not valid JSON"
    )
    # A pair is a character (U+1F600): an ordinary path that does not exist.
    assert await _raw_post(one, "/backup", b'{"id": 1, "path": "\\ud83d\\ude00"}') == _bad(
        "err when backup file: path does not exist: \U0001f600"
    )


async def test_deep_json_is_refused(one: Api, no_traceback: Any) -> None:
    deep = "err when backup file: body is nested deeper than 100 levels"
    for depth in (101, 999, 5_000, 100_000):
        assert await _raw_post(one, "/backup", b"[" * depth + b"]" * depth) == _bad(deep)
    objects = '{"a":' * 101 + "1" + "}" * 101
    assert await _raw_post(one, "/backup", objects.encode()) == _bad(deep)
    inside = '{"id": 1, "path": "docs", "x": ' + "[" * 100 + "]" * 100 + "}"
    assert await _raw_post(one, "/backup", inside.encode()) == _bad(deep)
    assert await _raw_post(one, "/restore", b"{" * 5000) == _bad(
        "err when restore file: body is not valid JSON"
    )
    # 100 levels are allowed (and brackets inside strings are text).
    assert await _raw_post(one, "/backup", b"[" * 100 + b"]" * 100) == _bad(
        "err when backup file: body must be a JSON object"
    )
    text = json.dumps({"id": 1, "path": "docs", "note": "[" * 500}).encode()
    status, body = await _raw_post(one, "/backup", text)
    assert (status, body["code"]) == (200, 2001), body


async def test_authorization_bytes_that_are_not_text(one: Api, no_traceback: Any) -> None:
    not_text = {"code": 401, "message": "unauthorized: the Authorization header is not text"}
    for value in (b"Bearer \xff\xfe", b"Bearer caf\xe9", b"Bearer \xed\xa0\x80", b"\xc3("):
        status, body = await _raw_http(one, _get("/backup/1", b"Authorization: " + value + b"\r\n"))
        assert status == 401 and json.loads(body) == {**not_text, "data": None}, (value, body)
    # UTF-8 text that is no token is just that.
    status, body = await _raw_http(
        one, _get("/backup/1", "Authorization: Bearer café\r\n".encode())
    )
    assert (status, json.loads(body)["message"]) == (401, "unauthorized: unknown token")
    # healthz needs no token, so a broken one does not matter there.
    status, body = await _raw_http(one, _get("/healthz", b"Authorization: Bearer \xff\r\n"))
    assert status == 200 and json.loads(body)["code"] == 2001


async def test_broken_http_and_big_bodies(
    one: Api, caplog: pytest.LogCaptureFixture, no_traceback: Any
) -> None:
    # A control character in a header: aiohttp refuses it before any route (400), and its log
    # of it is one warning line without a traceback.
    status, _ = await _raw_http(one, _get("/backup/1", b"X-Note: a\x01b\r\n"))
    assert status == 400
    warnings = [record for record in caplog.records if "bad HTTP request" in record.getMessage()]
    assert warnings and warnings[0].levelno == logging.WARNING, caplog.text
    # A body over 1 MiB, with a length or chunked: the envelope (413), nothing logged.
    big = b'{"id": 1, "path": "' + b"x" * (2 << 20) + b'"}'

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 1 << 16):
            yield big[start : start + (1 << 16)]

    too_large = {"code": 413, "message": "request body too large", "data": None}
    for data in (io.BytesIO(big), chunks()):
        response = await one.client.post(API + "/backup", headers=auth("alice"), data=data)
        assert (response.status, await response.json()) == (413, too_large)
    # Just under the limit is read and refused for what it is.
    near = b'{"id": 1, "path": "' + b"x" * ((1 << 20) - 100) + b'"}'
    assert await _raw_post(one, "/backup", io.BytesIO(near)) == _bad(
        "err when backup file: path is too long (1048476 bytes; at most 4096)"
    )


# -- logs ------------------------------------------------------------------------------------

FORGED = "FORGED 2026-01-01 00:00:00,000 INFO fa_restic: admin logged in"


@pytest.fixture
def service_log() -> Iterator[io.StringIO]:
    """The service's log as `fa-restic serve` writes it (its formatter), into a string."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(OneLineFormatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.DEBUG)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


async def test_log_lines_cannot_be_forged(one: Api, service_log: io.StringIO) -> None:
    folder = f"docs/x\n{FORGED}\ry"
    make_small_tree(one.home("alice") / folder)
    _, body = await one.call("POST", "/backup", json={"id": 1, "path": folder})
    assert body["code"] == 2001, body
    assert (await one.wait("backup", 1))["status"] == "success"
    target = f"back\r\n{FORGED}\n"
    _, body = await one.call(
        "POST", "/restore", json={"restore_id": 1, "backup_id": 1, "dst_path": target}
    )
    assert body["code"] == 2001, body
    assert (await one.wait("restore", 1))["status"] == "success"
    assert (one.home("alice") / target / "a.txt").read_bytes() == b"hello\n"

    lines = service_log.getvalue().split("\n")
    assert lines.pop() == ""
    assert len(lines) > 4
    stamp = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ")
    for line in lines:
        assert stamp.match(line) and "\r" not in line, line
        assert not line.startswith("FORGED"), line
    accepted = [line for line in lines if "accepted from alice" in line]
    assert accepted and "x\\nFORGED 2026-01-01" in accepted[0], accepted


# -- private files ---------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


async def test_files_the_service_writes_are_private(one: Api) -> None:
    _, body = await one.call("POST", "/backup", json={"id": 1, "path": "docs"})
    assert body["code"] == 2001, body
    assert (await one.wait("backup", 1))["status"] == "success"
    folder = one.folder
    assert _mode(folder / "state.json") == 0o600
    assert _mode(folder / "state.json.journal") == 0o600
    assert _mode(folder / "repo.password") == 0o600
    assert _mode(folder / "cache") == 0o700
    staging = one.data_root / ".fa-restic-staging"
    if staging.exists():
        assert _mode(staging) == 0o700


# -- what users see of a repository that is down ----------------------------------------


async def test_a_down_repository_is_not_described_to_users(
    make_api: Any,
    newest_restic: str,
    rest_server: RestServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    host = rest_server.url.removeprefix("http://")  # 127.0.0.1:<port>
    url = f"rest:http://fauser:s3cret@{host}/fa-repo/"
    api: Api = await make_api(newest_restic, repository_url=url)
    make_small_tree(api.home("alice") / "docs")
    rest_server.process.terminate()
    rest_server.process.wait(timeout=10)

    _, body = await api.call("POST", "/backup", json={"id": 1, "path": "docs"})
    assert body["code"] == 2001, body
    failed = await api.wait("backup", 1, timeout=120)
    assert failed["status"] == "failed", failed

    hidden = ("127.0.0.1", host, "fauser", "s3cret", "fa-repo")
    _, mine = await api.call("GET", "/backup/1", "alice")
    _, anonymous = await api.call("GET", "/healthz", None)
    shown = {"extra": mine["data"]["extra"], "healthz": anonymous["data"]["repository"]}
    print(f"a user sees: {shown}")
    for text in shown.values():
        assert text and text != "ok"
        assert not any(part in text for part in hidden), shown
    assert "<repository>" in shown["extra"] or "<host>" in shown["extra"], shown
    assert len(shown["healthz"]) <= 250

    # Admins and the log keep the detail (restic masks the password itself).
    _, theirs = await api.call("GET", "/backup/1", "root", admin=True)
    assert host in theirs["data"]["extra"], theirs
    response = await api.client.get(
        f"{API}/healthz", headers={"Authorization": f"Bearer {token_for('root', admin=True)}"}
    )
    # restic 0.18 retries past healthz's 15 s: then neither sees more than that.
    detail = (await response.json())["data"]["repository"]
    assert (
        host in detail or detail == shown["healthz"] == "no answer from the repository within 15 s"
    )
    assert host in caplog.text
    assert "s3cret" not in caplog.text
