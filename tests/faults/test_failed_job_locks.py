"""SPEC §9: a job that ends `failed` leaves no lock of its own restic in the repository."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.faults.test_restic_faults import FAKES, baked_wrapper, post_backup
from tests.helpers import make_random_tree, run_restic


async def test_a_failed_backup_leaves_no_lock(
    make_api: Any, newest_restic: str, tmp_path: Path
) -> None:
    wrapper = baked_wrapper(
        tmp_path / "bin", "restic", f'exec "{FAKES / "dying_restic"}" "{newest_restic}" "$@"'
    )
    api = await make_api(str(wrapper))
    make_random_tree(api.home("alice") / "data", 4 << 20)

    await post_backup(api, 1, "data")
    data = await api.wait("backup", 1)

    assert data["status"] == "failed", data
    assert "simulated failure" in data["extra"], data
    # The moment the job says failed, the lock its dead restic left is gone.
    locks = run_restic(newest_restic, api.folder, "list", "locks", "--no-lock")
    assert locks.returncode == 0, locks.stderr
    assert locks.stdout.split() == []
