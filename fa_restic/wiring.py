"""Builds the service's parts from settings (shared by `serve` and `rebuild-state`)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from fa_restic.config import ConfigError, Settings, ensure_password_file
from fa_restic.restic import sandbox
from fa_restic.restic.client import Restic, read_version
from fa_restic.restic.commands import Binary, Repository

log = logging.getLogger("fa_restic")


def repository_of(settings: Settings) -> Repository:
    """Returns how restic reaches the repository; makes the password file if missing."""
    config = settings.repository
    if config.password_file is not None:
        ensure_password_file(config.password_file)
    return Repository(
        url=config.url,
        password_file=config.password_file,
        password_command=config.password_command,
        env=dict(config.env),
    )


def local_repository_path(settings: Settings) -> Path | None:
    """Returns the repository folder when it is on this machine, else None."""
    if not settings.is_local_repository:
        return None
    return Path(settings.repository.url.removeprefix("local:"))


def absolute_binary(name: str) -> str:
    """Returns the absolute path of a binary (a bare name is looked up on PATH).

    Absolute, so that restic runs the same from any working folder: backups cd into the source.
    """
    return os.path.abspath(shutil.which(name) or name)


CLUSTER_HOST = "fa-restic-cluster"
"""The host name of a cluster's snapshots (SPEC §10): one for every node."""


async def make_restic(settings: Settings) -> Restic:
    """Returns a Restic for the configured binary and repository; raises ResticError
    when restic is missing or older than 0.14."""
    binary = absolute_binary(settings.restic.binary)
    version = await read_version(binary)
    # restic's cache holds copies of the repository's metadata: the service's alone (0700).
    for folder in (*reversed(settings.restic.cache_dir.parents), settings.restic.cache_dir):
        if not folder.is_dir():
            folder.mkdir(mode=0o700, exist_ok=True)
    log.info("restic %s at %s", version, binary)
    return Restic(
        Binary(binary, version, settings.restic.cache_dir),
        repository_of(settings),
        progress_fps=settings.restic.progress_fps,
        grace_seconds=settings.jobs.cancel_grace_seconds,
        backend_wait_seconds=settings.jobs.lock_wait_seconds,
        host=None if settings.cluster is None else CLUSTER_HOST,
    )


def backups_confined(settings: Settings) -> bool:
    """Returns True if backups can run confined to the caller's home, False if they cannot
    and `[paths] allow_symlink_races` allows that; raises ConfigError otherwise (SPEC §9).

    Runs a short probe in a child process: call it off the event loop.
    """
    reason = sandbox.probe()
    if reason is None:
        log.info("backups run confined to the caller's home (mount namespace, nosymfollow)")
        return True
    if settings.paths.allow_symlink_races:
        log.warning(
            "backups run NOT confined to the caller's home (%s): a user can make the "
            "service read files outside their home; [paths] allow_symlink_races = true",
            reason,
        )
        return False
    raise ConfigError(
        f"[paths] allow_symlink_races: backups cannot be confined to a home here ({reason}); "
        "refusing to start (set it to true only on a single-user machine)"
    )
