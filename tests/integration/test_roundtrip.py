"""Back up and restore through the API with the real restic, compared byte for byte."""

from __future__ import annotations

import json
from typing import Any

from tests.conftest import Api
from tests.helpers import assert_same_tree, make_small_tree, run_restic


async def test_folder_round_trip_is_byte_identical(api: Api) -> None:
    source = make_small_tree(api.home("alice") / "project")
    status, body = await api.call("POST", "/backup", json={"id": 1, "path": "project"})
    assert (status, body["code"], body["message"]) == (200, 2001, "success")
    done = await api.wait("backup", 1)
    assert done["status"] == "success", done
    assert done["path"] == str(source)
    assert done["stat"]["total_size"] == 6 + 1000 + 100_000
    assert done["stat"]["pack_size"] > 0
    assert len(done["snapshot_id"]) == 64 and done["extra"] == ""

    status, body = await api.call(
        "POST", "/restore", json={"restore_id": 5, "backup_id": 1, "dst_path": "back/here"}
    )
    assert body["code"] == 2001, body
    restored = await api.wait("restore", 5)
    assert restored["status"] == "success", restored
    assert restored["stat"] == {"total_size": 6 + 1000 + 100_000, "pack_size": 0}
    assert_same_tree(source, api.home("alice") / "back" / "here")

    listed = run_restic(api.restic_binary, api.folder, "snapshots", "--json", "--tag", "fa:id=1")
    assert listed.returncode == 0, listed.stderr
    snapshots: list[dict[str, Any]] = json.loads(listed.stdout)
    assert [snapshot["id"] for snapshot in snapshots] == [done["snapshot_id"]]
    assert sorted(snapshots[0]["tags"]) == ["fa:id=1", "fa:user=alice"]
