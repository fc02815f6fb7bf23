"""GET /metrics: Prometheus text that agrees with what GET shows, and names nobody."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Api
from tests.helpers import make_small_tree


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_metrics_follow_the_jobs_and_carry_no_names(
    make_api: Any, newest_restic: str
) -> None:
    api: Api = await make_api(newest_restic)
    make_small_tree(api.home("alice") / "secret-project")
    await api.call("POST", "/backup", json={"id": 41, "path": "secret-project"})
    backup = await api.wait("backup", 41)
    await api.call("POST", "/restore", json={"restore_id": 42, "backup_id": 41, "dst_path": "out"})
    restore = await api.wait("restore", 42)
    await api.call("POST", "/backup", json={"id": 43, "path": "missing"})  # refused: 400

    response = await api.client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    text = await response.text()
    values = samples(text)
    kind_status = (("kind", "backup"), ("status", "success"))
    assert values[("fa_restic_jobs", kind_status)] == 1
    assert values[("fa_restic_jobs", (("kind", "restore"), ("status", "success")))] == 1
    assert values[("fa_restic_jobs_finished_total", kind_status)] == 1
    assert values[("fa_restic_backup_processed_bytes_total", ())] == backup["stat"]["total_size"]
    assert values[("fa_restic_backup_added_bytes_total", ())] == backup["stat"]["pack_size"]
    assert values[("fa_restic_restore_bytes_total", ())] == restore["stat"]["total_size"]
    assert values[("fa_restic_queue_depth", ())] == 0
    assert values[("fa_restic_restic_duration_seconds_count", (("kind", "backup"),))] == 1
    assert any(name == "fa_restic_restic_info" for name, _ in values)
    assert values[("fa_restic_last_success_timestamp_seconds", (("kind", "backup"),))] > 0
    for private in ("alice", "secret-project", str(api.data_root)):
        assert private not in text, private
    label_values = {value for _, labels in values for _, value in labels}
    assert label_values <= {
        "backup",
        "restore",
        "pending",
        "running",
        "success",
        "failed",
        "cancel",
        newest_version(text),
    } | bucket_bounds(values)


def newest_version(text: str) -> str:
    for family in text_string_to_metric_families(text):
        if family.name == "fa_restic_restic_info":
            return str(family.samples[0].labels["version"])
    return ""


def bucket_bounds(values: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> set[str]:
    return {value for _, labels in values for key, value in labels if key == "le"}
