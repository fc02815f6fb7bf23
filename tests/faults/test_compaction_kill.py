"""SIGKILL of a process while its store folds the journal in: nothing acknowledged is lost."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fa_restic.jobs.records import LAYOUT
from fa_restic.store import Put, StateStore

WRITER = Path(__file__).parent / "store_writer.py"
PREFILLED = 30_000
DELAYS = (0.0, 0.005, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8)
"""Seconds from seeing a compaction start (a turned journal) to the SIGKILL."""


def _prefill(path: Path) -> None:
    async def fill() -> None:
        store = StateStore(path, LAYOUT)
        store.load()
        for first in range(1, PREFILLED + 1, 5_000):
            await store.write(
                Put("backup", str(n), {"id": n, "user": f"user{n % 50}", "status": "success"})
                for n in range(first, first + 5_000)
            )
        await store.settled()
        store.close()

    asyncio.run(fill())


def _compacting(folder: Path) -> bool:
    return any(name.startswith("state.json.journal.") for name in os.listdir(folder))


def _kill_while_compacting(path: Path, first: int, delay: float) -> tuple[list[int], set[str]]:
    """Runs the writer until a compaction starts, kills it `delay` s later; returns the
    acknowledged ids and the files left."""
    acknowledged: list[int] = []
    writer = subprocess.Popen(
        [sys.executable, str(WRITER), str(path), str(first)],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).parents[2],
    )
    assert writer.stdout is not None
    stdout = writer.stdout
    reader = threading.Thread(
        target=lambda: acknowledged.extend(int(line) for line in stdout), daemon=True
    )
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not _compacting(path.parent):
            assert writer.poll() is None, "the writer died"
            assert time.monotonic() < deadline, "no compaction started"
            time.sleep(0.0005)
        time.sleep(delay)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        reader.join()
        stdout.close()
    return acknowledged, set(os.listdir(path.parent))


@pytest.mark.slow
def test_sigkill_during_compaction_at_several_moments_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "state" / "state.json"
    _prefill(path)
    everything: set[int] = set(range(1, PREFILLED + 1))
    moments: list[str] = []
    half_done: set[str] = set()
    """Ids whose pending record may have been written before the kill, not yet its end."""
    first = 1_000_000
    for delay in DELAYS:
        acknowledged, left = _kill_while_compacting(path, first, delay)
        assert acknowledged, "the writer acknowledged writes before the kill"
        everything.update(acknowledged)
        first = max(acknowledged) + 10
        half_done.add(str(max(acknowledged) + 1))
        moments.append(
            "turned journal" * any(".journal." in name for name in left)
            + " temporary file" * any(name.endswith(".tmp") for name in left)
            or "between compactions"
        )
        store = StateStore(path, LAYOUT)
        try:
            assert store.load().get("backup", {}).keys() <= half_done
            counts = store.counts("backup")
            assert counts["success"] >= len(everything), (delay, counts)
            for number in acknowledged[-50:]:
                stored = store.read("backup", str(number))
                assert stored is not None and stored["extra"] == "done", (delay, number)
            assert store.read("backup", "1") is not None
        finally:
            store.close()
    print("killed during:", moments)
    assert sum("turned journal" in moment for moment in moments) >= len(DELAYS) // 2, moments
    store = StateStore(path, LAYOUT)
    try:
        store.load()
        listed = store.page("backup", limit=len(everything) + 100)
        missing = everything - {value["id"] for value in listed}
        assert not missing, sorted(missing)[:10]
    finally:
        store.close()
