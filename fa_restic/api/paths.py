"""User paths: relative to the user's home, resolved, and never outside it (SPEC §4)."""

from __future__ import annotations

import os
from pathlib import Path


class PathRefused(Exception):
    """A path the caller may not use; the message is the reason."""


def home_of(data_root: Path, user: str) -> Path:
    return data_root / "users" / user


def resolve_in_home(
    data_root: Path, user: str, given: str, *, must_exist: bool, folder: bool = False
) -> Path:
    """Returns the resolved absolute path of `given` inside the user's home.

    A leading `/` still means the home; `..` and symlinks are followed. Raises
    PathRefused if the result leaves the home, if the home is missing, (with
    `must_exist`) if the path does not exist, or (with `folder`) if it exists and is
    not a folder. Touches the file system: call it off the event loop.
    """
    if "\x00" in given:
        raise PathRefused("path contains a NUL character")
    home = home_of(data_root, user)
    if not home.is_dir():
        raise PathRefused(f"home folder of {user} does not exist")
    real_home = os.path.realpath(home)
    resolved = os.path.realpath(os.path.join(real_home, given.lstrip("/")))
    if resolved != real_home and not resolved.startswith(real_home + os.sep):
        raise PathRefused(f"path leaves the home of {user}: {given}")
    if must_exist and not os.path.lexists(resolved):
        raise PathRefused(f"path does not exist: {given}")
    if folder and os.path.exists(resolved) and not os.path.isdir(resolved):
        raise PathRefused(f"dst_path is not a folder: {given}")
    return Path(resolved)
