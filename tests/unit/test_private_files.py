"""Files the service writes are 0600 and the folders it makes 0700 (SPEC §9): the state file,
its journal and temporary file, the password file, and the folders made for them."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from fa_restic.config import ensure_password_file
from fa_restic.store import Put, StateStore


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The most open umask (0): the modes must not depend on the caller's."""
    previous = os.umask(0)
    yield
    os.umask(previous)


async def test_state_file_journal_and_folders(tmp_path: Path, open_umask: None) -> None:
    store = StateStore(tmp_path / "var" / "lib" / "state.json")
    store.load()
    await store.write([Put("backups", "1", {"path": "/data/users/alice/docs"})])
    assert _mode(tmp_path / "var") == 0o700
    assert _mode(tmp_path / "var" / "lib") == 0o700
    assert _mode(store.path) == 0o600
    assert _mode(store.journal_path) == 0o600
    store.close()


async def test_compaction_writes_a_private_file(
    tmp_path: Path, open_umask: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fa_restic.store import state as state_module

    monkeypatch.setattr(state_module, "MIN_JOURNAL_BYTES", 10)
    seen: list[int] = []
    replace = os.replace

    def spying_replace(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
        seen.append(stat.S_IMODE(os.stat(source).st_mode))  # the temporary file
        replace(source, target)

    monkeypatch.setattr(os, "replace", spying_replace)
    store = StateStore(tmp_path / "state.json")
    store.load()
    for key in range(5):
        await store.write([Put("backups", str(key), {"n": key})])
        await store.settled()
    store.close()
    assert len(seen) >= 2 and set(seen) == {0o600}, seen
    assert _mode(store.path) == 0o600 and _mode(store.journal_path) == 0o600


def test_files_of_an_older_version_are_tightened(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text('{"format":"fa-restic-state","version":1,"collections":{}}\n')
    journal = tmp_path / "state.json.journal"
    journal.write_text("")
    path.chmod(0o644)
    journal.chmod(0o644)
    store = StateStore(path)
    store.load()
    store.close()
    assert _mode(path) == 0o600 and _mode(journal) == 0o600


def test_an_existing_state_folder_is_left_as_it_is(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    store = StateStore(folder / "state.json")
    store.load()
    store.close()
    assert _mode(folder) == 0o755


def test_password_file_and_its_folders(tmp_path: Path, open_umask: None) -> None:
    path = tmp_path / "etc" / "fa-restic" / "repo.password"
    ensure_password_file(path)
    assert _mode(path) == 0o600
    assert _mode(tmp_path / "etc") == 0o700
    assert _mode(tmp_path / "etc" / "fa-restic") == 0o700
    assert len(path.read_text(encoding="utf-8").strip()) >= 32
