"""`fa-restic rebuild-state`: backup records rebuilt from the repository's tagged snapshots,
in the state file (a single node) or, with `[cluster]`, in the database; the snapshots make
the same records either way (records_from)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Container, Iterable
from datetime import UTC, datetime
from pathlib import Path

from fa_restic.api.auth import valid_username
from fa_restic.config import Settings
from fa_restic.jobs.models import BackupRecord
from fa_restic.jobs.records import BACKUPS, FORGETS, LAYOUT, RESTORES, put
from fa_restic.names import ID_TAG, USER_TAG, JobStatus
from fa_restic.restic.client import Restic
from fa_restic.restic.messages import Snapshot
from fa_restic.store import Clear, Put, StateError, StateStore, Store, Value
from fa_restic.store.files import dumps, fsync_folder, make_folders, open_private, write_all
from fa_restic.wiring import make_restic

log = logging.getLogger("fa_restic")


def _parse_time(text: str) -> datetime:
    try:
        # restic writes nanoseconds; Python takes microseconds.
        head, _, rest = text.partition(".")
        fraction = "".join(ch for ch in rest if ch.isdigit())[:6]
        zone = rest[len("".join(ch for ch in rest if ch.isdigit())) :] or "+00:00"
        zone = "+00:00" if zone == "Z" else zone
        return datetime.fromisoformat(f"{head}.{fraction or '0'}{zone}").astimezone(UTC)
    except ValueError:
        return datetime.now(UTC)


async def record_of(restic: Restic, snapshot: Snapshot) -> BackupRecord | None:
    """Returns the success record a tagged snapshot stands for, or None if it is not ours."""
    backup_id_text = snapshot.tag_value(ID_TAG)
    user = snapshot.tag_value(USER_TAG)
    if backup_id_text is None or not backup_id_text.isdigit() or not valid_username(user):
        return None
    assert user is not None
    backup_id = int(backup_id_text)
    total_size, pack_size = await restic.backup_sizes(snapshot)
    file_count = snapshot.summary.total_files_processed if snapshot.summary else 0
    moment = _parse_time(snapshot.time)
    return BackupRecord(
        id=backup_id,
        user=user,
        path=snapshot.paths[0] if snapshot.paths else "",
        status=JobStatus.SUCCESS,
        total_size=total_size,
        pack_size=pack_size,
        file_count=file_count,
        snapshot_id=snapshot.id,
        created_at=moment,
        started_at=moment,
        finished_at=moment,
        attempts=1,
    )


def _readable_records(path: Path) -> dict[str, dict[str, dict[str, object]]]:
    """Returns the restore records and queued forgets of an old state (none if unreadable)."""
    old = StateStore(path, LAYOUT)
    try:
        old.load()
        kept: dict[str, dict[str, dict[str, object]]] = {}
        for name in (RESTORES, FORGETS):
            kept[name] = {}
            for key in old.keys(name):
                value = old.read(name, key)
                if value is not None:
                    kept[name][key] = value
        return kept
    except StateError as error:
        log.warning("old state unreadable; restores and queued forgets not kept: %s", error)
        return {}
    finally:
        old.close()


async def records_from(
    restic: Restic, snapshots: list[Snapshot], forgotten: Container[str]
) -> dict[int, BackupRecord]:
    """Returns id -> the success record of each tagged snapshot (the newest snapshot of an
    id wins), leaving out the snapshots in `forgotten` (queued to be forgotten)."""
    records: dict[int, BackupRecord] = {}
    for snapshot in sorted(snapshots, key=lambda snapshot: snapshot.time):
        if snapshot.id in forgotten:
            continue
        record = await record_of(restic, snapshot)
        if record is not None:
            records[record.id] = record  # the newest snapshot of an id wins
    return records


async def rebuild_state(settings: Settings) -> int:
    """Writes a state file with one success record per tagged snapshot; returns the exit code.

    Run it while the service is stopped. A state file already there is moved aside;
    if it is readable, its restore records and its queued forgets are kept (a snapshot
    waiting to be forgotten does not come back as a record). With `[cluster]` the records
    are the database's: see rebuild_database.
    """
    if settings.cluster is not None:
        return await rebuild_database(settings)
    restic = await make_restic(settings)
    path = settings.paths.state_file
    kept: dict[str, dict[str, dict[str, object]]] = {}
    # The journal, its turned pieces (.journal.N) and the index go with the file.
    old_files = sorted(path.parent.glob(path.name + ".*")) if path.parent.exists() else []
    old_files = [found for found in old_files if ".before-rebuild-" not in found.name]
    if path.exists() or old_files:
        kept = _readable_records(path)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for old_file in [path, *old_files]:
            if old_file.exists():
                old_file.rename(old_file.with_name(f"{old_file.name}.before-rebuild-{stamp}"))
                log.warning("moved %s aside", old_file)
    snapshots = await restic.snapshots()
    records = await records_from(restic, snapshots, kept.get(FORGETS, {}))
    store = StateStore(path, LAYOUT)
    store.load()
    operations = [put(record) for record in records.values()]
    for name, values in kept.items():
        operations += [Put(name, key, value) for key, value in values.items()]
    await store.write(operations)
    await store.stop()
    log.info("rebuilt %s: %d backup records from %d snapshots", path, len(records), len(snapshots))
    print(f"rebuilt {path}: {len(records)} backup records from {len(snapshots)} snapshots")
    return 0


# -- with [cluster]: the records in the database ---------------------------------------------

COPY_NAME = "backup-records.before-rebuild-{stamp}.jsonl"


async def rebuild_database(settings: Settings) -> int:
    """Replaces the database's backup records with one success record per tagged snapshot;
    returns the exit code.

    Holds the database alone first (DatabaseStore.start with `alone`: the nodes' lock,
    which every running node holds shared, taken exclusive): while any node runs it refuses
    with one line (a StateError) and changes nothing, and no node starts while it runs.
    Restore records and queued forgets stay as they are, and a snapshot queued to be
    forgotten does not come back. The backup
    records it replaces are first copied, one JSON record per line, to
    `backup-records.before-rebuild-<time>.jsonl` in the state file's folder; then one
    transaction clears them and puts the rebuilt ones, so a failure leaves them as they were.

    Raises StateError (one line; the database unreachable or refusing the records) or
    ResticError.
    """
    from fa_restic.cluster.store import DatabaseInUse, DatabaseStore, redact

    assert settings.cluster is not None
    url = settings.cluster.database_url.get_secret_value()
    shown = redact(url)
    store = DatabaseStore(
        url, layout=LAYOUT, node=f"{settings.cluster.node_name} rebuild-state", alone=True
    )
    try:
        collections = await store.start()
    except DatabaseInUse as error:
        raise StateError(
            f"rebuild-state: a node is running on the database {shown} ({error.holder}): "
            "stop every node first; nothing was changed"
        ) from None
    try:
        restic = await make_restic(settings)
        snapshots = await restic.snapshots()
        forgotten = collections.get(FORGETS, {})
        records = await records_from(restic, snapshots, forgotten)
        replaced, copy = await _copy_backup_records(store, settings.paths.state_file.parent)
        print(f"copied the {replaced} backup records it replaces to {copy}")
        await _replace_backup_records(store, records.values(), shown, copy)
    finally:
        await store.stop()
    skipped = sum(1 for snapshot in snapshots if snapshot.id in forgotten)
    queued = f" ({skipped} queued to be forgotten left out)" if skipped else ""
    log.info(
        "rebuilt the backup records in %s: %d from %d snapshots",
        shown,
        len(records),
        len(snapshots),
    )
    print(
        f"rebuilt the backup records in the database {shown}: "
        f"{len(records)} backup records from {len(snapshots)} snapshots{queued}"
    )
    return 0


async def _copy_backup_records(store: Store, folder: Path) -> tuple[int, Path]:
    """Writes every backup record of `store` to a new JSON lines file in `folder` (mode 0600,
    fsynced); returns how many, and the file."""
    values: list[Value] = []
    before: int | None = None
    while True:
        page = await store.fetch_page(BACKUPS, before=before, limit=1000)
        values.extend(page)
        if len(page) < 1000:
            break
        before = int(page[-1]["id"])
    try:
        return len(values), await asyncio.to_thread(_write_lines, folder, values)
    except OSError as error:
        raise StateError(
            f"rebuild-state: cannot copy the backup records to {folder} ({error}); "
            "nothing was changed"
        ) from None


def _write_lines(folder: Path, values: list[Value]) -> Path:
    """Returns a new file in `folder` holding `values`, one JSON document a line."""
    make_folders(folder)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for attempt in itertools.count(1):
        name = COPY_NAME.format(stamp=stamp if attempt == 1 else f"{stamp}-{attempt}")
        try:
            # A new file: a copy of an earlier rebuild in the same second is kept.
            descriptor = open_private(folder / name, os.O_WRONLY | os.O_EXCL)
        except FileExistsError:
            continue
        break
    try:
        write_all(descriptor, b"".join(dumps(value) + b"\n" for value in values))
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    fsync_folder(folder)
    return folder / name


async def _replace_backup_records(
    store: Store, records: Iterable[BackupRecord], shown: str, copy: Path
) -> None:
    """Clears the backup records of `store` and puts `records`, in one write (one
    transaction); raises StateError, the old records unchanged, when it fails."""
    import psycopg  # only a node in cluster mode needs the driver

    try:
        await store.write([Clear(BACKUPS), *(put(record) for record in records)])
    except (OSError, psycopg.Error) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise StateError(
            f"rebuild-state: the database {shown} did not take the rebuilt records ({reason}); "
            f"its backup records are unchanged (a copy is in {copy})"
        ) from None
