"""Loads the real restic captures in tests/samples (test data, committed with the tests).

A capture is `$ command` / `--- stdout` / lines / `--- stderr` / lines / `--- exit code: N`.
`v14-*`, `v18-*` and `backup-big-*`/`restore-big-*` are copies of the lab captures described
in the shared restic notes (NOTES.md beside them); `v19-*` were captured with restic 0.19.1
the same way. A missing capture is a failure, not a skip: the folder is part of the checkout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

SAMPLES_FOLDER = Path(__file__).resolve().parents[1] / "samples"


def sample_path(name: str) -> Path:
    """Returns the path of the capture `name` (without .txt); raises if it is not there."""
    path = SAMPLES_FOLDER / f"{name}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"restic sample {path.name} not found in {SAMPLES_FOLDER}")
    return path


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
    # Only "\n" ends a line, as for restic's reader: 0.19 starts its signal line with "\r".
    for line in text.split("\n"):
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
    """Returns the capture `name` (without .txt); raises FileNotFoundError if it is absent."""
    # newline="": keep a "\r" inside a line as restic wrote it (no universal newlines).
    with sample_path(name).open(encoding="utf-8", newline="") as file:
        return parse_sample(file.read())


def load_json_lines(name: str) -> list[str]:
    """Returns the JSON lines of an excerpt, plain or timed (`<seconds>\\t<line>`, NOTES §3)."""
    lines: list[str] = []
    for line in sample_path(name).read_text(encoding="utf-8").splitlines():
        _, tab, rest = line.partition("\t")
        line = rest if tab else line
        if line.startswith("{"):
            lines.append(line)
    return lines
