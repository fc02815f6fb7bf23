"""The job records: in memory for the job layer, and how they are kept in the store.

This is the only module that knows the store's collections and how a record is
encoded in one. Every change of a record goes to the store before the request that
made it is answered.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

from fa_restic.jobs.models import BackupRecord, ForgetRecord, JobRecord, RestoreRecord, rfc3339
from fa_restic.names import JobKind, JobStatus
from fa_restic.store import Collections, Delete, Operation, Put, Store, Update

BACKUPS = "backup"
RESTORES = "restore"
FORGETS = "forget"
"""Snapshots of deleted backups still to be forgotten, by snapshot id."""
META = "meta"
REPOSITORY_KEY = "repository"
UPKEEP_KEY = "upkeep"

JobKey = tuple[str, int]
"""(kind, id) of a backup or restore."""


def key_of(record: JobRecord) -> JobKey:
    return (JobKind.BACKUP if isinstance(record, BackupRecord) else JobKind.RESTORE, record.id)


def put(record: JobRecord) -> Put:
    """Returns the change that stores `record` whole."""
    return Put(key_of(record)[0], str(record.id), record.model_dump(mode="json"))


def cancelled_in_queue_fields(extra: str, at: datetime) -> dict[str, Any]:
    """Returns what changes when a pending job is cancelled: shared by a cancel-all's
    records (one cancel-all writes 50,000 of them; the whole records would be five times
    the bytes)."""
    return {
        "status": JobStatus.CANCEL.value,
        "extra": extra,
        "finished_at": rfc3339(at),
        "pid": None,
        "pid_start": None,
    }


def update(record: JobRecord, fields: dict[str, Any]) -> Update:
    """Returns the change that stores only `fields` of `record`."""
    return Update(key_of(record)[0], str(record.id), fields)


def forget_put(forget: ForgetRecord) -> Put:
    return Put(FORGETS, forget.snapshot_id, forget.model_dump(mode="json"))


def forget_delete(snapshot_id: str) -> Delete:
    return Delete(FORGETS, snapshot_id)


def meta_put(key: str, value: dict[str, Any]) -> Put:
    return Put(META, key, value)


def forgets_in(collections: Collections) -> dict[str, ForgetRecord]:
    """Returns the forget queue read from the store."""
    return {
        key: ForgetRecord.model_validate(value)
        for key, value in collections.get(FORGETS, {}).items()
    }


def meta_in(collections: Collections, key: str) -> dict[str, Any]:
    """Returns one saved meta value (empty if none)."""
    return dict(collections.get(META, {}).get(key, {}))


class Records:
    """Every backup and restore record, and the store that keeps them."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.backups: dict[int, BackupRecord] = {}
        self.restores: dict[int, RestoreRecord] = {}
        self._sequence = 0

    def load(self, collections: Collections) -> None:
        """Takes the records read from the store."""
        self.backups = {
            int(key): BackupRecord.model_validate(value)
            for key, value in collections.get(BACKUPS, {}).items()
        }
        self.restores = {
            int(key): RestoreRecord.model_validate(value)
            for key, value in collections.get(RESTORES, {}).items()
        }
        self._sequence = max((record.sequence for record in self.every()), default=0)

    def of(self, kind: str) -> dict[int, BackupRecord] | dict[int, RestoreRecord]:
        return self.backups if kind == JobKind.BACKUP else self.restores

    def get(self, key: JobKey) -> BackupRecord | RestoreRecord | None:
        kind, job_id = key
        return self.backups.get(job_id) if kind == JobKind.BACKUP else self.restores.get(job_id)

    def every(self) -> Iterator[JobRecord]:
        yield from self.backups.values()
        yield from self.restores.values()

    def with_status(self, status: JobStatus) -> list[JobRecord]:
        return [record for record in self.every() if record.status is status]

    def page(
        self,
        kind: str,
        *,
        user: str | None = None,
        status: JobStatus | None = None,
        after: int | None = None,
        limit: int = 100,
    ) -> tuple[list[JobRecord], int | None]:
        """Returns up to `limit` records of `kind` (of `user`, with `status`, if given) with
        an id below `after`, newest id first; and the `after` of the next page (None at the end).
        """
        chosen = sorted(
            (
                record
                for record in self.of(kind).values()
                if (user is None or record.user == user)
                and (status is None or record.status is status)
                and (after is None or record.id < after)
            ),
            key=lambda record: record.id,
            reverse=True,
        )
        items: list[JobRecord] = list(chosen[:limit])
        return items, (items[-1].id if len(chosen) > limit else None)

    def status_counts(self) -> dict[str, Counter[str]]:
        """Returns kind -> status -> how many records."""
        return {
            kind: Counter(record.status.value for record in self.of(kind).values())
            for kind in JobKind
        }

    def next_sequence(self) -> int:
        self._sequence += 1
        return self._sequence

    async def write(self, operations: Iterable[Operation]) -> None:
        """Persists changes; raises OSError if they could not be written."""
        await self.store.write(operations)

    async def save(self, record: JobRecord, *more: Operation) -> None:
        """Persists a record whole, with other changes in the same batch."""
        await self.store.write([put(record), *more])

    async def add(self, record: BackupRecord | RestoreRecord) -> None:
        """Adds a record and writes it; raises OSError, with the old record back, if it fails."""
        records: dict[int, Any] = self.of(key_of(record)[0])
        previous = records.get(record.id)
        records[record.id] = record
        try:
            await self.save(record)
        except OSError:
            if previous is None:
                del records[record.id]
            else:
                records[record.id] = previous
            raise

    @staticmethod
    def delete(kind: str, job_id: int) -> Delete:
        return Delete(kind, str(job_id))
