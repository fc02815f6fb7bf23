"""SPEC §11 below the API: restic's ls/include/exclude/overwrite spelling, the ls parser on
real captures, the browse cache (its levels, paging, budget and shared reads) and the
overwrite policy of the staging merge. The same features over HTTP with the real restic
are in tests/integration/test_find_restore.py."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from fa_restic.jobs.browse import NotInBackup, Tree, TreeCache, clean_path
from fa_restic.jobs.staging import merge_into
from fa_restic.names import Overwrite
from fa_restic.restic import commands
from fa_restic.restic.commands import Binary, Lock
from fa_restic.restic.features import ResticVersion
from fa_restic.restic.messages import Snapshot, TreeNode, parse_ls_line
from tests.jobs.fake_restic import FakeRestic
from tests.unit.samples import load

CACHE = Path("/var/cache/fa")
V14 = Binary("/usr/bin/restic", ResticVersion(0, 14, 0), CACHE)
V17 = Binary("/opt/restic", ResticVersion(0, 17, 0), CACHE)
V19 = Binary("/opt/restic", ResticVersion(0, 19, 1), CACHE)
SNAPSHOT = "a" * 64


# -- restic's spelling ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "pattern"),
    [
        ("plain.txt", "plain.txt"),
        ("st*r?[x]\\b.txt", "st\\*r\\?\\[x]\\\\b.txt"),
        ("ünï cödé/with space", "ünï cödé/with space"),
    ],
)
def test_escape_glob_escapes_every_glob_character(name: str, pattern: str) -> None:
    assert commands.escape_glob(name) == pattern


def test_excludes_are_anchored_below_the_backed_up_folder() -> None:
    assert commands.anchored_excludes(
        "/srv/fa/data/users/alice/we*ird", ["*.tmp", "/scratch", "sub/cache", "!/keep.tmp"]
    ) == [
        "/srv/fa/data/users/alice/we\\*ird/**/*.tmp",
        "/srv/fa/data/users/alice/we\\*ird/scratch",
        "/srv/fa/data/users/alice/we\\*ird/**/sub/cache",
        "!/srv/fa/data/users/alice/we\\*ird/keep.tmp",
    ]


def test_backup_argv_passes_excludes_before_the_double_dash() -> None:
    argv = commands.backup_command(V19, ["fa:id=1"], ["."], ["/x/**/*.tmp"]).argv
    assert argv[-6:] == ("--tag", "fa:id=1", "--exclude", "/x/**/*.tmp", "--", ".")


@pytest.mark.parametrize("binary", [V14, V17, V19], ids=str)
def test_restore_argv_includes_escaped_entries_from_the_top(binary: Binary) -> None:
    argv = commands.restore_command(
        binary, SNAPSHOT, Path("/stage"), include=["sub/a*.dat", "/dir/"]
    ).argv
    assert argv[argv.index("--target") :] == (
        "--target",
        "/stage",
        "--include",
        "/sub/a\\*.dat",
        "--include",
        "/dir",
        "--",
        SNAPSHOT,
    )


def test_restore_overwrite_is_restics_own_from_0_17() -> None:
    argv = commands.restore_command(V17, SNAPSHOT, Path("/t"), overwrite="if-newer").argv
    assert argv[-4:] == ("--overwrite", "if-newer", "--", SNAPSHOT)
    assert "--overwrite" not in commands.restore_command(V14, SNAPSHOT, Path("/t")).argv
    # restic < 0.17 always overwrites: asked for that, there is nothing to pass.
    assert (
        "--overwrite"
        not in commands.restore_command(V14, SNAPSHOT, Path("/t"), overwrite="always").argv
    )
    with pytest.raises(ValueError, match="no restore --overwrite never"):
        commands.restore_command(V14, SNAPSHOT, Path("/t"), overwrite="never")


def test_ls_argv_and_lock() -> None:
    command = commands.ls_command(V14, SNAPSHOT)
    assert command.argv == (
        "/usr/bin/restic",
        "--cache-dir",
        "/var/cache/fa",
        "ls",
        "--json",
        "--",
        SNAPSHOT,
    )
    assert command.lock is Lock.SHARED


@pytest.mark.parametrize("sample", ["v14-ls-a-abs-json", "v18-ls-a-abs-json"])
def test_ls_lines_of_real_captures(sample: str) -> None:
    parsed = [parse_ls_line(line) for line in load(sample).stdout]
    snapshot, *nodes = parsed
    assert isinstance(snapshot, Snapshot) and snapshot.paths == ["/srv/ds-small"]
    assert all(isinstance(node, TreeNode) for node in nodes)
    by_path = {node.path: node for node in nodes if isinstance(node, TreeNode)}
    assert by_path["/srv/ds-small/sub/deeper/c.bin"].size == 100_000
    assert by_path["/srv/ds-small/link-to-a"].type == "symlink"
    assert by_path["/srv/ds-small/a.txt"].mtime.startswith("2026-11-27T14:16:02")


@pytest.mark.parametrize(
    "line", ["", "restoring <Snapshot>", "[1]", "{broken", '{"struct_type": "node"}']
)
def test_ls_noise_is_skipped(line: str) -> None:
    assert parse_ls_line(line) is None


# -- the tree and its cache ---------------------------------------------------------------


def node(path: str, kind: str = "file", size: int = 1) -> TreeNode:
    return TreeNode(path, path.rsplit("/", 1)[-1], kind, size, "2026-12-01T10:00:00Z")


NODES = [
    node("/a.txt", size=6),
    node("/sub", "dir", 0),
    node("/sub/b.txt", size=1000),
    node("/sub/deeper", "dir", 0),
    node("/sub/deeper/c.bin", size=100_000),
    node("/z-link", "symlink", 0),
]


def tree_of(nodes: list[TreeNode]) -> Tree:
    tree = Tree()
    for each in nodes:
        tree.add(each)
    tree.finish()
    return tree


def test_levels_and_lookups() -> None:
    tree = tree_of(NODES)
    top, after = tree.level("", None, 100)
    assert [entry[0] for entry in top] == ["a.txt", "sub", "z-link"] and after is None
    assert tree.level("sub/deeper", None, 10)[0] == [
        ("c.bin", "file", 100_000, "2026-12-01T10:00:00Z")
    ]
    assert tree.find("sub/b.txt") is not None and tree.find("sub/nope") is None
    assert tree.find("nope/b.txt") is None
    with pytest.raises(NotInBackup, match="is a file"):
        tree.level("a.txt", None, 10)
    with pytest.raises(NotInBackup, match="is not a folder"):
        tree.level("missing", None, 10)


def test_paging_edges() -> None:
    tree = tree_of([node(f"/f{index:02d}") for index in range(6)])
    assert tree.level("", None, 1) == ([tree.folders[""][0]], "f00")
    first, after = tree.level("", None, 3)
    second, end = tree.level("", after, 3)
    assert [entry[0] for entry in first + second] == [f"f{index:02d}" for index in range(6)]
    assert end is None  # an exact multiple: no empty page after the last
    assert tree.level("", "f05", 3) == ([], None)
    assert tree.level("", "zzz", 3) == ([], None)
    assert [entry[0] for entry in tree.level("", "f02x", 2)[0]] == ["f03", "f04"]


@pytest.mark.parametrize(
    ("given", "cleaned"), [("", ""), ("/", ""), ("/sub//deeper/", "sub/deeper"), ("./a", "a")]
)
def test_clean_path(given: str, cleaned: str) -> None:
    assert clean_path(given) == cleaned


def test_clean_path_refuses_dot_dot() -> None:
    with pytest.raises(NotInBackup):
        clean_path("sub/../../etc")


def test_clean_path_refuses_a_nul() -> None:
    """`?path=a%00b` must be a 400, not a failed exec of `restic ls` (a 500)."""
    with pytest.raises(NotInBackup, match="NUL"):
        clean_path("sub/a\x00b")


def fake_with_trees(count: int) -> FakeRestic:
    restic = FakeRestic()
    for index in range(count):
        snapshot = restic.add_snapshot(index + 1, "alice")
        restic.trees[snapshot.id] = [node(f"/file-{index}-{number}") for number in range(50)]
    return restic


async def test_the_cache_reads_a_tree_once_even_for_concurrent_callers() -> None:
    restic = fake_with_trees(1)
    (snapshot_id,) = restic.snapshots_by_id
    cache = TreeCache(restic)
    gate = restic.hold("ls")
    waiting = [asyncio.ensure_future(cache.tree(snapshot_id)) for _ in range(3)]
    await gate.entered.wait()
    gate.release()
    trees = await asyncio.gather(*waiting)
    assert trees[0] is trees[1] is trees[2]
    assert await cache.tree(snapshot_id) is trees[0]
    assert len(restic.calls_of("ls")) == 1
    assert trees[0] is not None
    assert cache.bytes == trees[0].bytes > 0


async def test_the_cache_keeps_to_its_budget_least_recently_used_first() -> None:
    restic = fake_with_trees(3)
    first, second, third = restic.snapshots_by_id
    one_tree = tree_of(restic.trees[first]).bytes
    cache = TreeCache(restic, budget_bytes=2 * one_tree + one_tree // 2)
    await cache.tree(first)
    await cache.tree(second)
    await cache.tree(first)  # now the most recently used
    await cache.tree(third)  # evicts `second`
    assert cache.cached(first) is not None and cache.cached(third) is not None
    assert cache.cached(second) is None
    assert cache.bytes <= cache.budget_bytes
    await cache.tree(second)
    assert [call.args[0] for call in restic.calls_of("ls")] == [first, second, third, second]


async def test_a_tree_beyond_the_whole_budget_is_never_held() -> None:
    """One user's huge backup must not take the service's memory: the read stops at the
    budget, and the tree is not read again."""
    restic = fake_with_trees(1)
    (snapshot_id,) = restic.snapshots_by_id
    cache = TreeCache(restic, budget_bytes=3 * tree_of(restic.trees[snapshot_id][:1]).bytes)
    assert await cache.tree(snapshot_id) is None
    assert 1 < restic.nodes_fed < 10, "the read did not stop at the budget"
    assert cache.cached(snapshot_id) is None and cache.bytes == 0
    assert await cache.tree(snapshot_id) is None
    assert len(restic.calls_of("ls")) == 1


def big_tree_cache() -> tuple[FakeRestic, TreeCache, str]:
    restic = FakeRestic()
    snapshot_id = restic.add_snapshot(1, "alice").id
    restic.trees[snapshot_id] = [
        node("/a.txt"),
        node("/sub", "dir", 0),
        *(node(f"/sub/f{number:03d}", size=number) for number in range(25)),
        node("/sub/deeper", "dir", 0),
        node("/sub/deeper/c.bin", size=7),
        node("/z-link", "symlink", 0),
    ]
    # Sorted by name in each folder, as restic keeps a tree's nodes.
    restic.trees[snapshot_id].sort(key=lambda each: (each.path.rpartition("/")[0], each.name))
    return restic, TreeCache(restic, budget_bytes=200), snapshot_id


async def test_levels_of_a_tree_beyond_the_budget_are_read_one_at_a_time() -> None:
    restic, cache, snapshot_id = big_tree_cache()
    assert await cache.tree(snapshot_id) is None
    reference = tree_of(restic.trees[snapshot_id])
    for path, pages_expected in (("", 1), ("sub", 3), ("sub/deeper", 1)):
        after: str | None = None
        pages = 0
        while True:
            page, next_after = await cache.level(snapshot_id, path, after, 10)
            assert (page, next_after) == reference.level(path, after, 10), (path, pages)
            assert len(page) <= 10
            after, pages = next_after, pages + 1
            if after is None:
                break
        assert pages == pages_expected, path
    with pytest.raises(NotInBackup, match="is a file"):
        await cache.level(snapshot_id, "a.txt", None, 10)
    with pytest.raises(NotInBackup, match="is not a folder"):
        await cache.level(snapshot_id, "nope", None, 10)
    level_calls = restic.calls_of("ls")[1:]
    assert level_calls[0].args == (snapshot_id, "/") and len(level_calls) == 7
    assert cache.bytes == 0


async def test_entries_of_a_tree_beyond_the_budget_are_looked_up_with_one_ls() -> None:
    restic, cache, snapshot_id = big_tree_cache()
    await cache.tree(snapshot_id)
    wanted = ["sub/f003", "sub/deeper", "sub/missing", "z-link"]
    assert await cache.present(snapshot_id, wanted) == {"sub/f003", "sub/deeper", "z-link"}
    assert restic.calls_of("ls")[-1].args == (
        snapshot_id,
        "/sub/deeper",
        "/sub/f003",
        "/sub/missing",
        "/z-link",
    )


# -- the overwrite policy of the staging merge -----------------------------------------------

OLD = 1_600_000_000
NEW = 1_700_000_000


def staged_and_dst(tmp_path: Path, dst_mtime: int) -> tuple[Path, Path, Path]:
    staging, home = tmp_path / "staging", tmp_path / "home"
    (staging / "sub").mkdir(parents=True)
    (home / "dst" / "sub").mkdir(parents=True)
    (staging / "sub" / "f.txt").write_bytes(b"from the backup")
    os.utime(staging / "sub" / "f.txt", (NEW - 100, NEW - 100))
    (staging / "sub" / "new.txt").write_bytes(b"only in the backup")
    (home / "dst" / "sub" / "f.txt").write_bytes(b"local")
    os.utime(home / "dst" / "sub" / "f.txt", (dst_mtime, dst_mtime))
    return staging, home, home / "dst"


@pytest.mark.parametrize(
    ("policy", "dst_mtime", "expected"),
    [
        (Overwrite.ALWAYS, NEW, b"from the backup"),
        (Overwrite.ALWAYS, OLD, b"from the backup"),
        (Overwrite.NEVER, NEW, b"local"),
        (Overwrite.NEVER, OLD, b"local"),
        (Overwrite.IF_NEWER, NEW, b"local"),
        (Overwrite.IF_NEWER, NEW - 100, b"local"),  # as new as the backup's: it stays
        (Overwrite.IF_NEWER, OLD, b"from the backup"),
    ],
)
def test_overwrite_policy(
    tmp_path: Path, policy: Overwrite, dst_mtime: int, expected: bytes
) -> None:
    staging, home, dst = staged_and_dst(tmp_path, dst_mtime)
    merge_into(staging, home, dst, overwrite=policy)
    assert (dst / "sub" / "f.txt").read_bytes() == expected
    assert (dst / "sub" / "new.txt").read_bytes() == b"only in the backup"
