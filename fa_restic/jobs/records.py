"""The job records: in memory for the job layer, and how they are kept in the store.

This is the only module that knows the store's collections and how a record is
encoded in one. Every change of a record goes to the store before the request that
made it is answered.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any, TypeVar

from fa_restic.jobs.models import BackupRecord, ForgetRecord, JobRecord, RestoreRecord, rfc3339
from fa_restic.names import JobKind, JobStatus
from fa_restic.store import (
    Clear,
    Cleared,
    Collections,
    Delete,
    Layout,
    Operation,
    Put,
    Store,
    Update,
    Value,
)

Model = TypeVar("Model", BackupRecord, RestoreRecord)

BACKUPS = "backup"
RESTORES = "restore"
FORGETS = "forget"
"""Snapshots of deleted backups still to be forgotten, by snapshot id."""
META = "meta"
REPOSITORY_KEY = "repository"
UPKEEP_KEY = "upkeep"

JobKey = tuple[str, int]
"""(kind, id) of a backup or restore."""


def is_live(status: str, unsettled: bool) -> bool:
    """True for a record that may still change: pending, running, or with an attempt to settle.

    The one rule for which records stay objects in memory (Records) and lines the store
    reads at start (LAYOUT)."""
    return status in _ACTIVE or unsettled


def _is_live(value: dict[str, Any]) -> bool:
    return is_live(value.get("status", ""), bool(value.get("unsettled")))


_ACTIVE = frozenset({JobStatus.PENDING.value, JobStatus.RUNNING.value})

LAYOUT = Layout(
    indexed=frozenset({BACKUPS, RESTORES}),
    owner_field="user",
    label_field="status",
    is_live=_is_live,
)
"""How the store keeps job records: finished ones on disk, listed by user and by status."""


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
    """The backup and restore records, and the store that keeps them.

    `backups` and `restores` hold the live records (pending, running, or still to be
    settled) as objects the job layer changes; a finished record leaves them once written
    and is read from the store when asked for (a year of records is a million).
    """

    def __init__(self, store: Store, *, keep_pending: bool = True) -> None:
        """`keep_pending`: False in a cluster, where a pending job is any node's to claim
        and the store, not this node's memory, says what became of it."""
        self.store = store
        self.keep_pending = keep_pending
        self.backups: dict[int, BackupRecord] = {}
        self.restores: dict[int, RestoreRecord] = {}
        self._sequence = 0

    def load(self, collections: Collections) -> None:
        """Takes the live records read from the store (Store.load); without `keep_pending`,
        not the pending ones (a cluster's nodes claim them)."""
        self.backups = self._kept(collections.get(BACKUPS, {}), BackupRecord)
        self.restores = self._kept(collections.get(RESTORES, {}), RestoreRecord)
        self._sequence = max((record.sequence for record in self.every()), default=0)

    def _kept(self, values: dict[str, Value], model: type[Model]) -> dict[int, Model]:
        return {
            int(key): model.model_validate(value)
            for key, value in values.items()
            if self.keep_pending or value.get("status") != JobStatus.PENDING.value
        }

    def of(self, kind: str) -> dict[int, BackupRecord] | dict[int, RestoreRecord]:
        """Returns the live records of `kind`."""
        return self.backups if kind == JobKind.BACKUP else self.restores

    async def get(self, key: JobKey) -> BackupRecord | RestoreRecord | None:
        """Returns the record, live or finished, or None; raises OSError (the store).

        A live record is returned without waiting; a finished one is read from the store
        (meanwhile the record may have changed: a caller that writes checks `of` again)."""
        kind, job_id = key
        live = self.of(kind).get(job_id)
        if live is not None:
            return live
        value = await self.store.fetch(kind, str(job_id))
        if value is None:
            return None
        return self.of(kind).get(job_id) or _model(kind, value)

    async def backup(self, backup_id: int) -> BackupRecord | None:
        """Returns the backup record, live or finished, or None."""
        record = await self.get((JobKind.BACKUP, backup_id))
        assert record is None or isinstance(record, BackupRecord)
        return record

    async def restore(self, restore_id: int) -> RestoreRecord | None:
        """Returns the restore record, live or finished, or None."""
        record = await self.get((JobKind.RESTORE, restore_id))
        assert record is None or isinstance(record, RestoreRecord)
        return record

    def adopt(self, record: BackupRecord | RestoreRecord) -> None:
        """Holds a record this node now runs (a cluster's claim) among the live ones."""
        records: dict[int, Any] = self.of(key_of(record)[0])
        records[record.id] = record

    def let_go(self, key: JobKey) -> None:
        """Forgets a live record without writing it (this node no longer runs it)."""
        self.of(key[0]).pop(key[1], None)

    def every(self) -> Iterator[JobRecord]:
        """Yields every live record."""
        yield from self.backups.values()
        yield from self.restores.values()

    def with_status(self, status: JobStatus) -> list[JobRecord]:
        """Returns the live records with `status` (pending or running)."""
        return [record for record in self.every() if record.status is status]

    async def page(
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

        Through the store's indexes: the cost is the page's, whatever the number of records.
        """
        values = await self.store.fetch_page(
            kind,
            owner=user,
            label=None if status is None else status.value,
            before=after,
            limit=limit + 1,
        )
        live = self.of(kind)
        items: list[JobRecord] = []
        for value in values[:limit]:
            record = live.get(value["id"])
            items.append(record if record is not None else _model(kind, value))
        return items, (items[-1].id if len(values) > limit else None)

    def status_counts(self) -> dict[str, Counter[str]]:
        """Returns kind -> status -> how many records."""
        return {kind: Counter(self.store.counts(kind)) for kind in JobKind}

    def next_sequence(self) -> int:
        self._sequence += 1
        return self._sequence

    async def write(self, operations: Iterable[Operation]) -> Cleared:
        """Persists changes; returns how many records each Clear removed (Store.write).
        Raises OSError if they could not be written."""
        batch = list(operations)
        cleared = await self.store.write(batch)
        self._retire(batch)
        return cleared

    async def save(self, record: JobRecord, *more: Operation) -> None:
        """Persists a record whole, with other changes in the same batch."""
        await self.write([put(record), *more])

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

    def _retire(self, batch: Iterable[Operation]) -> None:
        """Lets go of live records the batch finished (the store has them now)."""
        for operation in batch:
            if operation.collection not in (BACKUPS, RESTORES) or isinstance(operation, Clear):
                continue
            records: dict[int, Any] = self.of(operation.collection)
            record = records.get(int(operation.key))
            if record is None:
                continue
            if not is_live(record.status.value, getattr(record, "unsettled", False)) or (
                record.status is JobStatus.PENDING and not self.keep_pending
            ):
                del records[record.id]

    @staticmethod
    def delete(kind: str, job_id: int) -> Delete:
        return Delete(kind, str(job_id))

    def clear(self, kind: str) -> Clear:
        """Returns the change that drops every record of `kind` (and drops the live ones)."""
        self.of(kind).clear()
        return Clear(kind)


def record_of(kind: str, value: dict[str, Any]) -> BackupRecord | RestoreRecord:
    """Returns the record of `kind` that a stored `value` holds."""
    return _model(kind, value)


def _model(kind: str, value: dict[str, Any]) -> BackupRecord | RestoreRecord:
    if kind == JobKind.BACKUP:
        return BackupRecord.model_validate(value)
    return RestoreRecord.model_validate(value)
