"""Pure command builders, one per restic subcommand: the argv, and the lock it takes.

Secrets (password, repository URL with credentials, backend keys) never appear
here: they travel in the environment (see `Repository.environment`). User paths
always come after `--`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from fa_restic.restic.features import Feature, ResticVersion, has_feature

Argv = tuple[str, ...]


class Lock(Enum):
    """The repository lock a command takes (NOTES §8: which commands take which lock)."""

    NONE = "none"
    SHARED = "shared"
    EXCLUSIVE = "exclusive"


@dataclass(frozen=True)
class Command:
    """One restic invocation: its argv and the lock it takes (a killed one may leave it)."""

    argv: Argv
    lock: Lock


@dataclass(frozen=True)
class Repository:
    """How to reach one restic repository."""

    url: str
    password_file: Path | None = None
    password_command: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)

    def environment(self, progress_fps: float) -> dict[str, str]:
        """Returns the environment restic needs for this repository (secrets live only here)."""
        environment = dict(self.env)
        environment["RESTIC_REPOSITORY"] = self.url
        if self.password_file is not None:
            environment["RESTIC_PASSWORD_FILE"] = str(self.password_file)
        if self.password_command is not None:
            environment["RESTIC_PASSWORD_COMMAND"] = self.password_command
        # restic prints ~60 JSON status lines a second by default, even on a pipe.
        environment["RESTIC_PROGRESS_FPS"] = f"{progress_fps:g}"
        return environment


@dataclass(frozen=True)
class Binary:
    """The restic executable, its version and its cache folder."""

    path: str
    version: ResticVersion
    cache_dir: Path

    def base(self, *subcommand: str) -> Argv:
        """Returns the argv prefix for a subcommand."""
        return (self.path, "--cache-dir", str(self.cache_dir), *subcommand)

    def retry_lock(self, seconds: float) -> Argv:
        """Returns `--retry-lock` where restic has it (>= 0.16), else nothing."""
        if seconds <= 0 or not has_feature(self.version, Feature.RETRY_LOCK):
            return ()
        return ("--retry-lock", f"{max(1, round(seconds))}s")


def version_command(binary: str) -> Command:
    return Command((binary, "version"), Lock.NONE)


def init_command(binary: Binary) -> Command:
    return Command(binary.base("init"), Lock.NONE)


def cat_config_command(binary: Binary) -> Command:
    return Command((*binary.base("cat", "config"), "--no-lock"), Lock.NONE)


_GLOB_SPECIAL = re.compile(r"([*?\[\\])")


def escape_glob(text: str) -> str:
    """Returns `text` as a restic pattern that matches exactly it: restic's include and
    exclude patterns are Go `filepath.Match` globs, where `\\` escapes `*`, `?`, `[`, `\\`."""
    return _GLOB_SPECIAL.sub(r"\\\1", text)


def anchored_excludes(root: str, patterns: Iterable[str]) -> list[str]:
    """Returns `patterns` (relative to the folder `root`) as patterns restic applies below
    `root` only: `/x` becomes `<root>/x`, `x` becomes `<root>/**/x`, `!` kept in front.

    restic matches a pattern against every window of an item's absolute path, so a bare
    `users` would otherwise exclude everything below `/srv/fa/data/users`; and 0.14-0.18
    would exclude the backed-up folder itself where 0.19 does not. Anchored, neither can
    happen on any version.
    """
    base = escape_glob(root.rstrip("/"))
    anchored = []
    for pattern in patterns:
        negation = "!" if pattern.startswith("!") else ""
        body = pattern.removeprefix("!")
        inner = body.lstrip("/") if body.startswith("/") else f"**/{body}"
        anchored.append(f"{negation}{base}/{inner}")
    return anchored


def backup_command(
    binary: Binary,
    tags: Iterable[str],
    paths: Iterable[str],
    excludes: Iterable[str] = (),
    host: str | None = None,
) -> Command:
    """Returns `restic backup --json [--host H] --tag T... --exclude P... -- PATH...`; tags
    must not contain commas; `excludes` are passed as they are (see anchored_excludes).
    `host`: the snapshot's host name, by which restic finds a parent (None: this machine's)."""
    tag_arguments: list[str] = ["--host", host] if host else []
    for tag in tags:
        if "," in tag:
            raise ValueError(f"restic splits tags at commas: {tag!r}")
        tag_arguments += ["--tag", tag]
    for pattern in excludes:
        tag_arguments += ["--exclude", pattern]
    return Command((*binary.base("backup", "--json"), *tag_arguments, "--", *paths), Lock.SHARED)


def restore_command(
    binary: Binary,
    snapshot_id: str,
    target: Path,
    include: Iterable[str] = (),
    overwrite: str | None = None,
) -> Command:
    """Returns `restic restore --json --target T [--include /E...] [--overwrite O] -- SNAP`.

    `include` are paths in the snapshot's tree (relative to its top), escaped so that each
    names exactly one entry (a folder brings its contents), on every version. `overwrite`
    is restic's own policy (`always`, `if-changed`, `if-newer`, `never`); raises ValueError
    for a restic without `--overwrite` (< 0.17), except `always`, its only behaviour there.
    """
    arguments = ["--target", str(target)]
    for entry in include:
        arguments += ["--include", "/" + escape_glob(entry.strip("/"))]
    if overwrite is not None and has_feature(binary.version, Feature.RESTORE_OVERWRITE):
        arguments += ["--overwrite", overwrite]
    elif overwrite not in (None, "always"):
        raise ValueError(f"restic {binary.version} has no restore --overwrite {overwrite}")
    return Command((*binary.base("restore", "--json"), *arguments, "--", snapshot_id), Lock.SHARED)


def ls_command(binary: Binary, snapshot_id: str, paths: Sequence[str] = ()) -> Command:
    """Returns `restic ls --json -- SNAP [PATH...]`: the snapshot, then every node, one JSON
    line each; with paths (absolute in the snapshot), only each path's node and, for a
    folder, the nodes directly in it."""
    return Command((*binary.base("ls", "--json"), "--", snapshot_id, *paths), Lock.SHARED)


def snapshots_command(
    binary: Binary, tags: Iterable[str] = (), snapshot_ids: Iterable[str] = ()
) -> Command:
    """Returns `restic snapshots --json`; several tags are ANDed (restic's `--tag a,b`)."""
    tags = tuple(tags)
    tag_arguments = ("--tag", ",".join(tags)) if tags else ()
    return Command(
        (*binary.base("snapshots", "--json"), *tag_arguments, "--", *snapshot_ids), Lock.SHARED
    )


def stats_command(binary: Binary, snapshot_id: str) -> Command:
    return Command(
        (*binary.base("stats", "--json", "--mode", "restore-size"), "--", snapshot_id), Lock.SHARED
    )


def forget_command(binary: Binary, snapshot_ids: Iterable[str], lock_wait: float = 0) -> Command:
    return Command(
        (*binary.base("forget"), *binary.retry_lock(lock_wait), "--", *snapshot_ids), Lock.EXCLUSIVE
    )


def prune_command(binary: Binary, lock_wait: float = 0) -> Command:
    return Command((*binary.base("prune"), *binary.retry_lock(lock_wait)), Lock.EXCLUSIVE)


def unlock_command(binary: Binary) -> Command:
    """Returns plain `restic unlock`: it removes stale locks only, never a live one."""
    return Command(binary.base("unlock"), Lock.NONE)


def list_locks_command(binary: Binary) -> Command:
    return Command((*binary.base("list", "locks"), "--no-lock"), Lock.NONE)


def check_command(binary: Binary) -> Command:
    return Command(binary.base("check"), Lock.EXCLUSIVE)
