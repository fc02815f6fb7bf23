"""The facts every part of fa-restic shares, each declared once (SPEC §4-§6).

The API, the job layer and the command-line client import them from here; nothing
else spells them. This module imports nothing of fa-restic.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

API_PREFIX = "/fa/api/v0"
SUCCESS_CODE = 2001
NOT_FOUND_CODE = 4001
"""The code of a GET of an unknown (or another user's) id, answered with HTTP 200."""
MAX_ID = 2**63 - 1
"""Ids are positive integers up to this (a signed 64-bit integer, as the platform's)."""


class JobKind(StrEnum):
    BACKUP = "backup"
    RESTORE = "restore"


class Overwrite(StrEnum):
    """What a restore does with a file that already exists in dst (SPEC §11)."""

    ALWAYS = "always"
    IF_NEWER = "if-newer"
    NEVER = "never"


class JobStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"
    CANCEL = "cancel"

    @property
    def is_terminal(self) -> bool:
        """True for success, failed and cancel: such a status never changes again."""
        return self in TERMINAL_STATUSES

    @property
    def is_active(self) -> bool:
        """True for pending and running."""
        return not self.is_terminal


TERMINAL_STATUSES = frozenset({JobStatus.SUCCESS, JobStatus.FAILED, JobStatus.CANCEL})

# -- the repository (SPEC §6) -----------------------------------------------------------------

ID_TAG = "fa:id"
USER_TAG = "fa:user"


def snapshot_tags(backup_id: int, user: str) -> tuple[str, str]:
    """Returns the tags that let `restic snapshots --tag fa:id=N` find a backup."""
    return (f"{ID_TAG}={backup_id}", f"{USER_TAG}={user}")


# -- the homes (SPEC §4) ----------------------------------------------------------------------

USERS_FOLDER = "users"
STAGING_FOLDER = ".fa-restic-staging"
"""Restores are staged here, in the data root beside (never inside) the homes."""


def users_root(data_root: Path) -> Path:
    """Returns the folder holding every home."""
    return data_root / USERS_FOLDER


def home_of(data_root: Path, user: str) -> Path:
    """Returns a user's home: `<data_root>/users/<user>`."""
    return users_root(data_root) / user
