"""Loads the real restic captures in shared/restic/samples (see NOTES.md there).

A capture is `$ command` / `--- stdout` / lines / `--- stderr` / lines / `--- exit code: N`.
The folder is $FA_RESTIC_SAMPLES, or shared/restic/samples beside the repository; tests that
need it are skipped with a reason when it is absent.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest


def samples_folder() -> Path:
    configured = os.environ.get("FA_RESTIC_SAMPLES")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[3] / "shared" / "restic" / "samples"


@dataclass(frozen=True)
class Sample:
    command: str
    stdout: list[str]
    stderr: list[str]
    exit_code: int


_EXIT = re.compile(r"--- exit code: (-?\d+)$")


def parse_sample(text: str) -> Sample:
    """Splits a capture into its command, stdout lines, stderr lines and exit code."""
    command = ""
    stdout: list[str] = []
    stderr: list[str] = []
    exit_code: int | None = None
    section: list[str] | None = None
    for line in text.splitlines():
        if exit_code is not None:
            break
        if section is None and line.startswith("$ ") and not command:
            command = line[2:]
        elif line == "--- stdout":
            section = stdout
        elif line == "--- stderr":
            section = stderr
        elif (match := _EXIT.fullmatch(line)) is not None:
            exit_code = int(match.group(1))
        elif section is not None:
            section.append(line)
    if not command or exit_code is None:
        raise ValueError("not a `$ command / --- stdout / --- stderr / --- exit code` capture")
    return Sample(command, stdout, stderr, exit_code)


def load(name: str) -> Sample:
    """Returns the capture `name` (without .txt); skips the test if the samples are absent."""
    folder = samples_folder()
    if not folder.is_dir():
        pytest.skip(f"restic samples not found at {folder} (set FA_RESTIC_SAMPLES)")
    path = folder / f"{name}.txt"
    if not path.is_file():
        pytest.skip(f"restic sample {path.name} not found in {folder}")
    return parse_sample(path.read_text(encoding="utf-8"))


def load_json_lines(name: str) -> list[str]:
    """Returns the JSON lines of an excerpt, plain or timed (`<seconds>\\t<line>`, NOTES §3)."""
    folder = samples_folder()
    path = folder / f"{name}.txt"
    if not path.is_file():
        pytest.skip(f"restic sample {path.name} not found in {folder}")
    lines: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        _, tab, rest = line.partition("\t")
        line = rest if tab else line
        if line.startswith("{"):
            lines.append(line)
    return lines
