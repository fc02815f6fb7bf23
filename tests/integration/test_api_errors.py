"""The error rows of SPEC §5, answered by a real service with the real restic: exact
envelopes for bad requests, unknown and other users' ids, ids in use, routes and methods."""

from __future__ import annotations

import io
import re
import subprocess
from typing import Any

import pytest

from tests.conftest import Api
from tests.helpers import API, auth, make_small_tree


def _printed_version(binary: str) -> str:
    """What `restic version` prints, e.g. `restic 0.18.0 compiled with go1.24.4 on ...`."""
    return subprocess.run([binary, "version"], capture_output=True, text=True, check=True).stdout


def _bad(message: str) -> tuple[int, dict[str, Any]]:
    return 400, {"code": 400, "message": message, "data": None}


def _unknown(kind: str, job_id: int) -> dict[str, Any]:
    return {
        "code": 4001,
        "message": f"err when load {kind} [ {job_id} ]: no such record",
        "data": None,
    }


async def _raw(api: Api, method: str, path: str, body: Any, user: str = "alice") -> Any:
    response = await api.client.request(method, API + path, headers=auth(user), data=body)
    return response.status, await response.json()


@pytest.fixture
async def one(make_api: Any, newest_restic: str) -> Api:
    """A service on the newest restic: these answers do not depend on restic's version."""
    api: Api = await make_api(newest_restic)
    (api.home("alice") / "docs").mkdir()
    (api.home("alice") / "docs" / "a.txt").write_text("a", encoding="utf-8")
    return api


# -- bodies --------------------------------------------------------------------------------

BACKUP_BODIES: list[tuple[Any, str]] = [
    ({"path": "docs"}, "err when backup file: id: required"),
    ({"id": 1}, "err when backup file: path: required"),
    ({"id": "1", "path": "docs"}, "err when backup file: id: must be a positive integer"),
    ({"id": 0, "path": "docs"}, "err when backup file: id: must be a positive integer"),
    ({"id": -1, "path": "docs"}, "err when backup file: id: must be a positive integer"),
    ({"id": 1.5, "path": "docs"}, "err when backup file: id: must be a positive integer"),
    ({"id": 1.0, "path": "docs"}, "err when backup file: id: must be a positive integer"),
    ({"id": True, "path": "docs"}, "err when backup file: id: must be a positive integer"),
    ({"id": None, "path": "docs"}, "err when backup file: id: must be a positive integer"),
    ({"id": 2**63, "path": "docs"}, "err when backup file: id: must be a positive integer"),
    ({"id": 1, "path": 5}, "err when backup file: path: input should be a valid string"),
    ({"id": 1, "path": ["docs"]}, "err when backup file: path: input should be a valid string"),
    ([1, "docs"], "err when backup file: body must be a JSON object"),
    ("docs", "err when backup file: body must be a JSON object"),
    (None, "err when backup file: body must be a JSON object"),
]


async def test_bad_backup_bodies(one: Api) -> None:
    for body, message in BACKUP_BODIES:
        assert await one.call("POST", "/backup", json=body) == _bad(message), body
        assert await one.call("POST", "/backup/new", json=body) == _bad(message), body
    assert await one.call("GET", "/backup/1") == (200, _unknown("backup", 1))


RESTORE_BODIES: list[tuple[Any, str]] = [
    ({"backup_id": 1, "dst_path": "r"}, "err when restore file: restore_id: required"),
    ({"restore_id": 1, "dst_path": "r"}, "err when restore file: backup_id: required"),
    ({"restore_id": 1, "backup_id": 1}, "err when restore file: dst_path: required"),
    (
        {"restore_id": "1", "backup_id": 1, "dst_path": "r"},
        "err when restore file: restore_id: must be a positive integer",
    ),
    (
        {"restore_id": 1, "backup_id": 0, "dst_path": "r"},
        "err when restore file: backup_id: must be a positive integer",
    ),
    (
        {"restore_id": 1, "backup_id": -3, "dst_path": "r"},
        "err when restore file: backup_id: must be a positive integer",
    ),
    (
        {"restore_id": 2.5, "backup_id": 1, "dst_path": "r"},
        "err when restore file: restore_id: must be a positive integer",
    ),
    (
        {"restore_id": 1, "backup_id": False, "dst_path": "r"},
        "err when restore file: backup_id: must be a positive integer",
    ),
    (
        {"restore_id": 1, "backup_id": 1, "dst_path": 7},
        "err when restore file: dst_path: input should be a valid string",
    ),
    ([], "err when restore file: body must be a JSON object"),
]


async def test_bad_restore_bodies(one: Api) -> None:
    for body, message in RESTORE_BODIES:
        assert await one.call("POST", "/restore", json=body) == _bad(message), body
        assert await one.call("POST", "/restore/new", json=body) == _bad(message), body


async def test_bad_json(one: Api) -> None:
    for path, prefix in (
        ("/backup", "err when backup file"),
        ("/backup/new", "err when backup file"),
        ("/restore", "err when restore file"),
        ("/restore/new", "err when restore file"),
        ("/backup/cancel", "err when cancel backup"),
        ("/restore/cancel", "err when cancel restore"),
    ):
        for body in (b"{not json", b'{"id": 1,}', b"\xff\xfe", b"{'id': 1}", b"1 2"):
            answer = await _raw(one, "POST", path, body)
            assert answer == _bad(f"{prefix}: body is not valid JSON"), (path, body)


async def test_empty_body(one: Api) -> None:
    assert await _raw(one, "POST", "/backup", b"") == _bad(
        "err when backup file: body must be a JSON object"
    )


async def test_a_body_over_one_mib_is_refused(one: Api) -> None:
    big = io.BytesIO(b'{"id": 1, "path": "' + b"x" * (2 << 20) + b'"}')
    status, body = await _raw(one, "POST", "/backup", big)
    assert status == 413
    assert body == {"code": 413, "message": "request body too large", "data": None}


# -- ids in URLs ---------------------------------------------------------------------------


async def test_url_id_must_be_a_positive_integer(one: Api) -> None:
    for text in ("abc", "0", "-1", "1.5", "1e3", "%201", "+1", "0x10", "١٢", "9" * 19):
        assert await one.call("GET", f"/backup/{text}") == _bad(
            "err when load backup: id must be a positive integer"
        ), text
        assert await one.call("GET", f"/restore/{text}") == _bad(
            "err when load restore: id must be a positive integer"
        ), text
        assert await one.call("DELETE", f"/backup/{text}") == _bad(
            "err when delete a backup: id must be a positive integer"
        ), text


async def test_get_of_an_unknown_id(one: Api) -> None:
    response = await one.client.get(f"{API}/backup/33", headers=auth("alice"))
    assert response.status == 200
    assert await response.text() == (
        '{"code": 4001, "message": "err when load backup [ 33 ]: no such record", "data": null}'
    )
    assert await one.call("GET", "/restore/33") == (200, _unknown("restore", 33))
    assert await one.call("GET", "/backup/033") == (200, _unknown("backup", 33))


async def test_unknown_ids_elsewhere(one: Api) -> None:
    assert await one.call("DELETE", "/backup/5") == _bad(
        "err when delete a backup: no such record [ 5 ]"
    )
    assert await one.call("POST", "/backup/cancel", json={"id": 5}) == _bad(
        "err when cancel backup: no such record [ 5 ]"
    )
    assert await one.call("POST", "/restore/cancel", json={"id": 5}) == _bad(
        "err when cancel restore: no such record [ 5 ]"
    )
    assert await one.call(
        "POST", "/restore", json={"restore_id": 1, "backup_id": 5, "dst_path": "r"}
    ) == _bad("err when restore file: no such backup [ 5 ]")


# -- routes and methods --------------------------------------------------------------------


ROUTE_ERRORS = [
    ("GET", f"{API}/nope", 404, "not found"),
    ("GET", f"{API}/backup/1/extra", 404, "not found"),
    ("GET", "/", 404, "not found"),
    ("POST", "/fa/api/v1/backup", 404, "not found"),
    ("PUT", f"{API}/backup", 405, "method not allowed"),
    ("DELETE", f"{API}/restore", 405, "method not allowed"),
    ("POST", f"{API}/backup/1/files", 405, "method not allowed"),
    ("PUT", f"{API}/backup/1", 405, "method not allowed"),
    ("POST", f"{API}/backup/1", 405, "method not allowed"),
    ("DELETE", f"{API}/restore/1", 405, "method not allowed"),
    ("POST", f"{API}/healthz", 405, "method not allowed"),
]


async def test_routes_and_methods(one: Api) -> None:
    for method, path, status, message in ROUTE_ERRORS:
        for headers in ({}, auth("alice")):
            response = await one.client.request(method, path, headers=headers)
            assert response.status == status, (method, path)
            assert await response.json() == {"code": status, "message": message, "data": None}


async def test_cancel_all_ignores_its_body(one: Api) -> None:
    for path in ("/backup/cancel-all", "/restore/cancel-all"):
        for body in (None, b"", b"not json at all", b'{"id": "x"}'):
            status, answer = await _raw(one, "POST", path, body)
            assert (status, answer) == (
                200,
                {"code": 2001, "message": "success", "data": {"cancelled": []}},
            )


# -- ids in use and other users' ids -------------------------------------------------------

# restic needs a few hundred ms at least, even for a tiny backup: a request sent right after
# the POST finds the job pending or running.
ACTIVE = re.compile(r"\((pending|running)\)$")


async def test_backup_ids_in_use_and_other_users_ids(api: Api) -> None:
    make_small_tree(api.home("alice") / "docs")
    (api.home("bob") / "mine").mkdir()
    (api.home("bob") / "mine" / "b.txt").write_text("bob", encoding="utf-8")

    status, body = await api.call("POST", "/backup", json={"id": 1, "path": "docs"})
    assert (status, body["code"], body["data"]["status"]) == (200, 2001, "pending"), body
    # Pending or running: in use, for its owner and for everyone else.
    status, body = await api.call("POST", "/backup", json={"id": 1, "path": "docs"})
    assert status == 400, body
    assert body["message"].startswith("err when backup file: backup id 1 is in use ("), body
    assert ACTIVE.search(body["message"]), body
    assert await api.call("POST", "/backup", "bob", json={"id": 1, "path": "mine"}) == _bad(
        "err when backup file: backup id 1 is in use"
    )
    status, body = await api.call("DELETE", "/backup/1")
    assert status == 400, body
    assert re.fullmatch(
        r"err when delete a backup: backup 1 is (pending|running): cancel it first",
        body["message"],
    ), body
    status, body = await api.call(
        "POST", "/restore", json={"restore_id": 1, "backup_id": 1, "dst_path": "r"}
    )
    assert status == 400, body
    assert re.fullmatch(
        r"err when restore file: backup 1 is (pending|running), not success", body["message"]
    ), body

    done = await api.wait("backup", 1)
    assert done["status"] == "success", done
    # Success: in use for good.
    assert await api.call("POST", "/backup", json={"id": 1, "path": "docs"}) == _bad(
        "err when backup file: backup id 1 is in use (success)"
    )
    # Another user's id is in use, and nothing is said of its job.
    assert await api.call("POST", "/backup", "bob", json={"id": 1, "path": "mine"}) == _bad(
        "err when backup file: backup id 1 is in use"
    )

    # Another user's id answers exactly as an unknown one, on every other route.
    assert await api.call("GET", "/backup/1", "bob") == await api.call("GET", "/backup/1", "eve")
    assert await api.call("GET", "/backup/1", "bob") == (200, _unknown("backup", 1))
    assert await api.call("DELETE", "/backup/1", "bob") == _bad(
        "err when delete a backup: no such record [ 1 ]"
    )
    assert await api.call("POST", "/backup/cancel", "bob", json={"id": 1}) == _bad(
        "err when cancel backup: no such record [ 1 ]"
    )
    assert await api.call(
        "POST", "/restore", "bob", json={"restore_id": 7, "backup_id": 1, "dst_path": "r"}
    ) == _bad("err when restore file: no such backup [ 1 ]")
    assert await api.call("GET", "/restore/7", "bob") == (200, _unknown("restore", 7))
    # An admin sees and controls everyone's records.
    _, seen = await api.call("GET", "/backup/1", "root", admin=True)
    assert seen["code"] == 2001 and seen["data"]["id"] == 1 and seen["data"]["status"] == "success"

    # healthz needs no token and tells the restic version, the repository state and the queue.
    response = await api.client.get(f"{API}/healthz")
    assert response.status == 200
    printed = _printed_version(api.restic_binary)
    assert await response.json() == {
        "code": 2001,
        "message": "success",
        "data": {
            "restic_version": printed.split()[1],
            "repository": "ok",
            "pending": 0,
            "running": 0,
        },
    }


async def test_a_cancelled_id_may_be_reused(one: Api) -> None:
    status, body = await one.call("POST", "/backup", json={"id": 2, "path": "docs"})
    assert body["code"] == 2001, body
    status, body = await one.call("POST", "/backup/cancel", json={"id": 2})
    assert (status, body["code"], body["data"]["status"]) == (200, 2001, "cancel"), body
    assert await one.call(
        "POST", "/restore", json={"restore_id": 2, "backup_id": 2, "dst_path": "r"}
    ) == _bad("err when restore file: backup 2 is cancel, not success")
    # Cancelling it again is fine; it stays `cancel`.
    status, body = await one.call("POST", "/backup/cancel", json={"id": 2})
    assert (status, body["data"]["status"]) == (200, "cancel"), body

    # (Fields the service does not use are ignored, not refused.)
    status, body = await one.call(
        "POST", "/backup", json={"id": 2, "path": "docs", "tenantId": 9, "comment": "again"}
    )
    assert (status, body["code"], body["data"]["status"]) == (200, 2001, "pending"), body
    assert body["data"]["extra"] == "" and body["data"]["finished_at"] is None
    assert (await one.wait("backup", 2))["status"] == "success"


async def test_restore_ids_in_use_then_reusable(one: Api) -> None:
    await one.call("POST", "/backup", json={"id": 1, "path": "docs"})
    assert (await one.wait("backup", 1))["status"] == "success"
    body = (
        await one.call("POST", "/restore", json={"restore_id": 1, "backup_id": 1, "dst_path": "r1"})
    )[1]
    assert body["code"] == 2001, body
    status, again = await one.call(
        "POST", "/restore", json={"restore_id": 1, "backup_id": 1, "dst_path": "r1"}
    )
    assert status == 400, again
    assert again["message"].startswith("err when restore file: restore id 1 is in use ("), again
    assert ACTIVE.search(again["message"]), again
    assert (await one.wait("restore", 1))["status"] == "success"

    # Finished: the id may be used again, here for another target.
    status, body = await one.call(
        "POST", "/restore", json={"restore_id": 1, "backup_id": 1, "dst_path": "r2"}
    )
    assert (status, body["code"]) == (200, 2001), body
    assert (await one.wait("restore", 1))["status"] == "success"
    assert (one.home("alice") / "r2" / "a.txt").read_text(encoding="utf-8") == "a"

    # Bob: alice's restore id is unknown to him, and he may not restore her backup.
    assert await one.call("GET", "/restore/1", "bob") == (200, _unknown("restore", 1))
    (one.home("bob") / "mine").mkdir()
    (one.home("bob") / "mine" / "b.txt").write_text("bob", encoding="utf-8")
    assert await one.call(
        "POST", "/restore", "bob", json={"restore_id": 1, "backup_id": 1, "dst_path": "x"}
    ) == _bad("err when restore file: no such backup [ 1 ]")
    # With a backup of his own, alice's (finished) restore id is still hers.
    await one.call("POST", "/backup", "bob", json={"id": 2, "path": "mine"})
    assert (await one.wait("backup", 2, "bob"))["status"] == "success"
    assert await one.call(
        "POST", "/restore", "bob", json={"restore_id": 1, "backup_id": 2, "dst_path": "x"}
    ) == _bad("err when restore file: restore id 1 is in use")
    _, still = await one.call("GET", "/restore/1")
    assert still["data"]["dst_path"].endswith("/alice/r2"), still


async def test_another_users_failed_id_is_still_theirs(make_api: Any, newest_restic: str) -> None:
    """Ids are global: a failed backup id that alice holds is in use for bob."""
    api = await make_api(newest_restic, max_running=1)
    make_small_tree(api.home("alice") / "docs")
    (api.home("alice") / "gone").mkdir()
    (api.home("bob") / "mine").mkdir()
    # Backup 10 takes the only slot; backup 1 waits, and its folder vanishes meanwhile.
    assert (await api.call("POST", "/backup", json={"id": 10, "path": "docs"}))[1]["code"] == 2001
    body = (await api.call("POST", "/backup", json={"id": 1, "path": "gone"}))[1]
    assert body["code"] == 2001, body
    (api.home("alice") / "gone").rmdir()
    failed = await api.wait("backup", 1)
    assert failed["status"] == "failed", failed
    assert failed["extra"] == f"path no longer exists: {api.home('alice').resolve() / 'gone'}"

    # Another user's id is in use, and nothing is said of its job.
    assert await api.call("POST", "/backup", "bob", json={"id": 1, "path": "mine"}) == _bad(
        "err when backup file: backup id 1 is in use"
    )
    _, mine = await api.call("GET", "/backup/1")
    assert mine["code"] == 2001 and mine["data"]["path"].endswith("/alice/gone"), mine
    # Its owner may reuse it.
    status, body = await api.call("POST", "/backup", json={"id": 1, "path": "docs"})
    assert (status, body["code"]) == (200, 2001), body
    assert (await api.wait("backup", 1))["status"] == "success"
