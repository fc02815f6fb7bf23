"""README.md and config.example.toml keep up with the code: every route and every config key
is documented, and every setting the code reads is in the example config."""

from __future__ import annotations

import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from fa_restic.api.routes import ROUTES, Route
from fa_restic.config import Settings

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
EXAMPLE = ROOT / "config.example.toml"

# `# [repository.env]`, `# [[auth.tokens]]`: a section header in a comment.
_COMMENTED_HEADER = re.compile(r"^\s*#\s*(\[\[?)\s*([A-Za-z0-9_.]+)\s*\]\]?")
_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.]+)\s*\]\]?")
# `name = ...` inside a comment: `# password_command = "..."`, `# or: token = "..."`.
# Lower-case names only, so example values such as `AWS_ACCESS_KEY_ID = "..."` are not keys.
_COMMENTED_KEY = re.compile(r"(?<![A-Za-z0-9_])([a-z_][a-z0-9_]*)\s*=")


def _section_name(bracket: str, name: str) -> str:
    """`[[auth.tokens]]` holds the entries of `auth.tokens[]`; `[server]` is `server`."""
    return f"{name}[]" if bracket == "[[" else name


def _walk_toml(table: dict[str, Any], prefix: str, into: set[str]) -> None:
    for key, value in table.items():
        path = f"{prefix}.{key}" if prefix else key
        into.add(path)
        if path in free_tables():
            continue  # its keys are the user's (environment variable names), not settings
        if isinstance(value, dict):
            _walk_toml(value, path, into)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for entry in value:
                _walk_toml(entry, f"{path}[]", into)


def _commented_keys(text: str) -> set[str]:
    """Returns the dotted keys the example gives only in comments (`repository.password_command`,
    `repository.env`, `auth.tokens`, `auth.tokens[].token_sha256`, ...)."""
    found: set[str] = set()
    section = ""
    commented_section: str | None = None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            section = _section_name(header.group(1), header.group(2))
            commented_section = None
            continue
        if "#" not in line:
            continue
        commented = _COMMENTED_HEADER.match(line)
        if commented:
            commented_section = _section_name(commented.group(1), commented.group(2))
            found.add(commented_section.removesuffix("[]"))
            continue
        comment = line[line.index("#") :]
        owner = commented_section if commented_section is not None else section
        if owner in free_tables():
            continue  # its keys are the user's (environment variable names), not settings
        for match in _COMMENTED_KEY.finditer(comment):
            found.add(f"{owner}.{match.group(1)}" if owner else match.group(1))
    return found


def example_keys() -> set[str]:
    """Every dotted key of config.example.toml, set or commented out."""
    text = EXAMPLE.read_text(encoding="utf-8")
    keys: set[str] = set()
    _walk_toml(tomllib.loads(text), "", keys)
    return keys | _commented_keys(text)


def example_sections() -> set[str]:
    """The top-level tables of config.example.toml (`server`, `paths`, ...)."""
    document = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    return {name for name, value in document.items() if isinstance(value, dict)}


def _nested_model(annotation: Any) -> tuple[type[BaseModel], bool] | None:
    """Returns (model, is_list) when a field holds a settings model or a list of them."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    origin = typing.get_origin(annotation)
    arguments = typing.get_args(annotation)
    if origin is list and arguments:
        inner = arguments[0]
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return inner, True
    if origin in (typing.Union, types.UnionType):
        for argument in arguments:
            nested = _nested_model(argument)
            if nested is not None:
                return nested
    return None


def settings_fields(model: type[BaseModel] = Settings, prefix: str = "") -> set[str]:
    """Every dotted setting the code reads, sections included (`auth.tokens[].user`)."""
    paths: set[str] = set()
    for name, field in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        paths.add(path.removesuffix("[]"))
        nested = _nested_model(field.annotation)
        if nested is not None:
            inner, is_list = nested
            paths |= settings_fields(inner, f"{path}[]" if is_list else path)
    return paths


def free_tables(model: type[BaseModel] = Settings, prefix: str = "") -> set[str]:
    """The settings that are free-form tables (`repository.env`): any key goes there."""
    paths: set[str] = set()
    for name, field in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        if typing.get_origin(field.annotation) is dict:
            paths.add(path)
        nested = _nested_model(field.annotation)
        if nested is not None:
            inner, is_list = nested
            paths |= free_tables(inner, f"{path}[]" if is_list else path)
    return paths


def readme() -> str:
    return README.read_text(encoding="utf-8")


def test_the_scanners_find_what_they_must() -> None:
    keys = example_keys()
    for expected in (
        "server.host",
        "jobs.max_attempts",
        "repository.password_command",
        "repository.env",
        "auth.tokens",
        "auth.tokens[].token",
        "auth.tokens[].token_sha256",
        "auth.tokens[].user",
        "auth.tokens[].admin",
    ):
        assert expected in keys, expected
    assert not any("AWS" in key for key in keys), keys
    assert free_tables() == {"repository.env"}
    fields = settings_fields()
    assert {"server", "auth.tokens", "auth.tokens[].token_sha256", "repository.env"} <= fields


@pytest.mark.parametrize("path", sorted({route.path for route in ROUTES}))
def test_every_route_is_in_the_readme(path: str) -> None:
    assert path in readme(), f"README.md does not mention the route {path}"


def _curl_lines(text: str) -> list[str]:
    """The README's curl commands, each joined onto one line."""
    joined = text.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip().startswith("curl ")]


def _is_method(line: str, method: str) -> bool:
    if method == "DELETE":
        return "-X DELETE" in line
    if method == "POST":
        return "-X POST" in line or " -d " in line
    return "-X " not in line and " -d " not in line


@pytest.mark.parametrize("route", ROUTES, ids=lambda route: f"{route.method} {route.path}")
def test_every_route_has_a_curl_example(route: Route) -> None:
    relative = route.path.removeprefix("/fa/api/v0")
    base = r"\$API" if relative != route.path else r"http://127\.0\.0\.1:8080"
    url = re.compile(base + re.escape(relative).replace(re.escape("{id}"), r"\d+") + r"(\s|$)")
    examples = [
        line
        for line in _curl_lines(readme())
        if url.search(line) and _is_method(line, route.method)
    ]
    assert examples, f"README.md has no curl example for {route.method} {route.path}"


@pytest.mark.parametrize("section", sorted(example_sections()))
def test_every_example_config_section_is_in_the_readme(section: str) -> None:
    assert f"`[{section}]`" in readme(), f"README.md does not name the section [{section}]"


@pytest.mark.parametrize("key", sorted(example_keys() - example_sections()))
def test_every_example_config_key_is_in_the_readme(key: str) -> None:
    assert f"`{key}`" in readme(), f"README.md does not document the config key `{key}`"


@pytest.mark.parametrize("field", sorted(settings_fields()))
def test_every_setting_is_in_the_example_config(field: str) -> None:
    keys = example_keys()
    assert field in keys, f"config.example.toml does not list {field} (as a key or a comment)"
