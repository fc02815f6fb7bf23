"""The cluster's tests: a pool on a fresh database of the throwaway PostgreSQL (tests/pg.py,
offered by tests/conftest.py), its schema in place."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from fa_restic.cluster.database import Database
from fa_restic.cluster.records import DatabaseRecords


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    """An open pool on a new database whose schema is in place."""
    async with Database(database_url, timeout=10.0) as opened:
        await opened.migrate()
        yield opened


@pytest.fixture
async def records(database: Database) -> DatabaseRecords:
    return DatabaseRecords(database)
