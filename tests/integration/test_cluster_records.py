"""The service with `[cluster]`: its records in a real PostgreSQL (the throwaway server of
tests/pg.py), backups and restores by the real restic on every version under test (SPEC §10).

A backup and a restore round trip, GETs and listing pages of the records, a restart on the
same database, a second process under a node's name refused while it runs (a node of
another name starts beside it), and a single node's state file moved with
`fa-restic import-state` and served in cluster mode."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from fa_restic.store import StateError
from tests.conftest import Api
from tests.helpers import assert_same_tree, make_small_tree

pytestmark = pytest.mark.timeout(300)


def cluster_table(database_url: str, node: str = "node-a") -> str:
    return f'\n[cluster]\ndatabase_url = "{database_url}"\nnode_name = "{node}"\n'


async def backed_up(api: Api, backup_id: int, folder: str) -> dict[str, Any]:
    status, body = await api.call("POST", "/backup", json={"id": backup_id, "path": folder})
    assert (status, body["code"]) == (200, 2001), body
    done = await api.wait("backup", backup_id)
    assert done["status"] == "success", done
    return done


async def restored(api: Api, restore_id: int, backup_id: int, dst: str) -> dict[str, Any]:
    status, body = await api.call(
        "POST", "/restore", json={"restore_id": restore_id, "backup_id": backup_id, "dst_path": dst}
    )
    assert (status, body["code"]) == (200, 2001), body
    done = await api.wait("restore", restore_id)
    assert done["status"] == "success", done
    return done


async def database_ids(database_url: str, kind: str) -> list[int]:
    """Returns the ids of `kind` the database holds, read beside the service."""
    async with await psycopg.AsyncConnection.connect(database_url) as connection:
        cursor = await connection.execute(
            "SELECT id FROM jobs WHERE kind = %s ORDER BY id", (kind,)
        )
        return [row[0] for row in await cursor.fetchall()]


async def test_records_in_postgresql_round_trip_and_restart(
    make_api: Any, restic_binary: str, database_url: str, tmp_path: Path
) -> None:
    folder = tmp_path / "node"
    api: Api = await make_api(restic_binary, folder=folder, extra=cluster_table(database_url))
    _, health = await api.call("GET", "/healthz", None)
    assert (health["data"]["node"], health["data"]["database"]) == ("node-a", "ok"), health

    source = make_small_tree(api.home("alice") / "project")
    first = await backed_up(api, 1, "project")
    second = await backed_up(api, 2, "project")
    assert len(first["snapshot_id"]) == 64 and first["path"] == str(source)
    restore = await restored(api, 5, 1, "back/here")
    assert restore["stat"]["total_size"] == 6 + 1000 + 100_000
    assert_same_tree(source, api.home("alice") / "back" / "here")

    # The records are the database's, not a state file's.
    assert await database_ids(database_url, "backup") == [1, 2]
    assert await database_ids(database_url, "restore") == [5]
    assert not (folder / "state.json").exists()
    # GETs of finished records and listing pages go to the database.
    assert (await api.job("backup", 1))["data"] == first
    assert (await api.job("backup", 1, user="bob"))["code"] == 4001, "not bob's"
    _, page = await api.call("GET", "/backup?limit=1")
    assert [item["id"] for item in page["data"]["items"]] == [2]
    assert page["data"]["next_after"] == 2
    _, page = await api.call("GET", "/backup?limit=1&after=2&status=success")
    assert page["data"] == {"items": [first], "next_after": None}
    _, page = await api.call("GET", "/restore")
    assert [item["restore_id"] for item in page["data"]["items"]] == [5]

    # A second process under this node's name is refused while it runs; a node of another
    # name starts beside it and reads the same records.
    with pytest.raises(StateError, match="node name 'node-a' is in use by fa-restic node-a"):
        await make_api(restic_binary, folder=tmp_path / "twin", extra=cluster_table(database_url))
    other: Api = await make_api(
        restic_binary, folder=tmp_path / "other", extra=cluster_table(database_url, "node-b")
    )
    assert (await other.job("backup", 1))["data"] == first
    # Gone before more jobs are queued: its repository is a folder of its own, not the one
    # the cluster's nodes would share.
    await other.client.close()

    # Restarted on the same database: every record is there, and works.
    await api.client.close()
    again: Api = await make_api(restic_binary, folder=folder, extra=cluster_table(database_url))
    assert (await again.job("backup", 1))["data"] == first
    assert (await again.job("backup", 2))["data"] == second
    assert (await again.job("restore", 5))["data"] == restore
    await restored(again, 6, 2, "again")
    assert_same_tree(source, again.home("alice") / "again")
    _, page = await again.call("GET", "/restore")
    assert [item["restore_id"] for item in page["data"]["items"]] == [6, 5]


async def test_a_single_nodes_records_imported_are_served_in_cluster_mode(
    make_api: Any, newest_restic: str, database_url: str, tmp_path: Path
) -> None:
    folder = tmp_path / "node"
    single: Api = await make_api(newest_restic, folder=folder)
    source = make_small_tree(single.home("alice") / "project")
    done = await backed_up(single, 1, "project")
    restore = await restored(single, 5, 1, "first")
    status, body = await single.call("POST", "/backup/cancel", json={"id": 1})
    assert body["code"] == 400, "finished: nothing to cancel"
    await single.client.close()
    assert (folder / "state.json").exists()

    # The operator's step, with the real command line: the URL from the environment.
    environment = {**os.environ, "FA_DATABASE_URL": database_url}
    imported = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "fa_restic", "import-state", "--from", str(folder / "state.json")],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
        check=False,
    )
    assert imported.returncode == 0, imported.stderr + imported.stdout
    assert "every record of" in imported.stdout

    node: Api = await make_api(newest_restic, folder=folder, extra=cluster_table(database_url))
    assert (await node.job("backup", 1))["data"] == done
    assert (await node.job("restore", 5))["data"] == restore
    _, page = await node.call("GET", "/backup")
    assert page["data"] == {"items": [done], "next_after": None}
    # The imported backup restores, and the id it holds is in use across the move.
    await restored(node, 6, 1, "second")
    assert_same_tree(source, node.home("alice") / "second")
    status, body = await node.call("POST", "/backup", json={"id": 1, "path": "project"})
    assert (status, body["code"]) == (400, 400), body
    assert await database_ids(database_url, "restore") == [5, 6]


async def test_a_node_without_its_database_answers_503_and_recovers(
    make_api: Any, newest_restic: str, database_url: str, postgres_server: Any
) -> None:
    """SPEC §10: a node that loses the database answers 503 where it needs it (the envelope,
    nothing written), and works again by itself once the database is back."""
    api: Api = await make_api(newest_restic, extra=cluster_table(database_url))
    make_small_tree(api.home("alice") / "project")
    await backed_up(api, 1, "project")

    await asyncio.to_thread(postgres_server.stop)
    try:
        status, body = await api.call("GET", "/backup/1")  # finished: read from the database
        assert (status, body["code"], body["data"]) == (503, 503, None), body
        assert body["message"].startswith("err when load backup: records unavailable"), body
        status, body = await api.call("POST", "/backup", json={"id": 2, "path": "project"})
        assert (status, body["code"]) == (503, 503), body
        status, body = await api.call("GET", "/backup?limit=5")
        assert (status, body["code"]) == (503, 503), body
    finally:
        await asyncio.to_thread(postgres_server.start)

    async def answered() -> dict[str, Any]:
        for _ in range(100):
            status, body = await api.call("GET", "/backup/1")
            if status == 200:
                return body
            await asyncio.sleep(0.1)
        raise AssertionError(f"no recovery: {body}")

    assert (await answered())["data"]["status"] == "success"
    assert (await api.job("backup", 2))["code"] == 4001, "the refused POST left a record"
    await backed_up(api, 2, "project")
    assert await database_ids(database_url, "backup") == [1, 2]
