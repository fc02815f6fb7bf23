"""Command line: `fa-restic serve`, `fa-restic rebuild-state`, and the API client commands."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from fa_restic.config import ConfigError, Settings, load_settings
from fa_restic.restic.errors import ResticError
from fa_restic.store import StateError

log = logging.getLogger("fa_restic")

DEFAULT_CONFIG_ENV = "FA_RESTIC_CONFIG"


def configure_logging(level: str = "INFO") -> None:
    """Logs one line per event to stderr (journald adds time stamps; a terminal needs ours)."""
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fa-restic", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("FA_RESTIC_LOG_LEVEL", "INFO"))
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP API")
    serve.add_argument("--config", help=f"TOML config file (or ${DEFAULT_CONFIG_ENV})")
    serve.set_defaults(run=_serve)
    rebuild = commands.add_parser(
        "rebuild-state", help="rebuild the backup records from the repository's tagged snapshots"
    )
    rebuild.add_argument("--config", help=f"TOML config file (or ${DEFAULT_CONFIG_ENV})")
    rebuild.set_defaults(run=_rebuild_state)
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
