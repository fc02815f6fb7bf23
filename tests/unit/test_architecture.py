"""The code's shape, checked: no import cycles, short functions, a thin job service.

The layer contracts themselves are import-linter's (pyproject.toml, run by scripts/test).
"""

from __future__ import annotations

import ast
from pathlib import Path

import grimp

PACKAGE = Path(__file__).resolve().parents[2] / "fa_restic"
FUNCTION_LINES_LIMIT = 60
SERVICE_LINES_LIMIT = 290
"""250 until a cluster's node (jobs.node) was wired in: its cancels, health and gate."""


def _definitions() -> list[tuple[str, ast.AST, int]]:
    found: list[tuple[str, ast.AST, int]] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                assert node.end_lineno is not None
                where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}"
                found.append((where, node, node.end_lineno - node.lineno + 1))
    return found


def test_no_import_cycles() -> None:
    graph = grimp.build_graph("fa_restic")
    cycles = sorted(
        f"{importer} <-> {imported}"
        for importer in graph.modules
        for imported in graph.find_modules_directly_imported_by(importer)
        if importer < imported and graph.chain_exists(imported=importer, importer=imported)
    )
    assert cycles == []


def test_no_function_is_longer_than_60_lines() -> None:
    long = [
        f"{where}: {lines} lines"
        for where, node, lines in _definitions()
        if not isinstance(node, ast.ClassDef) and lines > FUNCTION_LINES_LIMIT
    ]
    assert long == []


def test_the_job_service_stays_a_thin_front() -> None:
    (service,) = [lines for where, node, lines in _definitions() if where.endswith(" JobService")]
    assert service <= SERVICE_LINES_LIMIT
