"""Configuration: a TOML file read into typed settings (SPEC §3).

Relative paths resolve against the folder of the config file, unknown keys are
errors, and every error names its key in one line.
"""

from __future__ import annotations

import os
import secrets
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator


class ConfigError(Exception):
    """A config file that cannot be used; the message is one line naming the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080


class PathSettings(_Section):
    data_root: Path = Path("var/data")
    state_file: Path = Path("var/state.json")
    allow_symlink_races: bool = False
    """Start even where restic cannot be confined to a home (single-user machines only)."""


class RepositorySettings(_Section):
    url: str = "var/repo"
    password_file: Path | None = None
    password_command: str | None = None
    env: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_password_source(self) -> RepositorySettings:
        if self.password_file is not None and self.password_command is not None:
            raise ValueError("set password_file or password_command, not both")
        return self


class ResticSettings(_Section):
    binary: str = "restic"
    cache_dir: Path = Path("var/cache")
    progress_fps: Annotated[float, Field(gt=0, le=60)] = 2.0
    browse_cache_bytes: Annotated[int, Field(ge=0)] = 256 << 20
    """Memory for cached backup trees (GET /backup/{id}/files, include checks); 0: none kept."""


class JobSettings(_Section):
    max_running: Annotated[int, Field(ge=1, le=64)] = 2
    max_pending_per_user: Annotated[int, Field(ge=1)] = 100
    """Pending backups and restores of one user, together; admin tokens are not capped."""
    max_attempts: Annotated[int, Field(ge=1, le=10)] = 2
    cancel_grace_seconds: Annotated[float, Field(gt=0, le=60)] = 3.0
    lock_wait_seconds: Annotated[float, Field(ge=0, le=86400)] = 120.0


class MaintenanceSettings(_Section):
    prune_interval_seconds: Annotated[float, Field(ge=0)] = 3600.0


USERNAME_REGEX = r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$"
"""A user name that is safe as a folder name and a restic tag (no commas, no slashes)."""


class StaticToken(_Section):
    token: str | None = None
    token_sha256: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")] | None = None
    user: Annotated[str, Field(pattern=USERNAME_REGEX)]
    admin: bool = False

    @model_validator(mode="after")
    def _one_token(self) -> StaticToken:
        if (self.token is None) == (self.token_sha256 is None):
            raise ValueError("give exactly one of token or token_sha256")
        return self


class AuthSettings(_Section):
    jwt_secret: str | None = None
    tokens: list[StaticToken] = Field(default_factory=list)


NODE_NAME_REGEX = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"


class ClusterSettings(_Section):
    """`[cluster]`: several nodes share one PostgreSQL database and one repository (SPEC §10).
    Present: `paths.state_file` is not used. `node_name` is unique per node; a node silent
    for `lease_seconds` is dead, and the others run its jobs again."""

    database_url: SecretStr = SecretStr("")
    """A libpq URL or keyword string; a secret (its password): never logged or shown."""
    node_name: Annotated[str, Field(pattern=NODE_NAME_REGEX)] = Field(
        default_factory=lambda: socket.gethostname()[:63] or "node"
    )
    lease_seconds: Annotated[float, Field(gt=0, le=3600)] = 30.0
    finished_in_memory: Annotated[int, Field(ge=0, le=10_000_000)] = 100_000
    """Finished job records each node holds in memory (about 0.5 KB each), so that a GET
    of one needs no round trip to the database; 0: none."""


class Settings(_Section):
    server: ServerSettings = Field(default_factory=ServerSettings)
    paths: PathSettings = Field(default_factory=PathSettings)
    repository: RepositorySettings = Field(default_factory=RepositorySettings)
    restic: ResticSettings = Field(default_factory=ResticSettings)
    jobs: JobSettings = Field(default_factory=JobSettings)
    maintenance: MaintenanceSettings = Field(default_factory=MaintenanceSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    cluster: ClusterSettings | None = None

    @property
    def is_local_repository(self) -> bool:
        """True when the repository URL names a folder on this machine."""
        return is_local_repository_url(self.repository.url)


_BACKEND_PREFIXES = ("rest:", "sftp:", "s3:", "rclone:", "b2:", "azure:", "gs:", "swift:")


def is_local_repository_url(url: str) -> bool:
    """Returns True for a plain path or `local:` URL, False for a remote backend."""
    return not url.startswith(_BACKEND_PREFIXES)


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    reason = first["msg"]
    if first["type"] == "extra_forbidden":
        reason = "unknown key"
    return f"{key}: {reason}"


def _resolve(base: Path, path: Path) -> Path:
    return path if path.is_absolute() else (base / path)


def _absolutise(settings: Settings, base: Path) -> Settings:
    repository = settings.repository
    url = repository.url
    if is_local_repository_url(url):
        local = url.removeprefix("local:")
        url = str(_resolve(base, Path(local)))
    password_file = repository.password_file
    if password_file is None and repository.password_command is None:
        password_file = Path("var/repo.password")
    return settings.model_copy(
        update={
            "paths": settings.paths.model_copy(
                update={
                    "data_root": _resolve(base, settings.paths.data_root),
                    "state_file": _resolve(base, settings.paths.state_file),
                }
            ),
            "repository": repository.model_copy(
                update={
                    "url": url,
                    "password_file": (
                        _resolve(base, password_file) if password_file is not None else None
                    ),
                }
            ),
            "restic": settings.restic.model_copy(
                update={
                    "cache_dir": _resolve(base, settings.restic.cache_dir),
                    # A bare name is looked up on PATH; a relative path is the file's.
                    "binary": (
                        str(_resolve(base, Path(settings.restic.binary)))
                        if "/" in settings.restic.binary
                        else settings.restic.binary
                    ),
                }
            ),
        }
    )


def parse_settings(document: dict[str, Any], base: Path, environ: dict[str, str]) -> Settings:
    """Returns settings from a parsed TOML document; raises ConfigError naming the bad key."""
    try:
        settings = Settings.model_validate(document)
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None
    settings = _absolutise(settings, base)
    secret = environ.get("FA_JWT_SECRET")
    if secret:
        settings = settings.model_copy(
            update={"auth": settings.auth.model_copy(update={"jwt_secret": secret})}
        )
    if settings.cluster is not None:
        settings = settings.model_copy(update={"cluster": _cluster(settings.cluster, environ)})
    return settings


def _cluster(cluster: ClusterSettings, environ: dict[str, str]) -> ClusterSettings:
    """Returns `[cluster]` with FA_DATABASE_URL applied; raises ConfigError when there is no
    usable database URL (the message never holds the URL: it may hold a password)."""
    # Imported here: only a node in cluster mode needs the driver.
    import psycopg

    from fa_restic.cluster.database import DATABASE_URL_ENV

    url = environ.get(DATABASE_URL_ENV) or cluster.database_url.get_secret_value()
    if not url.strip():
        raise ConfigError(f"cluster.database_url: missing (set it or {DATABASE_URL_ENV})")
    try:
        psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error:  # its reason quotes the URL
        raise ConfigError(
            "cluster.database_url: not a libpq URL (postgresql://user@host:5432/name) "
            "or keyword string"
        ) from None
    return cluster.model_copy(update={"database_url": SecretStr(url)})


def load_settings(path: Path, environ: dict[str, str] | None = None) -> Settings:
    """Returns the settings of a TOML file; raises ConfigError with one line naming the key."""
    environ = dict(os.environ) if environ is None else environ
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    return parse_settings(document, path.resolve().parent, environ)


def ensure_password_file(path: Path) -> None:
    """Creates the repository password file (mode 0600, random; folders it makes 0700) if it
    does not exist."""
    if path.exists():
        return
    # Folders made for it are 0700, parents too (Path.mkdir(parents=True) would give the
    # parents the default mode, 0755 under the usual umask).
    for folder in reversed(path.parents):
        if not folder.is_dir():
            folder.mkdir(mode=0o700, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(secrets.token_urlsafe(32) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
