"""`[cluster]` (SPEC §10): the records in PostgreSQL. Its keys, their defaults, FA_DATABASE_URL,
and a database URL that is a secret: never in an error or a repr."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from fa_restic.config import ConfigError, load_settings

SECRET_URL = "postgresql://fa:s3cret-pw@db.example:5432/fa_restic"


def _write(folder: Path, text: str) -> Path:
    path = folder / "fa.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _error(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as raised:
        load_settings(_write(tmp_path, text), environ=environ or {})
    message = str(raised.value)
    assert "\n" not in message and "s3cret" not in message
    return message


def test_without_the_table_there_is_no_cluster(tmp_path: Path) -> None:
    settings = load_settings(_write(tmp_path, "[jobs]\nmax_running = 1\n"), environ={})
    assert settings.cluster is None


def test_keys_and_defaults(tmp_path: Path) -> None:
    settings = load_settings(_write(tmp_path, f'[cluster]\ndatabase_url = "{SECRET_URL}"\n'), {})
    cluster = settings.cluster
    assert cluster is not None
    assert cluster.database_url.get_secret_value() == SECRET_URL
    assert cluster.node_name == socket.gethostname()[:63]
    assert cluster.lease_seconds == 30.0
    # A secret: neither the settings' repr nor their dump shows it.
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings.model_dump())

    given = load_settings(
        _write(
            tmp_path,
            f'[cluster]\ndatabase_url = "{SECRET_URL}"\nnode_name = "node-a"\n'
            "lease_seconds = 12.5\n",
        ),
        {},
    )
    assert given.cluster is not None
    assert (given.cluster.node_name, given.cluster.lease_seconds) == ("node-a", 12.5)


def test_fa_database_url_overrides_the_file(tmp_path: Path) -> None:
    other = "postgresql://fa@127.0.0.1:5433/other"
    path = _write(tmp_path, f'[cluster]\ndatabase_url = "{SECRET_URL}"\n')
    settings = load_settings(path, {"FA_DATABASE_URL": other})
    assert settings.cluster is not None
    assert settings.cluster.database_url.get_secret_value() == other
    # ... and may be the only place the URL is given.
    only_env = load_settings(_write(tmp_path, "[cluster]\n"), {"FA_DATABASE_URL": other})
    assert only_env.cluster is not None
    assert only_env.cluster.database_url.get_secret_value() == other
    # Without [cluster] it changes nothing: one machine stays one machine.
    assert load_settings(_write(tmp_path, ""), {"FA_DATABASE_URL": other}).cluster is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[cluster]\n", "cluster.database_url: missing (set it or FA_DATABASE_URL)"),
        (
            f'[cluster]\ndatabase_url = "{SECRET_URL}"\nleas_seconds = 3\n',
            "cluster.leas_seconds: unknown key",
        ),
        (
            f'[cluster]\ndatabase_url = "{SECRET_URL}"\nlease_seconds = 0\n',
            "cluster.lease_seconds: Input should be greater than 0",
        ),
        (
            f'[cluster]\ndatabase_url = "{SECRET_URL}"\nnode_name = "a b"\n',
            "cluster.node_name: String should match pattern",
        ),
        (
            '[cluster]\ndatabase_url = "s3cret-pw here"\n',
            "cluster.database_url: not a libpq URL",
        ),
    ],
)
def test_bad_cluster_settings_name_their_key(tmp_path: Path, text: str, message: str) -> None:
    assert _error(tmp_path, text).startswith(message)
