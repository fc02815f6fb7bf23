"""User paths (SPEC §4): relative to the home, resolved, never outside it; and the 400s
the HTTP API answers for backup paths and restore targets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fa_restic.api.paths import PathRefused, resolve_in_home


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A data root with alice's home (a folder, a file, inner and outer symlinks) and bob's."""
    data = tmp_path / "data"
    home = data / "users" / "alice"
    (home / "docs" / "sub").mkdir(parents=True)
    (home / "docs" / "a.txt").write_text("a", encoding="utf-8")
    (data / "users" / "bob" / "private").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("s", encoding="utf-8")
    (home / "to-outside").symlink_to(outside)
    (home / "to-etc-passwd").symlink_to("/etc/passwd")
    (home / "to-docs").symlink_to("docs")
    (home / "docs" / "up-and-in").symlink_to("../docs/sub")
    (home / "to-bob").symlink_to(data / "users" / "bob")
    (home / "dangling-out").symlink_to(outside / "not-yet")
    return data


def _resolve(root: Path, given: str, must_exist: bool = True) -> Path:
    return resolve_in_home(root, "alice", given, must_exist=must_exist)


def test_relative_and_leading_slash_mean_the_home(root: Path) -> None:
    home = (root / "users" / "alice").resolve()
    assert _resolve(root, "docs") == home / "docs"
    assert _resolve(root, "/docs") == home / "docs"
    assert _resolve(root, "//docs/a.txt") == home / "docs" / "a.txt"
    assert _resolve(root, "/") == home
    assert _resolve(root, "") == home
    assert _resolve(root, "docs/sub/../a.txt") == home / "docs" / "a.txt"


def test_symlinks_inside_the_home_are_followed_and_reported_resolved(root: Path) -> None:
    home = (root / "users" / "alice").resolve()
    assert _resolve(root, "to-docs") == home / "docs"
    assert _resolve(root, "to-docs/a.txt") == home / "docs" / "a.txt"
    assert _resolve(root, "docs/up-and-in") == home / "docs" / "sub"


@pytest.mark.parametrize(
    "given",
    [
        "..",
        "../bob/private",
        "/../bob",
        "docs/../../bob",
        "docs/../../../outside",
        "to-outside",
        "to-outside/secret",
        "to-etc-passwd",
        "to-bob",
        "to-bob/private",
    ],
)
def test_escapes_are_refused(root: Path, given: str) -> None:
    with pytest.raises(PathRefused, match="leaves the home of alice"):
        _resolve(root, given)


def test_escape_is_refused_for_a_target_that_need_not_exist(root: Path) -> None:
    for given in ("../bob/new", "to-outside/new", "dangling-out", "dangling-out/x"):
        with pytest.raises(PathRefused, match="leaves the home"):
            _resolve(root, given, must_exist=False)
    home = (root / "users" / "alice").resolve()
    assert _resolve(root, "new/folder", must_exist=False) == home / "new" / "folder"


def test_nul_missing_path_and_missing_home(root: Path) -> None:
    with pytest.raises(PathRefused, match="NUL"):
        _resolve(root, "docs\x00/../..")
    with pytest.raises(PathRefused, match="path does not exist: nope"):
        _resolve(root, "nope")
    with pytest.raises(PathRefused, match="home folder of carol does not exist"):
        resolve_in_home(root, "carol", "x", must_exist=False)


def test_a_home_name_that_is_a_prefix_of_another_is_no_way_out(tmp_path: Path) -> None:
    # /users/al must not reach /users/alice by a string-prefix comparison.
    data = tmp_path / "data"
    (data / "users" / "al").mkdir(parents=True)
    (data / "users" / "alice" / "x").mkdir(parents=True)
    with pytest.raises(PathRefused, match="leaves the home"):
        resolve_in_home(data, "al", "../alice/x", must_exist=True)


# -- over HTTP -----------------------------------------------------------------------------


async def test_backup_paths_over_http(make_api: Any, newest_restic: str, tmp_path: Path) -> None:
    api = await make_api(newest_restic)
    home = api.home("alice")
    api.home("bob")
    (home / "docs").mkdir()
    (home / "docs" / "a.txt").write_text("a", encoding="utf-8")
    outside = tmp_path / "outside"
    outside.mkdir()
    (home / "to-outside").symlink_to(outside)
    (home / "to-docs").symlink_to("docs")

    refused = {
        "../bob": "err when backup file: path leaves the home of alice: ../bob",
        "/../../..": "err when backup file: path leaves the home of alice: /../../..",
        "to-outside": "err when backup file: path leaves the home of alice: to-outside",
        "nope": "err when backup file: path does not exist: nope",
        "docs\x00x": "err when backup file: path contains a NUL character",
    }
    for backup_id, (given, message) in enumerate(refused.items(), start=1):
        status, body = await api.call("POST", "/backup", json={"id": backup_id, "path": given})
        assert (status, body) == (400, {"code": 400, "message": message, "data": None}), given
        _, unknown = await api.call("GET", f"/backup/{backup_id}")
        assert unknown["code"] == 4001, "a refused backup leaves no record"

    status, body = await api.call("POST", "/backup", json={"id": 20, "path": "/to-docs"})
    assert (status, body["code"]) == (200, 2001), body
    assert body["data"]["path"] == str((home / "docs").resolve())
    done = await api.wait("backup", 20)
    assert done["status"] == "success", done
    assert done["path"] == str((home / "docs").resolve())


async def test_restore_targets_over_http(make_api: Any, newest_restic: str, tmp_path: Path) -> None:
    api = await make_api(newest_restic)
    home = api.home("alice")
    (home / "docs").mkdir()
    (home / "docs" / "a.txt").write_text("a", encoding="utf-8")
    (home / "restores").mkdir()
    (home / "to-restores").symlink_to("restores")
    outside = tmp_path / "outside"
    outside.mkdir()
    (home / "to-outside").symlink_to(outside)
    status, body = await api.call("POST", "/backup", json={"id": 1, "path": "docs"})
    assert body["code"] == 2001, body
    assert (await api.wait("backup", 1))["status"] == "success"

    refused = {
        "../bob/here": "err when restore file: path leaves the home of alice: ../bob/here",
        "/../../tmp": "err when restore file: path leaves the home of alice: /../../tmp",
        "to-outside": "err when restore file: path leaves the home of alice: to-outside",
        "to-outside/new": "err when restore file: path leaves the home of alice: to-outside/new",
        "docs/a.txt": "err when restore file: dst_path is not a folder: docs/a.txt",
        "x\x00": "err when restore file: path contains a NUL character",
    }
    for restore_id, (given, message) in enumerate(refused.items(), start=1):
        status, body = await api.call(
            "POST", "/restore", json={"restore_id": restore_id, "backup_id": 1, "dst_path": given}
        )
        assert (status, body) == (400, {"code": 400, "message": message, "data": None}), given
    assert list(outside.iterdir()) == []

    status, body = await api.call(
        "POST", "/restore", json={"restore_id": 10, "backup_id": 1, "dst_path": "to-restores/r"}
    )
    assert body["code"] == 2001, body
    expected = str((home / "restores" / "r").resolve())
    assert body["data"]["dst_path"] == expected
    done = await api.wait("restore", 10)
    assert (done["status"], done["dst_path"]) == ("success", expected)
    assert (home / "restores" / "r" / "a.txt").read_text(encoding="utf-8") == "a"


async def test_restore_does_not_write_through_a_symlink_planted_in_the_target(
    make_api: Any, restic_binary: str, tmp_path: Path
) -> None:
    """A user may put `dst/sub -> /etc` in their home before restoring a backup that holds
    `sub/...`: nothing may be written outside the home (the service often runs as root)."""
    api = await make_api(restic_binary)
    home = api.home("alice")
    (home / "src" / "sub").mkdir(parents=True)
    (home / "src" / "sub" / "planted.txt").write_text("from the backup", encoding="utf-8")
    outside = tmp_path / "outside"
    outside.mkdir()
    (home / "dst").mkdir()
    (home / "dst" / "sub").symlink_to(outside)

    assert (await api.call("POST", "/backup", json={"id": 1, "path": "src"}))[1]["code"] == 2001
    assert (await api.wait("backup", 1))["status"] == "success"
    body = (
        await api.call(
            "POST", "/restore", json={"restore_id": 1, "backup_id": 1, "dst_path": "dst"}
        )
    )[1]
    assert body["code"] == 2001, body
    await api.wait("restore", 1)
    assert list(outside.iterdir()) == [], "the restore wrote outside the home"
