"""The TOML config (SPEC §3): unknown keys and bad values name the key, paths resolve
against the config's folder, FA_JWT_SECRET overrides, the password file is made safely."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fa_restic.config import ConfigError, ensure_password_file, load_settings


def _write(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "fa.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as raised:
        load_settings(_write(tmp_path, text), environ={})
    message = str(raised.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nprot = 8080\n", "server.prot: unknown key"),
        ("[serer]\nport = 8080\n", "serer: unknown key"),
        ("top = 1\n", "top: unknown key"),
        ('[repository]\nurl = "r"\npasword_file = "p"\n', "repository.pasword_file: unknown key"),
        (
            '[auth]\n[[auth.tokens]]\ntoken = "t"\nuser = "u"\nadmn = true\n',
            "auth.tokens.0.admn: unknown key",
        ),
    ],
)
def test_unknown_key_is_named(tmp_path: Path, text: str, message: str) -> None:
    assert _error(tmp_path, text) == message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[server]\nport = "eighty"\n', "server.port: "),
        ("[server]\nport = 70000\n", "server.port: "),
        ("[jobs]\nmax_running = 0\n", "jobs.max_running: "),
        ("[jobs]\nmax_attempts = 2.5\n", "jobs.max_attempts: "),
        ("[restic]\nprogress_fps = 0\n", "restic.progress_fps: "),
        ("[repository.env]\nAWS_ACCESS_KEY_ID = 3\n", "repository.env.AWS_ACCESS_KEY_ID: "),
        ("server = 3\n", "server: "),
        (
            '[auth]\n[[auth.tokens]]\ntoken_sha256 = "not-hex"\nuser = "u"\n',
            "auth.tokens.0.token_sha256: ",
        ),
        ('[auth]\n[[auth.tokens]]\ntoken = "t"\nuser = "../root"\n', "auth.tokens.0.user: "),
        ('[auth]\n[[auth.tokens]]\ntoken = "t"\nuser = "a,b"\n', "auth.tokens.0.user: "),
        ('[auth]\n[[auth.tokens]]\nuser = "u"\n', "auth.tokens.0: "),
        ('[auth]\n[[auth.tokens]]\ntoken = "t"\n', "auth.tokens.0.user: "),
        (
            '[repository]\npassword_file = "p"\npassword_command = "echo x"\n',
            "repository: ",
        ),
    ],
)
def test_bad_value_names_its_key(tmp_path: Path, text: str, key: str) -> None:
    assert _error(tmp_path, text).startswith(key)


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    assert "not valid TOML" in _error(tmp_path, "[server\nport = 1\n")
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "absent.toml", environ={})


def test_relative_paths_resolve_against_the_configs_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "etc" / "fa"
    config = _write(
        folder,
        """
[paths]
data_root = "var/data"
state_file = "../state/state.json"
[repository]
url = "repo"
password_file = "secrets/repo.password"
[restic]
cache_dir = "/abs/cache"
""",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    settings = load_settings(config, environ={})
    assert settings.paths.data_root == folder / "var" / "data"
    assert settings.paths.state_file.resolve() == tmp_path / "etc" / "state" / "state.json"
    assert settings.repository.url == str(folder / "repo")
    assert settings.repository.password_file == folder / "secrets" / "repo.password"
    assert settings.restic.cache_dir == Path("/abs/cache")
    assert settings.is_local_repository


def test_config_given_by_a_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path / "conf", '[paths]\ndata_root = "data"\n')
    monkeypatch.chdir(tmp_path)
    settings = load_settings(Path("conf/fa.toml"), environ={})
    assert settings.paths.data_root == tmp_path / "conf" / "data"
    assert settings.paths.data_root.is_absolute()


def test_defaults_resolve_against_the_configs_folder(tmp_path: Path) -> None:
    settings = load_settings(_write(tmp_path, ""), environ={})
    assert settings.paths.data_root == tmp_path / "var" / "data"
    assert settings.paths.state_file == tmp_path / "var" / "state.json"
    assert settings.repository.url == str(tmp_path / "var" / "repo")
    assert settings.repository.password_file == tmp_path / "var" / "repo.password"
    assert settings.restic.cache_dir == tmp_path / "var" / "cache"
    assert (settings.server.host, settings.server.port) == ("127.0.0.1", 8080)
    assert settings.jobs.max_running == 2
    assert settings.auth.jwt_secret is None


def test_local_prefix_and_remote_urls(tmp_path: Path) -> None:
    local = load_settings(_write(tmp_path, '[repository]\nurl = "local:r"\n'), environ={})
    assert local.repository.url == str(tmp_path / "r") and local.is_local_repository
    for url in ("rest:http://127.0.0.1:8000/r/", "sftp:u@h:/r", "s3:s3.amazonaws.com/b"):
        remote = load_settings(_write(tmp_path, f'[repository]\nurl = "{url}"\n'), environ={})
        assert remote.repository.url == url and not remote.is_local_repository


def test_password_command_leaves_no_password_file(tmp_path: Path) -> None:
    settings = load_settings(
        _write(tmp_path, '[repository]\npassword_command = "pass show restic"\n'), environ={}
    )
    assert settings.repository.password_file is None
    assert settings.repository.password_command == "pass show restic"


def test_fa_jwt_secret_overrides_the_file(tmp_path: Path) -> None:
    config = _write(tmp_path, '[auth]\njwt_secret = "from-file"\n')
    assert load_settings(config, environ={}).auth.jwt_secret == "from-file"
    assert load_settings(config, environ={"FA_JWT_SECRET": "from-env"}).auth.jwt_secret == (
        "from-env"
    )
    assert load_settings(config, environ={"FA_JWT_SECRET": ""}).auth.jwt_secret == "from-file"
    bare = _write(tmp_path / "bare", "")
    assert load_settings(bare, environ={"FA_JWT_SECRET": "env-only"}).auth.jwt_secret == (
        "env-only"
    )


def test_fa_jwt_secret_is_read_from_the_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FA_JWT_SECRET", "process-env")
    config = _write(tmp_path, '[auth]\njwt_secret = "from-file"\n')
    assert load_settings(config).auth.jwt_secret == "process-env"


def test_static_tokens(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"script-token").hexdigest()
    settings = load_settings(
        _write(
            tmp_path,
            f"""
[[auth.tokens]]
token_sha256 = "{digest}"
user = "admin"
admin = true
[[auth.tokens]]
token = "plain"
user = "bob"
""",
        ),
        environ={},
    )
    first, second = settings.auth.tokens
    assert (first.token_sha256, first.user, first.admin) == (digest, "admin", True)
    assert (second.token, second.user, second.admin) == ("plain", "bob", False)


def test_password_file_is_made_0600_random_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "repo.password"
    old_umask = os.umask(0)  # even a permissive umask must not widen the mode
    try:
        ensure_password_file(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = path.read_text(encoding="utf-8").strip()
    assert len(first) >= 32

    ensure_password_file(path)  # already there: not overwritten
    assert path.read_text(encoding="utf-8").strip() == first

    other = tmp_path / "other.password"
    ensure_password_file(other)
    assert other.read_text(encoding="utf-8").strip() != first


def test_existing_password_file_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "repo.password"
    path.write_text("operator's password\n", encoding="utf-8")
    path.chmod(0o640)
    ensure_password_file(path)
    assert path.read_text(encoding="utf-8") == "operator's password\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_serve_with_a_bad_config_prints_one_line_naming_the_key(tmp_path: Path) -> None:
    config = _write(tmp_path, "[server]\nprot = 8080\n")
    environment = {key: value for key, value in os.environ.items() if key != "FA_RESTIC_CONFIG"}
    finished = subprocess.run(
        [sys.executable, "-m", "fa_restic", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
        check=False,
    )
    assert finished.returncode == 2
    assert finished.stderr.strip().splitlines() == ["fa-restic: config: server.prot: unknown key"]
    assert not (tmp_path / "var").exists(), "nothing is made from a bad config"
