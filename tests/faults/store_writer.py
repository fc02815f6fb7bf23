"""A program that writes job records through the real StateStore as fast as it can and
prints each id once its write was acknowledged (for tests that SIGKILL it).

    python store_writer.py STATE_FILE FIRST_ID

Small journal bound, so that compactions come one after another.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from fa_restic.jobs.records import LAYOUT
from fa_restic.store import Put, StateStore, Update
from fa_restic.store import state as state_module


def record(number: int, status: str) -> dict[str, object]:
    return {"id": number, "user": f"user{number % 50}", "status": status, "path": f"/p/{number}"}


async def main(path: Path, first: int) -> None:
    state_module.MIN_JOURNAL_BYTES = 256 << 10
    state_module.JOURNAL_RATIO = 0.05
    store = StateStore(path, LAYOUT)
    store.load()
    number = first
    while True:
        await store.write([Put("backup", str(number), record(number, "pending"))])
        await store.write([Update("backup", str(number), {"status": "success", "extra": "done"})])
        print(number, flush=True)
        number += 1


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2])))
