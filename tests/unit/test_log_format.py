"""Logs are one line per event (SPEC §8) and user-given text never starts a line of its own
(SPEC §9): the formatter `fa-restic` logs with escapes the whole formatted record."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from fa_restic.__main__ import LOG_FORMAT, OneLineFormatter, one_line


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger that writes through OneLineFormatter into a string."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(OneLineFormatter(LOG_FORMAT))
    logger = logging.getLogger("fa_restic.test_log_format")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    yield logger, stream
    logger.removeHandler(handler)


def test_one_line_escapes_what_could_start_a_line() -> None:
    assert one_line("a\nb\rc") == "a\\nb\\rc"
    assert one_line("tab\there") == "tab\\there"
    assert one_line("\x1b[2Kcleared") == "\\x1b[2Kcleared"
    assert one_line("nul\x00 del\x7f c1\x85") == "nul\\x00 del\\x7f c1\\x85"
    assert one_line("line\u2028separator\u2029") == "line\\u2028separator\\u2029"
    # A lone surrogate: what Python makes of a byte that is not UTF-8 (surrogateescape).
    assert one_line("bad \udcff byte \ud800") == "bad \\udcff byte \\ud800"
    # Text, accents and other scripts stay as they are.
    assert one_line("données/ファイル 1 2") == "données/ファイル 1 2"


def test_a_forged_line_in_an_argument_stays_on_its_line(
    logged: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = logged
    forged = "docs\n2026-01-01 00:00:00,000 INFO fa_restic.jobs: backup 9: success\rX"
    logger.info("backup %d: accepted from %s for %s", 7, "alice", forged)
    output = stream.getvalue()
    assert output.count("\n") == 1 and output.endswith("\n")
    assert "\r" not in output
    assert output.rstrip("\n").endswith(
        "backup 7: accepted from alice for "
        "docs\\n2026-01-01 00:00:00,000 INFO fa_restic.jobs: backup 9: success\\rX"
    )


def test_a_traceback_is_one_line(logged: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = logged
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        logger.exception("unexpected failure on %s %s", "POST", "/x\n/y")
    output = stream.getvalue()
    assert output.count("\n") == 1, output
    assert "unexpected failure on POST /x\\n/y\\nTraceback (most recent call last):" in output
    assert "ValueError: bad\\nvalue" in output


def test_an_unencodable_message_is_written_not_a_logging_error(
    logged: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = logged
    logger.warning("path %s", "caf\udce9")  # Latin-1 `é` read as UTF-8
    assert stream.getvalue().rstrip("\n").endswith("path caf\\udce9")
    stream.getvalue().encode("utf-8")  # strict: would raise if a surrogate were left
