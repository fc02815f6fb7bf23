"""restic versions and the features each one brings."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum


@dataclass(frozen=True, order=True)
class ResticVersion:
    major: int
    minor: int
    patch: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


class Feature(Enum):
    RESTORE_PROGRESS_JSON = "restore --json prints status and summary lines"
    RETRY_LOCK = "--retry-lock waits for a held lock"
    DATA_ADDED_PACKED = "the backup summary has data_added_packed"
    SPECIFIC_EXIT_CODES = "exit codes 10 (no repository), 11 (locked), 12 (wrong password)"
    EXIT_ERROR_JSON = "fatal errors as an exit_error JSON line with --json"
    RESTORE_REPLACES_SYMLINKS = (
        "restore replaces a symlink already in the target instead of writing through it"
        " (not enough to restore as root into a user's folder: see fa_restic.jobs.staging)"
    )
    MISSING_SOURCE_EXIT_3 = (
        "backup of a missing source path beside existing ones exits 3 (incomplete), not 0"
    )
    FORGET_FAILURE_EXIT_3 = "forget exits 3, not 0, when it could not remove a snapshot"
    RESTORE_OVERWRITE = "restore --overwrite always|if-changed|if-newer|never"


MINIMUM_VERSION = ResticVersion(0, 14, 0)

FEATURE_TO_MINIMUM_VERSION: dict[Feature, ResticVersion] = {
    Feature.RESTORE_PROGRESS_JSON: ResticVersion(0, 16, 0),
    Feature.RETRY_LOCK: ResticVersion(0, 16, 0),
    Feature.DATA_ADDED_PACKED: ResticVersion(0, 17, 0),
    Feature.SPECIFIC_EXIT_CODES: ResticVersion(0, 17, 0),
    Feature.EXIT_ERROR_JSON: ResticVersion(0, 17, 0),
    Feature.RESTORE_REPLACES_SYMLINKS: ResticVersion(0, 17, 0),
    Feature.MISSING_SOURCE_EXIT_3: ResticVersion(0, 19, 0),
    Feature.FORGET_FAILURE_EXIT_3: ResticVersion(0, 19, 0),
    Feature.RESTORE_OVERWRITE: ResticVersion(0, 17, 0),
}
"""Changes in 0.19 with no entry: SIGINT exits 130 on every path (0.17-0.18 exited 1 from a
backup; errors.py classifies both), and excludes (--exclude*, --one-file-system) no longer
apply to the paths given on the command line: fa-restic anchors every exclude below the
backed-up folder and passes none for a single file (commands.anchored_excludes), so no
version excludes the path it was given. A selective restore uses `--include /<escaped path>`
on every version (the layout of a full restore; `snapshot:subfolder` needs 0.17+ and would
change it). Versions newer than the
newest tested (0.19) are accepted and assumed to behave like it."""

_VERSION_PATTERN = re.compile(r"restic (\d+)\.(\d+)\.(\d+)")


def parse_version(output: str) -> ResticVersion:
    """Returns the version in `restic version` output; raises ValueError if there is none."""
    match = _VERSION_PATTERN.search(output)
    if match is None:
        raise ValueError(f"not a restic version line: {output.strip()[:200]!r}")
    major, minor, patch = (int(group) for group in match.groups())
    return ResticVersion(major, minor, patch)


def has_feature(version: ResticVersion, feature: Feature) -> bool:
    """Returns True when `version` has `feature`."""
    return version >= FEATURE_TO_MINIMUM_VERSION[feature]
