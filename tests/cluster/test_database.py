"""The pool, the schema migrations and outages, against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest

from fa_restic.cluster import database as database_module
from fa_restic.cluster.database import Database, DatabaseUnavailable, Migration, migrations
from fa_restic.cluster.records import DatabaseRecords
from tests.helpers import free_port
from tests.pg import PostgresServer


async def _versions(url: str) -> list[int]:
    async with await psycopg.AsyncConnection.connect(url) as connection:
        cursor = await connection.execute("SELECT version FROM schema_version ORDER BY version")
        return [row[0] for row in await cursor.fetchall()]


async def _tables(url: str) -> set[str]:
    async with await psycopg.AsyncConnection.connect(url) as connection:
        cursor = await connection.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        )
        return {row[0] for row in await cursor.fetchall()}


def test_schema_files_are_numbered_in_order() -> None:
    found = migrations()
    versions = [migration.version for migration in found]
    assert versions == list(range(1, len(found) + 1))
    assert found[0].name == "001_records.sql"
    assert all(migration.text.strip() for migration in found)


async def test_migrate_applies_each_file_once(database_url: str) -> None:
    async with Database(database_url) as database:
        first = await database.migrate()
        second = await database.migrate()
    every = [migration.version for migration in migrations()]
    assert first == every
    assert second == []
    assert await _versions(database_url) == every
    assert {"jobs", "forgets", "meta", "nodes", "turns", "schema_version"} <= await _tables(
        database_url
    )


async def test_nodes_starting_at_once_migrate_exactly_once(database_url: str) -> None:
    nodes = [Database(database_url, max_size=1) for _ in range(4)]
    for node in nodes:
        await node.open()
    try:
        # Without the advisory lock two of them would both create the tables and all but one
        # would fail on "relation already exists".
        results = await asyncio.gather(*(node.migrate() for node in nodes))
    finally:
        for node in nodes:
            await node.close()
    applied = sorted(version for result in results for version in result)
    assert applied == [migration.version for migration in migrations()]
    assert sum(1 for result in results if result) == 1
    assert await _versions(database_url) == applied


async def test_a_failing_file_applies_nothing(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = Migration(99, "099_broken.sql", "CREATE TABLE half_done (x int); SELECT 1 / 0;")
    monkeypatch.setattr(database_module, "migrations", lambda: [*migrations(), broken])
    async with Database(database_url) as database:
        with pytest.raises(psycopg.errors.DivisionByZero):
            await database.migrate()
    # One transaction: the good files before it are not applied either.
    assert "half_done" not in await _tables(database_url)
    assert "jobs" not in await _tables(database_url)


async def test_an_unreachable_server_is_database_unavailable() -> None:
    url = f"postgresql://fa@127.0.0.1:{free_port()}/nothing"
    database = Database(url, timeout=1.0)
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailable) as raised:
        await database.open()
    await database.close()
    assert isinstance(raised.value, OSError)
    # healthz shows this message: it names no host, port or account.
    assert "127.0.0.1" not in str(raised.value)
    assert "fa@" not in str(raised.value)
    assert time.monotonic() - started < 30


async def test_the_pool_recovers_after_the_server_restarts(
    postgres_server: PostgresServer, database_url: str
) -> None:
    async with Database(database_url, timeout=3.0, max_size=2) as database:
        await database.migrate()
        records = DatabaseRecords(database)
        assert await records.insert("backup", 1, "alice", {"id": 1, "user": "alice"})

        postgres_server.stop()
        try:
            started = time.monotonic()
            with pytest.raises(DatabaseUnavailable):
                await records.read("backup", 1)
            # timeout=3: a generous bound on a loaded machine, far from the driver's default
            # (libpq waits forever; the pool's default is 30 s).
            assert time.monotonic() - started < 20
            with pytest.raises(DatabaseUnavailable):
                await records.insert("backup", 2, "alice", {"id": 2, "user": "alice"})
        finally:
            postgres_server.start()

        # The connections the pool held died with the server: it made new ones by itself.
        assert await records.read("backup", 1) == {"id": 1, "user": "alice"}
        assert await records.insert("backup", 2, "alice", {"id": 2, "user": "alice"})
        assert await records.total("backup") == 2
