# mypy: disable-error-code="comparison-overlap,unreachable"
# (a record's status changes across awaits, by the event loop: mypy's narrowing cannot know)
"""destroy-repo's `backup_records_dropped` is the number of records its Clear removed, on
every store: not the store's counts(), which a database reads in the background and may
be a moment (here: an hour) old."""

from __future__ import annotations

import pytest

from fa_restic.jobs.intake import Caller
from fa_restic.names import JobStatus
from tests.jobs.conftest import ServiceMaker, until
from tests.jobs.stores import Backing, DatabaseBacking

pytestmark = pytest.mark.timeout(10)

ROOT = Caller("root", admin=True)


async def test_destroy_reports_every_backup_record_it_dropped(
    make_service: ServiceMaker, backing: Backing
) -> None:
    if isinstance(backing, DatabaseBacking):
        # A busy database: its counts are read at start and not again for an hour.
        backing.counts_delay = 3600.0
    # An earlier life of the service left two finished backups (on disk, not in memory).
    earlier = await make_service()
    for backup_id in (40, 41):
        await earlier.ended(await earlier.backup("carol", backup_id))
    await earlier.stop()

    harness = await make_service(max_running=1)
    done = await harness.ended(await harness.backup("alice", 1))
    assert done.status is JobStatus.SUCCESS
    gate = harness.restic.hold("backup:2")
    running = await harness.backup("alice", 2)
    await until(gate.entered.is_set, "backup 2 runs")
    waiting = await harness.backup("bob", 3)
    assert waiting.status is JobStatus.PENDING
    if isinstance(backing, DatabaseBacking):
        # The premise: the cached counts know only the two records there were at start.
        assert sum(harness.store.counts("backup").values()) == 2

    report = await harness.service.destroy_repository(ROOT)

    assert report["backup_records_dropped"] == 5, report
    assert running.status is JobStatus.CANCEL and waiting.status is JobStatus.CANCEL
    assert await harness.store.fetch_page("backup") == [], "no backup record is left"
    # A second destroy finds none to drop.
    again = await harness.service.destroy_repository(ROOT)
    assert again["backup_records_dropped"] == 0, again
