"""The served OpenAPI document: valid OpenAPI 3.1, the same operations as the route table
and the router, and every answer documented as the envelope `{"code", "message", "data"}`."""

from __future__ import annotations

import json
from typing import Any

import jsonschema  # type: ignore[import-untyped]  # no stubs in the dev dependencies
import pytest
from openapi_spec_validator import validate
from openapi_spec_validator.versions.shortcuts import get_spec_version

from fa_restic.api.openapi import ENVELOPE_REF, build_document
from fa_restic.api.routes import ROUTES
from tests.conftest import Api
from tests.helpers import API, auth

METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
OPEN_ROUTES = {f"{API}/healthz", f"{API}/openapi.json", "/metrics"}  # SPEC §4, §5
RAW_SUCCESS = {("GET", "/metrics"), ("GET", f"{API}/openapi.json")}


@pytest.fixture
async def served(make_api: Any, newest_restic: str) -> tuple[Api, dict[str, Any]]:
    api: Api = await make_api(newest_restic)
    response = await api.client.get(f"{API}/openapi.json")  # no token: an open route
    assert response.status == 200
    assert response.content_type == "application/json"
    document: dict[str, Any] = await response.json()
    return api, document


def _operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method.upper(), path): operation
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in METHODS
    }


def _refs(node: Any) -> set[str]:
    """Returns every `$ref` below `node`."""
    if isinstance(node, dict):
        found = {node["$ref"]} if isinstance(node.get("$ref"), str) else set()
        for value in node.values():
            found |= _refs(value)
        return found
    if isinstance(node, list):
        found = set()
        for value in node:
            found |= _refs(value)
        return found
    return set()


def _resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part]
    return node


async def test_document_lists_exactly_the_route_table_and_the_router(
    served: tuple[Api, dict[str, Any]],
) -> None:
    api, document = served
    documented = set(_operations(document))
    table = {(route.method, route.path) for route in ROUTES}
    assert documented == table, {
        "undocumented": sorted(table - documented),
        "not served": sorted(documented - table),
    }
    # What aiohttp actually routes (HEAD is aiohttp's own companion of GET).
    routed = {
        (route.method, route.resource.canonical)
        for route in api.client.app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    assert routed == table
    # Served as built: the document is a function of the route table alone.
    assert document == json.loads(json.dumps(build_document(ROUTES)))
    operation_ids = [operation["operationId"] for operation in _operations(document).values()]
    assert len(operation_ids) == len(set(operation_ids)), operation_ids


async def test_document_is_valid_openapi(served: tuple[Api, dict[str, Any]]) -> None:
    _, document = served
    assert str(get_spec_version(document)) == "OpenAPIV3.1"
    validate(document)  # raises on any violation of the OpenAPI 3.1 schema
    for ref in _refs(document):
        _resolve(document, ref)  # every $ref points somewhere
    for schema in document["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)  # raises on a bad schema


async def test_every_operation_answers_with_the_envelope(
    served: tuple[Api, dict[str, Any]],
) -> None:
    _, document = served
    envelope = _resolve(document, ENVELOPE_REF)
    assert envelope["required"] == ["code", "message", "data"]
    assert set(envelope["properties"]) == {"code", "message", "data"}
    assert envelope["additionalProperties"] is False
    for (method, path), operation in _operations(document).items():
        where = f"{method} {path}"
        responses = operation["responses"]
        # Errors (405, 413, 500, ...) are the envelope everywhere, even on the raw routes.
        assert "default" in responses, where
        for status, response in responses.items():
            content = response["content"]
            if (method, path) in RAW_SUCCESS and status == "200":
                assert ENVELOPE_REF not in _refs(content), where
                continue
            assert list(content) == ["application/json"], (where, status)
            assert ENVELOPE_REF in _refs(content["application/json"]["schema"]), (where, status)
        if path in OPEN_ROUTES:
            assert operation["security"] == [], where
            assert "401" not in responses, where
        else:
            assert operation["security"] == [{"bearer": []}], where
            assert {"200", "400", "401"} <= set(responses), where
        if "{id}" in path:
            # The id in the path; a route may take query parameters besides (SPEC §11).
            (parameter,) = [found for found in operation["parameters"] if found["in"] == "path"]
            assert parameter["name"] == "id" and parameter["required"] is True
            assert parameter["schema"]["type"] == "integer" and parameter["schema"]["minimum"] == 1
            for found in operation["parameters"]:
                assert found["in"] in ("path", "query"), (where, found)
    assert "403" in _operations(document)[("POST", f"{API}/backup/destroy-repo")]["responses"]


async def test_real_answers_match_what_is_documented(served: tuple[Api, dict[str, Any]]) -> None:
    """Without a token, every route answers as documented: open routes 200, the rest a
    401 envelope that validates against the document's schema for 401."""
    api, document = served
    for (method, path), operation in _operations(document).items():
        url = path.replace("{id}", "1")
        response = await api.client.request(method, url)
        if path in OPEN_ROUTES:
            assert response.status == 200, (method, path)
            continue
        assert response.status == 401, (method, path)
        body = await response.json()
        schema = operation["responses"]["401"]["content"]["application/json"]["schema"]
        jsonschema.validate(body, {**schema, "components": document["components"]})
        assert body["code"] == 401 and body["data"] is None
    # An unknown route: the documented `default` envelope.
    response = await api.client.get(f"{API}/nope")
    assert response.status == 404
    assert await response.json() == {"code": 404, "message": "not found", "data": None}


async def test_undocumented_methods_get_405_with_allow(served: tuple[Api, dict[str, Any]]) -> None:
    """Every path answers a method it does not document with the 405 envelope and an `Allow`
    header (RFC 9110) naming at least its documented methods. (`/backup/cancel` and the like
    also match `/backup/{id}`, so their Allow adds GET and DELETE: those answer 400.)"""
    api, document = served
    for path, item in document["paths"].items():
        documented = {method.upper() for method in item if method in METHODS}
        url = path.replace("{id}", "1")
        for method in sorted({"GET", "POST", "PUT", "PATCH", "DELETE"} - documented):
            response = await api.client.request(method, url, headers=auth("alice"))
            if response.status != 405:
                # `/backup/cancel` and the like also match `/backup/{id}` (GET, DELETE),
                # whose id check answers: the SPEC's 400 for an id that is not a number.
                body = await response.json()
                assert (method, response.status, body["code"]) in {
                    ("GET", 400, 400),
                    ("DELETE", 400, 400),
                }, (method, path, body)
                assert body["message"].endswith("id must be a positive integer"), body
                continue
            assert await response.json() == {
                "code": 405,
                "message": "method not allowed",
                "data": None,
            }, (method, path)
            allowed = {part.strip() for part in response.headers["Allow"].split(",")}
            assert documented <= allowed, (method, path, allowed)
