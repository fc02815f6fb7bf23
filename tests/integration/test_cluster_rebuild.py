"""`fa-restic rebuild-state` with `[cluster]`: the backup records rebuilt in the database
from the repository's tagged snapshots, with the real restic (every version under test) and
the throwaway PostgreSQL (tests/pg.py).

The database's records damaged (rows deleted, one changed, one made up), rebuild-state run
as the operator runs it: every backup is back with its snapshot and restores byte for byte,
the restore records and the queued forget are kept, a snapshot queued to be forgotten does
not come back, the replaced records are in a JSON lines file; while a node runs it refuses
and changes nothing; a write the database refuses leaves the old records.

The single node's rebuild (the state file) is tests/faults/test_state_faults.py's."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from fa_restic.cluster.database import Database
from fa_restic.cluster.records import DatabaseRecords
from fa_restic.cluster.store import DatabaseStore
from fa_restic.jobs.models import BackupRecord, ForgetRecord
from fa_restic.jobs.records import LAYOUT, put
from fa_restic.names import JobStatus
from fa_restic.store import Delete, Put, StateError, Update
from tests.conftest import Api
from tests.helpers import assert_same_tree, make_small_tree

pytestmark = pytest.mark.timeout(300)

UNKNOWN_JOB = 4001


def cluster_table(database_url: str) -> str:
    return f'\n[cluster]\ndatabase_url = "{database_url}"\nnode_name = "node-a"\n'


@pytest.fixture
async def records(database_url: str) -> AsyncIterator[DatabaseRecords]:
    """The database's records, read and written beside the service (as an operator might)."""
    database = Database(database_url)
    await database.open()
    await database.migrate()
    yield DatabaseRecords(database)
    await database.close()


async def rebuild(config: Path) -> subprocess.CompletedProcess[str]:
    """Runs `python -m fa_restic rebuild-state --config CONFIG` to its end."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("FA_", "RESTIC_"))}
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "fa_restic", "rebuild-state", "--config", str(config)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=180,
        stdin=subprocess.DEVNULL,
        check=False,
    )


async def backed_up(api: Api, backup_id: int, user: str, path: str) -> dict[str, Any]:
    status, body = await api.call("POST", "/backup", user, json={"id": backup_id, "path": path})
    assert (status, body["code"]) == (200, 2001), body
    done = await api.wait("backup", backup_id, user)
    assert done["status"] == "success", done
    return done


async def restored(
    api: Api, restore_id: int, user: str, backup_id: int, dst: str
) -> dict[str, Any]:
    status, body = await api.call(
        "POST",
        "/restore",
        user,
        json={"restore_id": restore_id, "backup_id": backup_id, "dst_path": dst},
    )
    assert (status, body["code"]) == (200, 2001), body
    done = await api.wait("restore", restore_id, user)
    assert done["status"] == "success", done
    return done


def read_copy(copy: Path) -> tuple[int, list[dict[str, Any]]]:
    """Returns the mode of a copy of replaced records, and its records (one a line)."""
    lines: list[dict[str, Any]] = [json.loads(line) for line in copy.read_text().splitlines()]
    return copy.stat().st_mode & 0o777, lines


def copies(folder: Path) -> list[Path]:
    return sorted(folder.glob("backup-records.before-rebuild-*.jsonl"))


async def test_rebuild_state_in_cluster_mode(
    make_api: Any,
    restic_binary: str,
    database_url: str,
    records: DatabaseRecords,
    tmp_path: Path,
) -> None:
    folder = tmp_path / "node"
    extra = cluster_table(database_url)
    api: Api = await make_api(restic_binary, folder=folder, extra=extra)
    project = make_small_tree(api.home("alice") / "project")
    notes = api.home("alice") / "notes.txt"
    notes.write_bytes(b"a single file backup\n" * 50)
    data = make_small_tree(api.home("bob") / "data")
    jobs = [(1, "alice", "project"), (2, "alice", "notes.txt"), (3, "bob", "data")]
    before = {
        backup_id: await backed_up(api, backup_id, user, path) for backup_id, user, path in jobs
    }
    deleted = await backed_up(api, 4, "alice", "project")
    restore = await restored(api, 5, "alice", 1, "first")
    await api.client.close()  # the node stops: its one node's lock is free

    # A delete whose forget had not run yet (the record gone, its snapshot queued), and
    # damage: two records lost, one changed, one that stands for no snapshot.
    stored_2 = await records.read("backup", 2)
    assert stored_2 is not None
    forget = ForgetRecord(
        snapshot_id=deleted["snapshot_id"], backup_id=4, user="alice", queued_at=datetime.now(UTC)
    )
    await records.write(
        [
            Delete("backup", "4"),
            Put("forget", forget.snapshot_id, forget.model_dump(mode="json")),
            Delete("backup", "1"),
            Delete("backup", "3"),
            Update("backup", "2", {"status": "failed", "snapshot_id": None}),
            Put("backup", "99", {**stored_2, "id": 99}),
        ]
    )
    restore_stored = await records.read("restore", 5)
    forgets_before = await records.every("forget")

    done = await rebuild(folder / "config.toml")

    assert done.returncode == 0, done.stderr + done.stdout
    assert "3 backup records from 4 snapshots (1 queued to be forgotten left out)" in done.stdout
    found = re.search(r"copied the 2 backup records it replaces to (\S+)", done.stdout)
    assert found is not None, done.stdout
    copy = Path(found.group(1))
    assert copies(folder) == [copy], "beside the config (the state file's folder)"
    mode, lines = read_copy(copy)
    assert mode == 0o600, oct(mode)
    assert sorted(line["id"] for line in lines) == [2, 99], lines
    damaged = next(line for line in lines if line["id"] == 2)
    assert (damaged["status"], damaged["snapshot_id"]) == ("failed", None)
    # Restores and the forget queue are as they were.
    assert await records.read("restore", 5) == restore_stored
    assert await records.every("forget") == forgets_before

    node: Api = await make_api(restic_binary, folder=folder, extra=extra)
    for backup_id, user, _ in jobs:
        body = await node.job("backup", backup_id, user)
        after, old = body["data"], before[backup_id]
        assert after is not None, body
        assert after["status"] == "success", after
        assert (after["id"], after["path"], after["snapshot_id"]) == (
            old["id"],
            old["path"],
            old["snapshot_id"],
        ), (old, after)
        assert after["stat"]["total_size"] == old["stat"]["total_size"], (old, after)
    assert (await node.job("backup", 3, "alice"))["code"] == UNKNOWN_JOB, "bob's, not alice's"
    assert (await node.job("backup", 4))["code"] == UNKNOWN_JOB, "queued to be forgotten"
    assert (await node.job("backup", 99))["code"] == UNKNOWN_JOB, "no snapshot of its own"
    assert (await node.job("restore", 5))["data"] == restore, "restores kept"
    # The kept forget runs. (Waited for before restoring: on restic 0.14 a restore starting
    # while a forget it preempted lets go of its lock once failed, in a run here, on that
    # lock's file vanishing under it, which is not what this test is about.)
    for _ in range(600):
        if not await records.every("forget"):
            break
        await asyncio.sleep(0.1)
    assert await records.every("forget") == {}, "the queued forget ran"
    await restored(node, 6, "bob", 3, "back")
    assert_same_tree(data, node.home("bob") / "back")
    await restored(node, 7, "alice", 1, "again")
    assert_same_tree(project, node.home("alice") / "again")
    assert (node.home("alice") / "first").exists() and notes.exists()

    # While a node runs, rebuild-state refuses with one line and changes nothing.
    ids = [value["id"] for value in await records.page("backup")]
    refused = await rebuild(folder / "config.toml")
    assert refused.returncode == 1, refused.stderr + refused.stdout
    said = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(said) == 1, said
    assert "a node is running on the database" in said[0], said
    assert "node-a" in said[0] and "stop every node first" in said[0], said
    assert [value["id"] for value in await records.page("backup")] == ids == [3, 2, 1]
    assert copies(folder) == [copy], "no copy: nothing was replaced"


async def test_a_rebuild_the_database_refuses_leaves_the_old_records(
    database_url: str, tmp_path: Path
) -> None:
    """Clear and Puts are one transaction: a record the database cannot take (a NUL in its
    path: jsonb has no \\u0000) fails the write after the Clear ran, and the old records stay."""
    from fa_restic.rebuild import _copy_backup_records, _replace_backup_records

    store = DatabaseStore(database_url, layout=LAYOUT, node="test")
    await store.start()
    try:
        moment = datetime.now(UTC)
        old = [
            BackupRecord(
                id=n, user="alice", path=f"/p{n}", status=JobStatus.SUCCESS, created_at=moment
            )
            for n in (1, 2)
        ]
        await store.write([put(record) for record in old])
        replaced, copy = await _copy_backup_records(store, tmp_path / "var")
        assert replaced == 2 and copy.parent == tmp_path / "var"
        bad = BackupRecord(
            id=3, user="alice", path="/a\x00b", status=JobStatus.SUCCESS, created_at=moment
        )
        with pytest.raises(StateError, match="its backup records are unchanged"):
            await _replace_backup_records(store, [bad], "the database", copy)
        assert [value["id"] for value in await store.fetch_page("backup")] == [2, 1]
        # The copy stays, and a second copy in the same second gets a name of its own.
        assert len(read_copy(copy)[1]) == 2
        _, second = await _copy_backup_records(store, tmp_path / "var")
        assert second != copy and copy.exists() and second.exists()
    finally:
        await store.stop()
