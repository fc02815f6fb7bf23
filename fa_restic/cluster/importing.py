"""`fa-restic import-state`: a single node's records moved into the cluster's database.

Every record of every collection is read from the state file (through StateStore, as
`rebuild-state` reads an old state) and put into the database in batches. A put replaces a
record of the same key, so running the import again gives the same database; records the
database already held under other keys stay. Run it while the single node is stopped.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from fa_restic.cluster.database import Database
from fa_restic.cluster.records import COLLECTIONS, JOB_COLLECTIONS, DatabaseRecords
from fa_restic.store import Layout, Operation, Put, StateStore

log = logging.getLogger("fa_restic.cluster")

BATCH_SIZE = 2000
"""Records per transaction: large enough that round trips do not dominate, small enough
that one batch is a few MB."""


@dataclass(frozen=True)
class Moved:
    """One collection after an import."""

    collection: str
    from_state: int
    """Records the state file holds (all of them were put)."""
    in_database: int
    """Records the database holds now."""
    state_counts: dict[str, int]
    database_counts: dict[str, int]
    """Status -> records, for backups and restores (empty for the other collections)."""

    @property
    def complete(self) -> bool:
        """True when the database holds at least every record of the state, status by
        status (it may hold more: records of the cluster the state never had)."""
        if self.in_database < self.from_state:
            return False
        return all(
            self.database_counts.get(status, 0) >= count
            for status, count in self.state_counts.items()
        )

    def describe(self) -> str:
        """Returns one line saying what moved."""
        line = f"{self.collection}: {self.from_state} records imported"
        if self.in_database != self.from_state:
            line += f", the database holds {self.in_database}"
        if self.state_counts:
            statuses = ", ".join(
                f"{status} {count}" for status, count in sorted(self.state_counts.items())
            )
            line += f" ({statuses})"
        return line


async def import_records(
    state: StateStore, records: DatabaseRecords, *, batch_size: int = BATCH_SIZE
) -> list[Moved]:
    """Puts every record of a loaded `state` into the database; returns, per collection,
    what the state held and what the database holds now.

    Raises DatabaseUnavailable (the batches committed before stay: running it again
    finishes the work) or StateError for an unreadable record.
    """
    moved: list[Moved] = []
    highest_sequence = 0
    for collection in COLLECTIONS:
        batch: list[Operation] = []
        found = 0
        for key in state.keys(collection):
            value = state.read(collection, key)
            if value is None:
                continue
            found += 1
            if collection in JOB_COLLECTIONS:
                highest_sequence = max(highest_sequence, int(value.get("sequence") or 0))
            batch.append(Put(collection, key, value))
            if len(batch) >= batch_size:
                await records.write(batch)
                batch = []
        await records.write(batch)
        is_jobs = collection in JOB_COLLECTIONS
        moved.append(
            Moved(
                collection=collection,
                from_state=found,
                in_database=await records.total(collection),
                state_counts=state.counts(collection) if is_jobs else {},
                database_counts=await records.counts(collection) if is_jobs else {},
            )
        )
        log.info("import-state: %s", moved[-1].describe())
    # Jobs queued on the cluster from now on start after those imported.
    await records.raise_sequence(highest_sequence)
    # The planner's statistics, fresh for the nodes about to start: left to autovacuum,
    # a node's reading of finished records at start sorted the whole table per page.
    await records.analyze()
    return moved


async def _import_into(state: StateStore, database_url: str) -> list[Moved]:
    async with Database(database_url) as database:
        await database.migrate()
        return await import_records(state, DatabaseRecords(database))


def import_state_file(path: Path, database_url: str, layout: Layout) -> int:
    """Imports the state file at `path` (of `layout`, the job layer's) into the database,
    whose schema it brings up to date; prints what moved and returns the exit code: 0 when
    the database holds every record, else 1.

    Raises StateError when the state cannot be read, DatabaseUnavailable when the database
    cannot be reached.
    """
    # StateStore would make a new, empty state where there is none.
    if not path.exists():
        print(f"import-state: no state file at {path}")
        return 1
    state = StateStore(path, layout)
    try:
        state.load()
        moved = asyncio.run(_import_into(state, database_url))
    finally:
        state.close()
    for collection in moved:
        print(f"import-state: {collection.describe()}")
    missing = [collection.collection for collection in moved if not collection.complete]
    if missing:
        print(f"import-state: the database lacks records of {', '.join(missing)}")
        return 1
    print(f"import-state: every record of {path} is in the database")
    return 0
