"""The store with the job records' layout: finished records on disk behind an index."""

from __future__ import annotations

import asyncio
import json
import resource
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from fa_restic.jobs.records import LAYOUT
from fa_restic.store import Clear, Delete, Put, StateStore, Update
from fa_restic.store import state as state_module

USERS = ("alice", "bob", "carol")


def _job(number: int, status: str = "success", user: str | None = None) -> dict[str, Any]:
    return {
        "id": number,
        "user": user or USERS[number % 3],
        "status": status,
        "path": f"/srv/fa/data/users/x/{number}",
    }


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "state.json"


def _session(path: Path, work: Callable[[StateStore], Awaitable[Any]]) -> Any:
    async def run() -> Any:
        store = StateStore(path, LAYOUT)
        store.load()
        try:
            return await work(store)
        finally:
            await store.settled()
            store.close()

    return asyncio.run(run())


def _ids(values: list[dict[str, Any]]) -> list[int]:
    return [value["id"] for value in values]


async def _fill(store: StateStore) -> None:
    await store.write([Put("backup", str(n), _job(n)) for n in range(1, 31)])
    await store.write([Put("backup", str(n), _job(n, "pending")) for n in (40, 41)])
    await store.write([Update("backup", "7", {"status": "failed"}), Delete("backup", "8")])


def _check_filled(store: StateStore, hot: dict[str, Any]) -> None:
    assert sorted(hot["backup"]) == ["40", "41"], "only live records are loaded"
    assert store.counts("backup") == {"success": 28, "failed": 1, "pending": 2}
    assert store.read("backup", "7") == {**_job(7), "status": "failed"}
    assert store.read("backup", "8") is None and store.read("backup", "99") is None
    assert _ids(store.page("backup", limit=5)) == [41, 40, 30, 29, 28]
    assert _ids(store.page("backup", before=10, limit=4)) == [9, 7, 6, 5]
    assert _ids(store.page("backup", owner="bob", limit=4)) == [40, 28, 25, 22]
    assert _ids(store.page("backup", owner="bob", label="pending")) == [40]
    assert _ids(store.page("backup", label="failed")) == [7]
    assert _ids(store.page("backup", owner="nobody")) == []
    assert _ids(store.page("backup", owner="alice", before=4)) == [3]


def test_finished_records_are_read_through_the_index(path: Path) -> None:
    _session(path, _fill)
    store = StateStore(path, LAYOUT)
    try:
        _check_filled(store, store.load())  # from the journal
    finally:
        store.close()

    async def compacted(store: StateStore) -> None:
        await store._compact()  # what a write past the bound starts
        assert store.sizes["journal"] == 0 and store.sizes["recent"] == 0

    _session(path, compacted)
    assert path.with_name("state.json.index").is_file()
    for _ in range(2):  # from the index; then again from the index it wrote
        store = StateStore(path, LAYOUT)
        try:
            _check_filled(store, store.load())
        finally:
            store.close()


@pytest.mark.parametrize("damage", ["missing", "stale", "garbage"])
def test_an_index_that_is_not_the_files_is_rebuilt_from_the_lines(path: Path, damage: str) -> None:
    _session(path, _fill)
    _session(path, lambda store: store._compact())
    index = path.with_name("state.json.index")
    if damage == "missing":
        index.unlink()
    elif damage == "garbage":
        index.write_bytes(b"\x00not an index")
    else:  # an index of another state file (a crash between the two renames)
        header, _, rest = index.read_bytes().partition(b"\n")
        head = json.loads(header)
        head["generation"] = "0" * 16
        index.write_bytes(json.dumps(head).encode() + b"\n" + rest)
    store = StateStore(path, LAYOUT)
    try:
        _check_filled(store, store.load())
    finally:
        store.close()
    assert b"0000000000000000" not in index.read_bytes()[:200]


def test_a_version_1_state_file_is_read_and_rewritten(path: Path) -> None:
    path.parent.mkdir(parents=True)
    document: dict[str, Any] = {
        "format": "fa-restic-state",
        "version": 1,
        "collections": {
            "backup": {"1": _job(1), "2": _job(2, "pending")},
            "meta": {"repository": {"destroyed": False}},
        },
    }
    path.write_text(json.dumps(document))
    store = StateStore(path, LAYOUT)
    try:
        hot = store.load()
        assert hot == {"backup": {"2": _job(2, "pending")}, "meta": document["collections"]["meta"]}
        assert store.read("backup", "1") == _job(1)
    finally:
        store.close()
    assert json.loads(path.read_bytes().splitlines()[0])["version"] == 2


def test_journal_pieces_of_a_compaction_cut_short_are_replayed(path: Path) -> None:
    _session(path, _fill)
    journal = path.with_name("state.json.journal")
    # Killed after turning the journal, before the new state file: its piece stays.
    journal.rename(path.with_name("state.json.journal.3"))
    line = {"ops": [{"put": "backup", "key": "50", "value": _job(50)}]}
    journal.write_text(json.dumps(line) + "\n")
    store = StateStore(path, LAYOUT)
    try:
        hot = store.load()
        assert store.read("backup", "50") == _job(50)
        _check_filled_but_50(store, hot)
    finally:
        store.close()
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "state.json",
        "state.json.index",
        "state.json.journal",
    ], "folded in at the start"


def _check_filled_but_50(store: StateStore, hot: dict[str, Any]) -> None:
    assert store.counts("backup")["success"] == 29
    assert _ids(store.page("backup", limit=2)) == [50, 41]
    assert sorted(hot["backup"]) == ["40", "41"]


def test_writes_during_compactions_are_all_kept(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(state_module, "MIN_JOURNAL_BYTES", 5000)
    # No waiting for a pause: the writers never pause, and how often a compaction would
    # find its turn at twice the bound depends on the machine's speed.
    monkeypatch.setattr(state_module, "QUIET_SECONDS", 0.0)
    compactions = 0

    async def work(store: StateStore) -> None:
        nonlocal compactions

        async def writer(user: str, first: int) -> None:
            for n in range(first, first + 300):
                await store.write([Put("backup", str(n), _job(n, "pending", user))])
                await store.write([Update("backup", str(n), {"status": "success"})])
                if n % 7 == 0:
                    await store.write([Delete("backup", str(n))])

        async def watch() -> None:
            nonlocal compactions
            while True:
                if store._compaction is not None:
                    compactions += 1
                    await store.settled()
                await asyncio.sleep(0)

        watcher = asyncio.create_task(watch())
        await asyncio.gather(writer("alice", 1000), writer("bob", 2000), writer("carol", 3000))
        watcher.cancel()
        await store.settled()
        # What the store counts is what the journal holds (its bound depends on it).
        assert store.sizes["journal"] == store.journal_path.stat().st_size

    _session(path, work)
    assert compactions >= 3
    expected = {n for first in (1000, 2000, 3000) for n in range(first, first + 300) if n % 7}
    store = StateStore(path, LAYOUT)
    try:
        assert store.load().get("backup", {}) == {}
        assert store.counts("backup") == {"success": len(expected)}
        everything = store.page("backup", limit=10_000)
        assert set(_ids(everything)) == expected and len(everything) == len(expected)
        assert all(value["status"] == "success" for value in everything)
        assert _ids(store.page("backup", owner="bob", limit=3)) == [2299, 2298, 2297]
    finally:
        store.close()


def test_clear_drops_a_collection_for_good(path: Path) -> None:
    async def work(store: StateStore) -> None:
        await _fill(store)
        await store._compact()
        await store.write([Put("backup", "60", _job(60)), Put("restore", "5", _job(5))])
        await store.write([Clear("backup")])
        assert store.counts("backup") == {} and store.page("backup") == []
        await store.write([Put("backup", "61", _job(61))])

    _session(path, work)
    store = StateStore(path, LAYOUT)
    try:
        store.load()
        assert _ids(store.page("backup")) == [61] and store.read("backup", "1") is None
        assert store.read("restore", "5") == _job(5)
    finally:
        store.close()


def test_a_write_that_fails_changes_nothing(path: Path) -> None:
    """The journal cannot grow (RLIMIT_FSIZE, as a full disk would): the write raises and
    the records are as before, in memory and after a restart."""

    async def work(store: StateStore) -> None:
        await _fill(store)
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)
        previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        size = store.journal_path.stat().st_size
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 10, limit[1]))
        try:
            with pytest.raises(OSError):
                await store.write([Put("backup", "70", _job(70)), Delete("backup", "1")])
            with pytest.raises(OSError):
                await store.write([Clear("backup")])
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limit)
            signal.signal(signal.SIGXFSZ, previous)
        assert store.read("backup", "70") is None and store.read("backup", "1") == _job(1)
        _check_filled(store, {"backup": {"40": 0, "41": 0}})

    _session(path, work)
    store = StateStore(path, LAYOUT)
    try:
        _check_filled(store, store.load())
    finally:
        store.close()


def test_a_stop_during_a_compaction_waits_for_it_and_keeps_everything(path: Path) -> None:
    """The service stopped while its store folds the journal. (CI: `close`, on its thread,
    closed the reader that the compaction's last step, on the loop, then closed again.)"""

    async def run() -> None:
        store = StateStore(path, LAYOUT)
        store.load()
        await _fill(store)
        compaction = asyncio.create_task(store.compact())
        while not store._folding:  # noqa: ASYNC110 - until its rotation is queued on the writer
            await asyncio.sleep(0)
        await store.stop()
        await compaction  # ended, without an error
        assert store.sizes["journal"] == 0

    asyncio.run(run())
    assert path.with_name("state.json.index").is_file()
    assert path.with_name("state.json.journal").stat().st_size == 0, "folded in"
    store = StateStore(path, LAYOUT)
    try:
        _check_filled(store, store.load())
    finally:
        store.close()


def test_a_stop_drops_a_compaction_that_waits_for_writes_to_pause(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(state_module, "QUIET_SECONDS", 600.0)

    async def run() -> None:
        store = StateStore(path, LAYOUT)
        store.load()
        await _fill(store)
        # Past the journal's bound, not twice past it: the next write starts a compaction
        # that waits for a pause in writes.
        monkeypatch.setattr(state_module, "MIN_JOURNAL_BYTES", store.sizes["journal"])
        await store.write([Update("backup", "40", {"path": "/srv/fa/data/users/x/new"})])
        waiting = store._compaction
        assert waiting is not None and not store._folding
        with pytest.raises(RuntimeError, match="stop"):
            store.close()  # from the loop, only `stop` can end the compaction
        await store.stop()
        assert waiting.cancelled()

    asyncio.run(run())
    store = StateStore(path, LAYOUT)
    try:
        hot = store.load()  # from the journal, which kept every change
        _check_filled(store, hot)
        assert hot["backup"]["40"]["path"] == "/srv/fa/data/users/x/new"
    finally:
        store.close()
