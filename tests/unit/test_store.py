"""The state file and its journal: durable, never half-read, corrupt files left alone."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from fa_restic.store import Delete, Put, StateError, StateStore, Update
from fa_restic.store import state as state_module


def _record(number: int) -> dict[str, object]:
    return {"id": number, "status": "success", "path": f"/data/users/alice/{number}"}


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "state.json"


def _written(path: Path, *batches: list[Put | Update | Delete]) -> None:
    async def write() -> None:
        store = StateStore(path)
        store.load()
        try:
            for batch in batches:
                await store.write(batch)
        finally:
            store.close()

    asyncio.run(write())


def _reload(path: Path) -> dict[str, dict[str, dict[str, object]]]:
    store = StateStore(path)
    try:
        return store.load()
    finally:
        store.close()


def test_round_trip(path: Path) -> None:
    _written(
        path,
        [Put("backup", "1", _record(1)), Put("backup", "2", _record(2))],
        [Put("restore", "9", {"id": 9, "backup_id": 1})],
        [Delete("backup", "2"), Put("backup", "3", _record(3))],
        [Put("backup", "1", {**_record(1), "status": "failed"})],
        [Delete("nothing-here", "7")],
    )
    assert _reload(path) == {
        "backup": {"1": {**_record(1), "status": "failed"}, "3": _record(3)},
        "restore": {"9": {"id": 9, "backup_id": 1}},
    }


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def test_a_fresh_store_makes_its_folder_and_is_empty(path: Path) -> None:
    assert _reload(path) == {}
    assert path.is_file() and path.with_name("state.json.journal").is_file()
    [header] = _lines(path)
    assert header["format"] == "fa-restic-state" and header["version"] == 2


def test_writes_are_in_the_journal_until_compaction(path: Path) -> None:
    _written(path, [Put("backup", "1", _record(1))])
    journal = path.with_name("state.json.journal")
    lines = journal.read_bytes().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"ops": [{"put": "backup", "key": "1", "value": _record(1)}]}
    ]
    # A restart replays the short journal; the state file is JSON lines, one per record.
    assert _reload(path) == {"backup": {"1": _record(1)}}
    assert _reload(path) == {"backup": {"1": _record(1)}}


def test_a_journal_line_cut_short_at_the_end_is_ignored(path: Path) -> None:
    _written(path, [Put("backup", "1", _record(1))], [Put("backup", "2", _record(2))])
    journal = path.with_name("state.json.journal")
    # A crash during the third append: part of the line, no newline, never acknowledged.
    line = json.dumps({"ops": [{"put": "backup", "key": "3", "value": _record(3)}]}).encode()
    with journal.open("ab") as handle:
        handle.write(line[: len(line) // 2])
    assert _reload(path) == {"backup": {"1": _record(1), "2": _record(2)}}
    assert _reload(path) == {"backup": {"1": _record(1), "2": _record(2)}}
    # The next write starts a line of its own.
    _written(path, [Put("backup", "4", _record(4))])
    assert _reload(path) == {"backup": {"1": _record(1), "2": _record(2), "4": _record(4)}}


def test_a_corrupt_middle_journal_line_is_an_error_and_nothing_is_touched(
    path: Path,
) -> None:
    _written(
        path,
        [Put("backup", "1", _record(1))],
        [Put("backup", "2", _record(2))],
        [Put("backup", "3", _record(3))],
    )
    journal = path.with_name("state.json.journal")
    lines = journal.read_bytes().split(b"\n")
    lines[1] = b'{"ops": [{"put": "backup", "key": "2", "val'
    journal.write_bytes(b"\n".join(lines))
    before = {p.name: p.read_bytes() for p in path.parent.iterdir()}

    with pytest.raises(StateError) as raised:
        StateStore(path).load()
    message = str(raised.value)
    assert str(journal) in message and "line 2" in message
    assert {p.name: p.read_bytes() for p in path.parent.iterdir()} == before


@pytest.mark.parametrize(
    "content",
    [
        b'{"format": "fa-restic-state", "version": 1, "collections": {"backup": ',
        b"",
        b"\xff\xfe not utf-8",
        b"[]",
        b'{"format": "something-else", "version": 1, "collections": {}}',
        b'{"format": "fa-restic-state", "version": 99, "collections": {}}',
        b'{"format": "fa-restic-state", "version": 1}',
        b'{"format": "fa-restic-state", "version": 1, "collections": []}',
    ],
)
def test_a_corrupt_state_file_is_an_error_and_left_byte_identical(
    path: Path, content: bytes
) -> None:
    _written(path, [Put("backup", "1", _record(1))])
    path.write_bytes(content)
    journal = path.with_name("state.json.journal")
    journal_before = journal.read_bytes()
    with pytest.raises(StateError) as raised:
        StateStore(path).load()
    assert str(path) in str(raised.value)
    assert "rebuild-state" in str(raised.value)
    assert path.read_bytes() == content
    assert journal.read_bytes() == journal_before
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "state.json",
        "state.json.index",
        "state.json.journal",
    ]


def test_compaction_happens_and_the_file_stays_readable(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(state_module, "MIN_JOURNAL_BYTES", 2000)
    journal = path.with_name("state.json.journal")
    journal_sizes: list[tuple[int, int]] = []

    async def write() -> None:
        store = StateStore(path)
        store.load()
        try:
            for number in range(1, 101):
                await store.write([Put("backup", str(number), _record(number))])
                await store.settled()
                sizes = (journal.stat().st_size, path.stat().st_size)  # noqa: ASYNC240
                journal_sizes.append(sizes)
            await store.write([Delete("backup", "1")])
        finally:
            store.close()

    asyncio.run(write())
    # Folded in once past the larger of its bound and the state file (a write's worth more).
    assert all(journal <= max(2000, state) + 200 for journal, state in journal_sizes)
    assert [journal for journal, _ in journal_sizes].count(0) >= 3, "folded in several times"
    header, *records = _lines(path)
    assert header["format"] == "fa-restic-state"
    assert len(records) >= 50 and not path.with_name("state.json.tmp").exists()
    expected = {str(number): _record(number) for number in range(2, 101)}
    assert _reload(path) == {"backup": expected}


def test_replaying_a_journal_the_file_already_holds_changes_nothing(path: Path) -> None:
    # A crash between writing the compacted file and emptying the journal.
    _written(path, [Put("backup", "1", _record(1))], [Delete("backup", "1")])
    journal = path.with_name("state.json.journal")
    saved = journal.read_bytes()
    assert _reload(path) == {"backup": {}}
    journal.write_bytes(saved)
    assert _reload(path) == {"backup": {}}


def test_an_update_changes_only_its_fields_and_survives_a_restart(path: Path) -> None:
    _written(
        path,
        [Put("backup", "1", _record(1)), Put("backup", "2", _record(2))],
        [
            Update("backup", "1", {"status": "cancel", "extra": "cancelled by bob"}),
            Update("backup", "9", {"status": "cancel"}),  # gone already: stays gone
        ],
    )
    journal = path.with_name(path.name + ".journal").read_text(encoding="utf-8")
    assert '"update":"backup"' in journal  # written as a change, not the whole record
    records = _reload(path)["backup"]
    assert records["1"] == {**_record(1), "status": "cancel", "extra": "cancelled by bob"}
    assert records["2"] == _record(2)
    assert "9" not in records
