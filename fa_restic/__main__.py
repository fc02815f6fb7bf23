"""Command line: `fa-restic serve`, `fa-restic rebuild-state`, `fa-restic import-state`, and
the API client commands."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
from pathlib import Path

from fa_restic.config import ConfigError, Settings, load_settings
from fa_restic.restic.errors import ResticError
from fa_restic.store import StateError

log = logging.getLogger("fa_restic")

DEFAULT_CONFIG_ENV = "FA_RESTIC_CONFIG"


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# C0 and C1 controls (CR, LF, ESC, ...), DEL, Unicode's line and paragraph separators, and
# lone surrogates (what Python makes of bytes that are not UTF-8).
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    character = match.group(0)
    short = _SHORT_ESCAPES.get(character)
    if short is not None:
        return short
    code = ord(character)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def one_line(text: str) -> str:
    """Returns `text` with control characters and lone surrogates escaped (`\\n`, `\\x1b`,
    `\\udcff`): what it holds stays readable, and it cannot start a line of its own."""
    return _UNSAFE.sub(_escape, text)


class OneLineFormatter(logging.Formatter):
    """Formats each record, traceback included, as exactly one line (SPEC §8, §9).

    User-given text (paths, ids, token fields, restic's output about them) reaches log
    messages in many places; escaping the whole formatted record here, once, means none of
    them can forge a line, whatever the message or its arguments hold.
    """

    def format(self, record: logging.LogRecord) -> str:
        return one_line(super().format(record))


def configure_logging(level: str = "INFO") -> None:
    """Logs one line per event to stderr (journald adds time stamps; a terminal needs ours)."""
    # Text the terminal's encoding cannot show is escaped rather than a logging error.
    reconfigure = getattr(sys.stderr, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="backslashreplace")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(LOG_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _settings(arguments: argparse.Namespace) -> Settings:
    path = arguments.config or os.environ.get(DEFAULT_CONFIG_ENV)
    if not path:
        raise ConfigError(f"no config: pass --config FILE or set {DEFAULT_CONFIG_ENV}")
    return load_settings(Path(path))


def _serve(arguments: argparse.Namespace) -> int:
    from fa_restic.server import serve

    return serve(_settings(arguments))


def _rebuild_state(arguments: argparse.Namespace) -> int:
    from fa_restic.rebuild import rebuild_state

    return asyncio.run(rebuild_state(_settings(arguments)))


def _import_state(arguments: argparse.Namespace) -> int:
    import psycopg

    from fa_restic.cluster.database import DATABASE_URL_ENV
    from fa_restic.cluster.importing import import_state_file
    from fa_restic.jobs.records import LAYOUT

    url = arguments.database or os.environ.get(DATABASE_URL_ENV)
    if not url:
        raise ConfigError(f"no database: pass --database URL or set {DATABASE_URL_ENV}")
    try:
        return import_state_file(Path(arguments.source), url, LAYOUT)
    except (OSError, psycopg.Error) as error:  # DatabaseUnavailable is an OSError
        print(f"fa-restic: import-state: {error}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fa-restic", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("FA_RESTIC_LOG_LEVEL", "INFO"))
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP API")
    serve.add_argument("--config", help=f"TOML config file (or ${DEFAULT_CONFIG_ENV})")
    serve.set_defaults(run=_serve)
    rebuild = commands.add_parser(
        "rebuild-state",
        help="rebuild the backup records from the repository's tagged snapshots (in the state "
        "file, or with [cluster] in the database; every node stopped)",
    )
    rebuild.add_argument("--config", help=f"TOML config file (or ${DEFAULT_CONFIG_ENV})")
    rebuild.set_defaults(run=_rebuild_state)
    importing = commands.add_parser(
        "import-state", help="copy a single node's records into a cluster's database"
    )
    importing.add_argument(
        "--from", dest="source", required=True, help="the state file (paths.state_file)"
    )
    importing.add_argument(
        "--database",
        help="libpq URL of the database (or $FA_DATABASE_URL, which keeps a password out of ps)",
    )
    importing.set_defaults(run=_import_state)
    from fa_restic.cli import add_client_commands

    add_client_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the process exit code."""
    arguments = build_parser().parse_args(argv)
    configure_logging(arguments.log_level.upper())
    try:
        code: int = arguments.run(arguments)
    except ConfigError as error:
        print(f"fa-restic: config: {error}", file=sys.stderr)
        return 2
    except (StateError, ResticError) as error:
        print(f"fa-restic: {error}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
