"""SPEC §11 over HTTP with the real restic (every version under test): listing and paging,
browsing a backup's tree, selective restores, the overwrite policy and excludes.

Small trees only; each test makes one service and backs up once or twice.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from tests.conftest import Api
from tests.helpers import assert_same_tree, tree_listing
from tests.integration.test_cli import fa_restic

GLOB_NAME = "st*r?[x]\\b.txt"
"""A file name made of restic's glob characters: an include must restore exactly it."""
UNICODE_DIR = "Résumé ünïcödé"
SPACE_DIR = "with space"


async def back_up(api: Api, backup_id: int, path: str, **extra: Any) -> dict[str, Any]:
    body = {"id": backup_id, "path": path, **extra}
    status, answer = await api.call("POST", "/backup", json=body)
    assert (status, answer["code"]) == (200, 2001), answer
    done = await api.wait("backup", backup_id)
    assert done["status"] == "success", done
    return done


async def restore(
    api: Api, restore_id: int, backup_id: int, dst: str, **extra: Any
) -> dict[str, Any]:
    body = {"restore_id": restore_id, "backup_id": backup_id, "dst_path": dst, **extra}
    status, answer = await api.call("POST", "/restore", json=body)
    assert (status, answer["code"]) == (200, 2001), answer
    done = await api.wait("restore", restore_id)
    assert done["status"] == "success", done
    return done


async def files(
    api: Api, backup_id: int, user: str = "alice", **query: str
) -> tuple[int, dict[str, Any]]:
    """GET /backup/{id}/files with `query` encoded."""
    suffix = f"?{urlencode(query)}" if query else ""
    return await api.call("GET", f"/backup/{backup_id}/files{suffix}", user)


def make_odd_tree(root: Path) -> Path:
    """Symlinks (to a file, to a folder, dangling), unicode, spaces and glob characters."""
    (root / UNICODE_DIR / SPACE_DIR).mkdir(parents=True)
    (root / "plain").mkdir()
    (root / GLOB_NAME).write_bytes(b"glob characters\n")
    (root / "st-other.txt").write_bytes(b"must not come with the glob name\n")
    (root / UNICODE_DIR / "naïve café.bin").write_bytes(os.urandom(70_000))
    (root / UNICODE_DIR / SPACE_DIR / "a b c.txt").write_bytes(b"spaces\n" * 100)
    (root / "plain" / "one.txt").write_bytes(b"one\n")
    (root / "plain" / "two.txt").write_bytes(b"two\n")
    (root / "link-to-file").symlink_to(GLOB_NAME)
    (root / "link-to-dir").symlink_to(UNICODE_DIR)
    (root / "dangling").symlink_to("no such target")
    return root


# -- listing -------------------------------------------------------------------------------


async def test_listing_paging_and_ownership(make_api: Any, newest_restic: str) -> None:
    api: Api = await make_api(newest_restic)
    for user in ("alice", "bob"):
        (api.home(user) / "docs").mkdir()
        (api.home(user) / "docs" / "f.txt").write_bytes(user.encode())
    for backup_id in (3, 5, 8):
        await back_up(api, backup_id, "docs")
    status, answer = await api.call("POST", "/backup", "bob", json={"id": 9, "path": "docs"})
    assert answer["code"] == 2001, answer
    await api.wait("backup", 9)
    await restore(api, 4, 5, "out")

    _, page = await api.call("GET", "/backup")
    assert [item["id"] for item in page["data"]["items"]] == [8, 5, 3]
    assert page["data"]["next_after"] is None
    _, single = await api.call("GET", "/backup/8")
    assert page["data"]["items"][0] == single["data"]  # the same shape as GET of one

    # A parameter the route does not know is a 400, not a silently unfiltered list.
    for query, name in (("stauts=failed", "stauts"), ("after=1&=", ""), ("=false", "")):
        status, refused = await api.call("GET", f"/backup?{query}")
        assert (status, refused["code"], refused["data"]) == (400, 400, None), (query, refused)
        assert refused["message"].endswith(f"unknown query parameter {name!r}"), refused
        _, refused = await api.call("GET", f"/backup/8/files?{query}")
        assert refused["code"] == 400, (query, refused)

    _, first = await api.call("GET", "/backup?limit=1")
    assert [item["id"] for item in first["data"]["items"]] == [8]
    assert first["data"]["next_after"] == 8
    _, second = await api.call("GET", "/backup?limit=1&after=8")
    assert [item["id"] for item in second["data"]["items"]] == [5]
    # A page ending exactly at the last record says so: no empty page after it.
    _, exact = await api.call("GET", "/backup?limit=3")
    assert len(exact["data"]["items"]) == 3 and exact["data"]["next_after"] is None
    _, beyond = await api.call("GET", "/backup?after=3")
    assert beyond["data"] == {"items": [], "next_after": None}

    _, bobs = await api.call("GET", "/backup", "bob")
    assert [item["id"] for item in bobs["data"]["items"]] == [9]
    _, everyone = await api.call("GET", "/backup", "root", admin=True)
    assert [item["id"] for item in everyone["data"]["items"]] == [9, 8, 5, 3]
    _, only_bob = await api.call("GET", "/backup?user=bob", "root", admin=True)
    assert [item["id"] for item in only_bob["data"]["items"]] == [9]
    status, spying = await api.call("GET", "/backup?user=alice", "bob")
    assert (status, spying["code"]) == (403, 403), spying

    _, restores = await api.call("GET", "/restore?status=success")
    assert [item["restore_id"] for item in restores["data"]["items"]] == [4]
    _, none = await api.call("GET", "/restore?status=failed")
    assert none["data"]["items"] == []
    _, bob_restores = await api.call("GET", "/restore", "bob")
    assert bob_restores["data"]["items"] == []

    for query in ("limit=0", "limit=1001", "limit=x", "after=0", "after=-1", "status=done"):
        status, refused = await api.call("GET", f"/backup?{query}")
        assert (status, refused["code"]) == (400, 400), (query, refused)
        assert refused["message"].startswith("err when load backup: "), refused


# -- browsing and selective restores ----------------------------------------------------------


async def test_browse_and_restore_a_selection(api: Api) -> None:
    home = api.home("alice")
    source = make_odd_tree(home / "project")
    done = await back_up(api, 1, "project")

    _, top = await api.call("GET", "/backup/1/files")
    assert top["code"] == 2001, top
    by_name = {item["name"]: item for item in top["data"]["items"]}
    assert sorted(by_name) == sorted(os.listdir(source))
    assert by_name[GLOB_NAME] | {"mtime": ""} == {
        "name": GLOB_NAME,
        "type": "file",
        "size": 16,
        "mtime": "",
    }
    assert by_name["link-to-dir"]["type"] == "symlink" and by_name["plain"]["type"] == "dir"
    assert top["data"]["path"] == "" and top["data"]["next_after"] is None

    _, inner = await files(api, 1, path=f"/{UNICODE_DIR}/{SPACE_DIR}/")
    assert inner["data"]["path"] == f"{UNICODE_DIR}/{SPACE_DIR}"
    assert [(item["name"], item["size"]) for item in inner["data"]["items"]] == [("a b c.txt", 700)]
    _, page = await files(api, 1, path="plain", limit="1")
    assert [item["name"] for item in page["data"]["items"]] == ["one.txt"]
    assert page["data"]["next_after"] == "one.txt"
    _, rest = await files(api, 1, path="plain", limit="1", after="one.txt")
    assert [item["name"] for item in rest["data"]["items"]] == ["two.txt"]
    assert rest["data"]["next_after"] is None

    for missing in ("nope", "plain/one.txt", "../etc"):
        status, refused = await files(api, 1, path=missing)
        assert (status, refused["code"]) == (400, 400), (missing, refused)
    status, foreign = await api.call("GET", "/backup/1/files", "bob")
    assert (status, foreign["code"]) == (200, 4001), foreign
    assert foreign["message"] == "err when load backup [ 1 ]: no such record"
    _, unknown = await api.call("GET", "/backup/77/files")
    assert unknown["code"] == 4001

    # A missing entry is named, the first one.
    status, refused = await api.call(
        "POST",
        "/restore",
        json={
            "restore_id": 1,
            "backup_id": 1,
            "dst_path": "sel",
            "include": ["plain", "plain/three.txt", "gone"],
        },
    )
    assert (status, refused["code"]) == (400, 400), refused
    assert "'plain/three.txt'" in refused["message"] and "gone" not in refused["message"]
    for bad in (["../x"], [""], ["a\x00b"], ["x" * 300]):
        status, refused = await api.call(
            "POST",
            "/restore",
            json={"restore_id": 1, "backup_id": 1, "dst_path": "sel", "include": bad},
        )
        assert (status, refused["code"]) == (400, 400), (bad, refused)

    include = [GLOB_NAME, f"{UNICODE_DIR}/{SPACE_DIR}", "link-to-dir"]
    chosen = await restore(api, 1, 1, "sel", include=include)
    assert chosen["include"] == include and chosen["overwrite"] == "always"
    restored = tree_listing(home / "sel")
    expected = tree_listing(source)
    wanted = {
        GLOB_NAME,
        "link-to-dir",
        UNICODE_DIR,
        f"{UNICODE_DIR}/{SPACE_DIR}",
        f"{UNICODE_DIR}/{SPACE_DIR}/a b c.txt",
    }
    assert restored == {path: expected[path] for path in wanted}

    await restore(api, 2, 1, "full")
    assert_same_tree(source, home / "full")
    assert done["path"] == str(source.resolve())


async def test_a_backed_up_file_is_browsed_and_restored_by_its_name(api: Api) -> None:
    home = api.home("alice")
    (home / "d").mkdir()
    (home / "d" / "report.pdf").write_bytes(b"%PDF")
    await back_up(api, 1, "d/report.pdf")
    _, top = await api.call("GET", "/backup/1/files")
    assert [item["name"] for item in top["data"]["items"]] == ["report.pdf"]
    await restore(api, 1, 1, "out", include=["report.pdf"])
    assert (home / "out" / "report.pdf").read_bytes() == b"%PDF"


# -- the overwrite policy ---------------------------------------------------------------------

PAST = 1_500_000_000
FUTURE = 4_000_000_000


POLICIES = [
    (None, False, False),
    ("always", False, False),
    ("if-newer", True, False),
    ("never", True, True),
]
"""(overwrite, a newer local file stays, an older local file stays)."""


async def test_overwrite_policy_with_a_newer_and_an_older_local_file(api: Api) -> None:
    home = api.home("alice")
    (home / "src" / "sub").mkdir(parents=True)
    for name in ("newer.txt", "older.txt", "sub/fresh.txt"):
        (home / "src" / name).write_bytes(b"from the backup")
    await back_up(api, 1, "src")
    for restore_id, (policy, newer_kept, older_kept) in enumerate(POLICIES, start=1):
        dst = home / f"dst-{policy}"
        (dst / "sub").mkdir(parents=True)
        for name, moment in (("newer.txt", FUTURE), ("older.txt", PAST)):
            (dst / name).write_bytes(b"local")
            os.utime(dst / name, (moment, moment))

        extra = {} if policy is None else {"overwrite": policy}
        done = await restore(api, restore_id, 1, dst.name, **extra)

        assert done["overwrite"] == (policy or "always")
        kept = {"newer.txt": newer_kept, "older.txt": older_kept}
        for name, stays in kept.items():
            expected = b"local" if stays else b"from the backup"
            assert (dst / name).read_bytes() == expected, (policy, name)
        assert (dst / "sub" / "fresh.txt").read_bytes() == b"from the backup"
    status, refused = await api.call(
        "POST",
        "/restore",
        json={"restore_id": 9, "backup_id": 1, "dst_path": "x", "overwrite": "sometimes"},
    )
    assert (status, refused["code"]) == (400, 400), refused


# -- excludes -------------------------------------------------------------------------------


async def test_excludes_are_relative_and_the_same_on_every_version(api: Api) -> None:
    home = api.home("alice")
    source = home / "users" / "proj"  # `users` is also a folder above every home
    (source / "sub" / "scratch").mkdir(parents=True)
    (source / "scratch").mkdir()
    (source / "top.tmp").write_bytes(b"t")
    (source / "sub" / "nested.tmp").write_bytes(b"n")
    (source / "keep.txt").write_bytes(b"k")
    (source / "scratch" / "x").write_bytes(b"x")
    (source / "sub" / "scratch" / "kept").write_bytes(b"kept: /scratch is the top one only")
    (source / "users").write_bytes(b"a file named like a folder above the home")
    exclude = ["*.tmp", "/scratch"]

    done = await back_up(api, 1, "users/proj", exclude=exclude)
    assert done["exclude"] == exclude
    _, listed = await api.call("GET", "/backup")
    assert listed["data"]["items"][0]["exclude"] == exclude
    await restore(api, 1, 1, "out")
    assert sorted(tree_listing(home / "out")) == [
        "keep.txt",
        "sub",
        "sub/scratch",
        "sub/scratch/kept",
        "users",
    ]
    # A pattern matching a folder above what is backed up excludes nothing of it.
    await back_up(api, 2, "users/proj", exclude=["users/proj", "alice"])
    await restore(api, 2, 2, "out2")
    assert_same_tree(source, home / "out2")

    # A single file: restic 0.19 backs a path it was given up whatever the excludes say,
    # older restic would make an empty snapshot; the service does as 0.19 on every version.
    await back_up(api, 3, "users/proj/top.tmp", exclude=["*.tmp"])
    _, top = await api.call("GET", "/backup/3/files")
    assert [item["name"] for item in top["data"]["items"]] == ["top.tmp"]

    for bad in (["/"], ["a/../.."], ["x" * 256], ["a\x00"], ["*"] * 101):
        status, refused = await api.call(
            "POST", "/backup", json={"id": 9, "path": "users/proj", "exclude": bad}
        )
        assert (status, refused["code"]) == (400, 400), (bad, refused)
        assert refused["message"].startswith("err when backup file: exclude"), refused


# -- the command-line client -------------------------------------------------------------------


async def test_the_client_lists_browses_and_restores_a_selection(
    make_api: Any, newest_restic: str
) -> None:
    api: Api = await make_api(newest_restic)
    home = api.home("alice")
    (home / "p" / "sub").mkdir(parents=True)
    (home / "p" / "a.txt").write_bytes(b"a")
    (home / "p" / "b.tmp").write_bytes(b"b")
    (home / "p" / "sub" / "c.txt").write_bytes(b"c")

    backup = await fa_restic(api, "backup", "p", "--id", "1", "--exclude", "*.tmp", "--wait")
    assert backup.code == 0 and backup.json()["exclude"] == ["*.tmp"], backup
    listed = await fa_restic(api, "list", "--limit", "1", "--all")
    assert (listed.code, [item["id"] for item in listed.json()]) == (0, [1]), listed
    top = await fa_restic(api, "ls", "1")
    assert [item["name"] for item in top.json()["items"]] == ["a.txt", "sub"], top
    inner = await fa_restic(api, "ls", "1", "sub", "--limit", "1", "--all")
    assert [item["name"] for item in inner.json()] == ["c.txt"], inner
    (home / "out").mkdir()
    (home / "out" / "a.txt").write_bytes(b"mine")
    restore = await fa_restic(
        api,
        "restore",
        "--id",
        "1",
        "--backup-id",
        "1",
        "--dst",
        "out",
        "--include",
        "a.txt",
        "--include",
        "sub/c.txt",
        "--overwrite",
        "never",
        "--wait",
    )
    assert restore.code == 0, restore
    assert tree_listing(home / "out")["sub/c.txt"][0] == "file"
    assert (home / "out" / "a.txt").read_bytes() == b"mine"
    restores = await fa_restic(api, "list", "restore", "--status", "success")
    assert [item["overwrite"] for item in restores.json()["items"]] == ["never"], restores
    missing = await fa_restic(api, "ls", "1", "nope")
    assert missing.code == 1 and "nope" in missing.stderr, missing


async def test_a_backup_beyond_the_browse_budget_is_browsed_level_by_level(
    make_api: Any, restic_binary: str
) -> None:
    """A cache budget of 1 byte: no tree is ever held; every level is its own `restic ls`,
    stopped once the page is full."""
    api: Api = await make_api(restic_binary, restic_extra="browse_cache_bytes = 1")
    source = make_odd_tree(api.home("alice") / "project")
    many = source / "many"
    many.mkdir()
    for number in range(23):
        (many / f"f{number:02d} é").write_bytes(b"x" * number)
    await back_up(api, 1, "project")

    for path, expected in (("", source), ("many", many), (UNICODE_DIR, source / UNICODE_DIR)):
        names: list[str] = []
        after: str | None = None
        while True:
            query = {"path": path, "limit": "5", **({"after": after} if after else {})}
            status, page = await files(api, 1, **query)
            assert (status, page["code"]) == (200, 2001), page
            assert len(page["data"]["items"]) <= 5
            names += [item["name"] for item in page["data"]["items"]]
            after = page["data"]["next_after"]
            if after is None:
                break
        assert names == sorted(os.listdir(expected)), path
    _, one = await files(api, 1, path="many", after="f06 é", limit="1")
    assert one["data"]["items"][0] == one["data"]["items"][0] | {"name": "f07 é", "size": 7}
    for missing in ("nope", "plain/one.txt"):
        status, refused = await files(api, 1, path=missing)
        assert (status, refused["code"]) == (400, 400), (missing, refused)

    status, refused = await api.call(
        "POST",
        "/restore",
        json={"restore_id": 1, "backup_id": 1, "dst_path": "sel", "include": ["many", "gone"]},
    )
    assert (status, refused["code"]) == (400, 400) and "'gone'" in refused["message"], refused
    await restore(api, 1, 1, "sel", include=["many/f22 é", GLOB_NAME])
    assert tree_listing(api.home("alice") / "sel") == {
        path: listing
        for path, listing in tree_listing(source).items()
        if path in ("many", "many/f22 é", GLOB_NAME)
    }
