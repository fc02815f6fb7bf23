"""restic versions: read from the real binaries, features by version, too old refused."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fa_restic.restic.client import read_version
from fa_restic.restic.errors import ErrorKind, ResticError
from fa_restic.restic.features import (
    MINIMUM_VERSION,
    Feature,
    ResticVersion,
    has_feature,
    parse_version,
)


def test_parse_version_lines() -> None:
    assert parse_version("restic 0.14.0 compiled with go1.19.8 on linux/amd64\n") == ResticVersion(
        0, 14, 0
    )
    assert parse_version("restic 0.18.0 compiled with go1.24.4 on linux/amd64") == ResticVersion(
        0, 18, 0
    )
    assert parse_version("restic 0.19.1 compiled with go1.26.4 on linux/amd64") == ResticVersion(
        0, 19, 1
    )
    assert str(ResticVersion(0, 16, 4)) == "0.16.4"
    with pytest.raises(ValueError, match="not a restic version line"):
        parse_version("rest-server 0.13.0 compiled with go1.24.2")


def test_versions_order_numerically() -> None:
    assert ResticVersion(0, 9, 6) < ResticVersion(0, 14, 0) < ResticVersion(0, 16, 0)
    assert ResticVersion(0, 17, 3) < ResticVersion(0, 18, 0) < ResticVersion(0, 19, 1)
    assert ResticVersion(0, 19, 1) < ResticVersion(0, 20, 0) < ResticVersion(1, 0, 0)


SINCE_0_19 = {Feature.MISSING_SOURCE_EXIT_3, Feature.FORGET_FAILURE_EXIT_3}


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        (ResticVersion(0, 14, 0), set()),
        (ResticVersion(0, 15, 2), set()),
        (ResticVersion(0, 16, 0), {Feature.RESTORE_PROGRESS_JSON, Feature.RETRY_LOCK}),
        (ResticVersion(0, 16, 5), {Feature.RESTORE_PROGRESS_JSON, Feature.RETRY_LOCK}),
        (ResticVersion(0, 17, 0), set(Feature) - SINCE_0_19),
        (ResticVersion(0, 18, 0), set(Feature) - SINCE_0_19),
        (ResticVersion(0, 18, 1), set(Feature) - SINCE_0_19),
        (ResticVersion(0, 19, 0), set(Feature)),
        (ResticVersion(0, 19, 1), set(Feature)),
        (ResticVersion(0, 20, 0), set(Feature)),
    ],
)
def test_features_by_version(version: ResticVersion, expected: set[Feature]) -> None:
    assert {feature for feature in Feature if has_feature(version, feature)} == expected


def _printed_version(binary: str) -> str:
    return subprocess.run([binary, "version"], capture_output=True, text=True, check=True).stdout


async def test_read_version_of_the_real_binary(restic_binary: str) -> None:
    printed = _printed_version(restic_binary)
    version = await read_version(restic_binary)
    assert printed.startswith(f"restic {version} ")
    assert version >= MINIMUM_VERSION


def _fake(tmp_path: Path, output: str) -> str:
    """A deliberately fake `restic` that prints `output` for `restic version`."""
    path = tmp_path / "restic"
    path.write_text(f"#!/bin/sh\necho '{output}'\n", encoding="utf-8")
    path.chmod(0o755)
    return str(path)


async def test_a_restic_older_than_0_14_is_refused(tmp_path: Path) -> None:
    binary = _fake(tmp_path, "restic 0.13.1 compiled with go1.17 on linux/amd64")
    with pytest.raises(ResticError) as raised:
        await read_version(binary)
    assert raised.value.kind is ErrorKind.BINARY
    assert raised.value.message == (
        f"restic 0.13.1 at {binary} is too old: fa-restic needs 0.14.0 or newer"
    )


async def test_something_that_is_not_restic_is_refused(tmp_path: Path) -> None:
    binary = _fake(tmp_path, "hello")
    with pytest.raises(ResticError) as raised:
        await read_version(binary)
    assert raised.value.kind is ErrorKind.BINARY
    assert raised.value.message == f"{binary} is not restic: hello"


async def test_a_missing_binary_is_refused(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-restic")
    with pytest.raises(ResticError) as raised:
        await read_version(missing)
    assert raised.value.kind is ErrorKind.BINARY
    assert raised.value.message.startswith(f"cannot run {missing}: ")
