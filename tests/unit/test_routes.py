"""The route table (fa_restic.api.routes) is the one description of the routes: every row
has its handler and its OpenAPI operation, every handler has its row, and the rows say what
SPEC §4 and §5 say of each route."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from fa_restic.api import handlers as handlers_module
from fa_restic.api.handlers import Handlers
from fa_restic.api.openapi import SCHEMAS, build_document
from fa_restic.api.routes import METHOD_AND_PATH_TO_ROUTE, ROUTES, Auth, Route
from fa_restic.names import API_PREFIX

API_FOLDER = Path(__file__).resolve().parents[2] / "fa_restic" / "api"
SPEC_PREFIXES = {  # SPEC §5, "Prefixes"
    "err when backup file",
    "err when restore file",
    "err when cancel backup",
    "err when cancel all backup",
    "err when destroy repo",
    "err when delete a backup",
    "err when cancel restore",
    "err when cancel all restore",
    "err when load backup",
    "err when load restore",
}
OPEN_ROUTES = {f"{API_PREFIX}/healthz", f"{API_PREFIX}/openapi.json", "/metrics"}  # SPEC §4


def _handler_methods() -> set[str]:
    return {
        name
        for name, member in inspect.getmembers(Handlers, inspect.iscoroutinefunction)
        if not name.startswith("_")
    }


def test_every_handler_has_a_row_and_every_row_a_handler() -> None:
    assert {route.handler.__name__ for route in ROUTES} == _handler_methods()
    for route in ROUTES:
        assert getattr(Handlers, route.handler.__name__) is route.handler, route.path


def test_rows_are_unique_and_found_by_method_and_path() -> None:
    assert len(METHOD_AND_PATH_TO_ROUTE) == len(ROUTES)
    assert all(METHOD_AND_PATH_TO_ROUTE[(route.method, route.path)] is route for route in ROUTES)


@pytest.mark.parametrize("route", ROUTES, ids=lambda route: f"{route.method} {route.path}")
def test_every_row_has_its_operation(route: Route) -> None:
    operation = build_document()["paths"][route.path][route.method.lower()]
    assert operation["operationId"] == route.name
    if route.body is not None:
        assert route.body.__name__ in SCHEMAS
    if route.data is not None:
        assert route.data in SCHEMAS and route.raw is None


def test_every_prefix_of_the_spec_is_in_the_table() -> None:
    assert {route.prefix for route in ROUTES if route.prefix} == SPEC_PREFIXES


def test_a_row_that_can_refuse_has_a_prefix() -> None:
    for route in ROUTES:
        if route.body is not None or route.takes_id or route.auth is Auth.ADMIN:
            assert route.prefix, route.path


def test_auth_rules() -> None:
    assert {route.path for route in ROUTES if route.auth is Auth.NONE} == OPEN_ROUTES
    admin = {(route.method, route.path) for route in ROUTES if route.auth is Auth.ADMIN}
    assert admin == {("POST", f"{API_PREFIX}/backup/destroy-repo")}


def test_only_gets_of_an_id_answer_4001() -> None:
    answering = {route.path for route in ROUTES if route.unknown_id_answers_4001}
    assert answering == {
        f"{API_PREFIX}/backup/{{id}}",
        f"{API_PREFIX}/restore/{{id}}",
        f"{API_PREFIX}/backup/{{id}}/files",
    }
    assert all(METHOD_AND_PATH_TO_ROUTE[("GET", path)].prefix for path in answering)


def test_raw_answers() -> None:
    raw = {route.path for route in ROUTES if route.raw is not None}
    assert raw == {f"{API_PREFIX}/openapi.json", "/metrics"}


def test_aliases_answer_as_their_route() -> None:
    aliases = [route for route in ROUTES if route.alias_of]
    assert {route.path for route in aliases} == {
        f"{API_PREFIX}/backup/new",
        f"{API_PREFIX}/restore/new",
    }
    for route in aliases:
        original = METHOD_AND_PATH_TO_ROUTE[(route.method, route.alias_of or "")]
        assert (route.handler, route.prefix, route.body, route.auth, route.data) == (
            original.handler,
            original.prefix,
            original.body,
            original.auth,
            original.data,
        )


def test_fixed_paths_come_before_an_id_in_the_same_folder() -> None:
    """aiohttp tries routes in order: `/backup/{id}` first would take `repo-destroyed`."""
    for index, route in enumerate(ROUTES):
        if not route.takes_id:
            continue
        folder = route.path.removesuffix("{id}")
        later = [other.path for other in ROUTES[index + 1 :] if other.path.startswith(folder)]
        assert all(path.endswith("{id}") for path in later), (route.path, later)


def test_handlers_catch_no_job_errors() -> None:
    """Errors map to the envelope in the middleware; a handler catches at most a token error."""
    tree = ast.parse(inspect.getsource(handlers_module))
    caught = {
        ast.unparse(node.type)
        for node in ast.walk(tree)
        if isinstance(node, ast.ExceptHandler) and node.type is not None
    }
    assert caught <= {"ApiError"}


def test_the_api_imports_of_restic_only_its_errors() -> None:
    for path in sorted(API_FOLDER.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                module = node.module
                assert not module.startswith("fa_restic.restic") or module == (
                    "fa_restic.restic.errors"
                ), (path.name, module)
                # The document is built from the table alone, not from the app.
                assert not (path.name == "openapi.py" and module == "fa_restic.api.app")
