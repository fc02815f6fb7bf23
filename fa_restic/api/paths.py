"""User paths: relative to the user's home, resolved, and never outside it (SPEC §4)."""

from __future__ import annotations

import asyncio
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fa_restic.api.errors import clip
from fa_restic.names import home_of

MAX_PATH_BYTES = 4096
"""Linux's PATH_MAX: a longer path cannot name a file anyway (SPEC §9)."""
MAX_NAME_BYTES = 255
"""Linux's NAME_MAX, per folder or file name."""
RESOLVE_THREADS = 4
"""Threads of the path resolver: its own, not the default pool the rest of the service uses."""
RESOLVE_PER_USER = 1
"""Resolutions one user may have running at once; more wait for their turn."""


class PathRefused(Exception):
    """A path the caller may not use; the message is the reason (user input in it clipped)."""


def check_limits(given: str, field: str = "path") -> None:
    """Raises PathRefused if `given` is longer than MAX_PATH_BYTES or holds a name longer
    than MAX_NAME_BYTES (UTF-8), or is not text. Cheap and touches nothing: call it first.
    """
    try:
        encoded = given.encode("utf-8")
    except UnicodeEncodeError:
        raise PathRefused(f"{field} is not valid text (a lone surrogate)") from None
    if len(encoded) > MAX_PATH_BYTES:
        raise PathRefused(f"{field} is too long ({len(encoded)} bytes; at most {MAX_PATH_BYTES})")
    longest = max((len(name) for name in encoded.split(b"/")), default=0)
    if longest > MAX_NAME_BYTES:
        raise PathRefused(
            f"{field} has a name of {longest} bytes (at most {MAX_NAME_BYTES} a name)"
        )


def resolve_in_home(
    data_root: Path,
    user: str,
    given: str,
    *,
    must_exist: bool,
    folder: bool = False,
    field: str = "path",
) -> Path:
    """Returns the resolved absolute path of `given` inside the user's home.

    A leading `/` still means the home; `..` and symlinks are followed. Raises
    PathRefused if the result leaves the home, if the home is missing, (with
    `must_exist`) if the path does not exist, or (with `folder`) if it exists and is
    not a folder, or if it breaks `check_limits`. Touches the file system: call it off
    the event loop.
    """
    check_limits(given, field)
    if "\x00" in given:
        raise PathRefused("path contains a NUL character")
    home = home_of(data_root, user)
    if not home.is_dir():
        raise PathRefused(f"home folder of {user} does not exist")
    real_home = os.path.realpath(home)
    resolved = os.path.realpath(os.path.join(real_home, given.lstrip("/")))
    if resolved != real_home and not resolved.startswith(real_home + os.sep):
        raise PathRefused(f"path leaves the home of {user}: {clip(given)}")
    if must_exist and not os.path.lexists(resolved):
        raise PathRefused(f"path does not exist: {clip(given)}")
    if folder and os.path.exists(resolved) and not os.path.isdir(resolved):
        raise PathRefused(f"dst_path is not a folder: {clip(given)}")
    return Path(resolved)


@dataclass
class _Turns:
    semaphore: asyncio.Semaphore
    holders: int = 0


class PathResolver:
    """Resolves users' paths on a few threads of its own, RESOLVE_PER_USER at a time per user.

    realpath and stat may take long (a 4 KiB path of `a/../` is ~800 lookups; a home on a
    stuck network file system hangs them): not on the event loop, and not on the default
    thread pool that the rest of the service shares. One user's requests queue behind each
    other, so they hold at most RESOLVE_PER_USER of the threads and another user's request
    does not wait for them (SPEC §9).
    """

    def __init__(
        self, data_root: Path, threads: int = RESOLVE_THREADS, per_user: int = RESOLVE_PER_USER
    ) -> None:
        self.data_root = data_root
        self.per_user = per_user
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="resolve-path")
        self._turns: dict[str, _Turns] = {}

    async def resolve(
        self, user: str, given: str, *, must_exist: bool, folder: bool = False, field: str = "path"
    ) -> Path:
        """Returns resolve_in_home's answer; raises PathRefused (the limits before any wait)."""
        check_limits(given, field)
        turns = self._turns.get(user)
        if turns is None:
            turns = self._turns[user] = _Turns(asyncio.Semaphore(self.per_user))
        turns.holders += 1
        try:
            async with turns.semaphore:
                work = functools.partial(
                    resolve_in_home,
                    self.data_root,
                    user,
                    given,
                    must_exist=must_exist,
                    folder=folder,
                    field=field,
                )
                return await asyncio.get_running_loop().run_in_executor(self._executor, work)
        finally:
            turns.holders -= 1
            if turns.holders == 0:  # a user with nothing waiting costs no memory
                del self._turns[user]

    def close(self) -> None:
        """Stops the threads; a resolution still running finishes on its own."""
        self._executor.shutdown(wait=False, cancel_futures=True)
