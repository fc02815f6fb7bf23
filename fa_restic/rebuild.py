"""`fa-restic rebuild-state`: backup records rebuilt from the repository's tagged snapshots."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from pathlib import Path

from fa_restic.api.auth import valid_username
from fa_restic.config import Settings
from fa_restic.jobs.models import BackupRecord
from fa_restic.jobs.records import FORGETS, LAYOUT, RESTORES, put
from fa_restic.names import ID_TAG, USER_TAG, JobStatus
from fa_restic.restic.client import Restic
from fa_restic.restic.messages import Snapshot
from fa_restic.store import Put, StateError, StateStore
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


async def rebuild_state(settings: Settings) -> int:
    """Writes a state file with one success record per tagged snapshot; returns the exit code.

    Run it while the service is stopped. A state file already there is moved aside;
    if it is readable, its restore records and its queued forgets are kept (a snapshot
    waiting to be forgotten does not come back as a record).
    """
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
    records: dict[int, BackupRecord] = {}
    for snapshot in sorted(snapshots, key=lambda snapshot: snapshot.time):
        if snapshot.id in kept.get(FORGETS, {}):
            continue
        record = await record_of(restic, snapshot)
        if record is not None:
            records[record.id] = record  # the newest snapshot of an id wins
    store = StateStore(path, LAYOUT)
    store.load()
    operations = [put(record) for record in records.values()]
    for name, values in kept.items():
        operations += [Put(name, key, value) for key, value in values.items()]
    await store.write(operations)
    store.close()
    log.info("rebuilt %s: %d backup records from %d snapshots", path, len(records), len(snapshots))
    print(f"rebuilt {path}: {len(records)} backup records from {len(snapshots)} snapshots")
    return 0
