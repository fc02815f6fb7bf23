"""Client commands that talk to a running fa-restic over HTTP (filled in by the CLI issue)."""

from __future__ import annotations

import argparse
from typing import Any


def add_client_commands(commands: Any) -> None:
    """Adds the client subcommands to the parser."""
    del commands
    _ = argparse
