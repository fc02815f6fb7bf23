"""A repository behind HTTP: a real restic-rest-server, on every restic version under test."""

from __future__ import annotations

import json
from typing import Any

from fa_restic.restic.messages import parse_snapshots
from tests.conftest import Api, RestServer
from tests.helpers import API, assert_same_tree, make_small_tree, run_restic


async def test_round_trip_through_rest_server(
    make_api: Any, restic_binary: str, rest_server: RestServer
) -> None:
    url = rest_server.repository("r1")
    api: Api = await make_api(restic_binary, repository_url=url)
    source = make_small_tree(api.home("alice") / "project")

    status, body = await api.call("POST", "/backup", json={"id": 1, "path": "project"})
    assert (status, body["code"]) == (200, 2001), body
    done = await api.wait("backup", 1)
    assert done["status"] == "success", done
    assert done["stat"]["total_size"] == 6 + 1000 + 100_000
    assert done["stat"]["pack_size"] > 0
    assert len(done["snapshot_id"]) == 64 and done["extra"] == ""

    # The repository lives in the rest-server's folder, not beside the service.
    assert (rest_server.folder / "r1" / "config").is_file()
    assert not (api.folder / "repo").exists()

    status, body = await api.call(
        "POST", "/restore", json={"restore_id": 1, "backup_id": 1, "dst_path": "back"}
    )
    assert body["code"] == 2001, body
    restored = await api.wait("restore", 1)
    assert restored["status"] == "success", restored
    assert restored["stat"] == {"total_size": 6 + 1000 + 100_000, "pack_size": 0}
    assert_same_tree(source, api.home("alice") / "back")

    # An operator reaches the same repository with restic itself.
    listed = run_restic(
        restic_binary, api.folder, "snapshots", "--json", "--tag", "fa:id=1", repository_url=url
    )
    assert listed.returncode == 0, listed.stderr
    assert [snapshot.id for snapshot in parse_snapshots(listed.stdout)] == [done["snapshot_id"]]
    assert sorted(json.loads(listed.stdout)[0]["tags"]) == ["fa:id=1", "fa:user=alice"]

    response = await api.client.get(f"{API}/healthz")
    assert (await response.json())["data"]["repository"] == "ok"
