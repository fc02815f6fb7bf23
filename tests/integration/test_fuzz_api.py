"""schemathesis against a real `fa-restic serve`: schema-driven requests (valid and invalid)
to every operation of the served OpenAPI document, with a valid JWT for a plain user.

Bounded and deterministic: a fixed seed per operation and generation mode, at most
MAX_EXAMPLES cases each, plus one case per boundary id of the `{id}` routes (a few hundred
in all, the same cases on every run), no shrinking, ~10 s. Every answer must be: no 5xx,
the envelope with exactly code/message/data for JSON, no traceback anywhere, conformant
to the document (status, content type, schema), invalid data rejected with a 4xx, and a
GET of any positive record id a 200 (2001 or 4001, SPEC §5). Negative generation also drops or
mangles the Authorization header now and then: those cases must get the 401 envelope.

The cases come from schemathesis's public strategies (`APIOperation.as_strategy`) driven
by Hypothesis here, not from its pytest plugin: `schemathesis.pytest.from_fixture` fails
under pytest 9 (`'Function' object has no attribute '_nodeid'`, schemathesis 4.32.5).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from schemathesis import APIOperation, Case, GenerationMode, Response
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.result import Ok

from fa_restic.names import MAX_ID
from tests.conftest import Api
from tests.helpers import API, auth, free_port, make_home, make_small_tree, write_config

SEED = 20240531
MAX_EXAMPLES = 20
TIME_BUDGET_SECONDS = 60.0
RAW_ROUTES = {"/metrics", f"{API}/openapi.json"}  # not the envelope on success
ENVELOPE_KEYS = {"code", "message", "data"}
AnyCase = Case[APIOperation[Any, Any, Any, Any]]
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@dataclass
class Service:
    base_url: str
    folder: Path
    log: Path
    process: subprocess.Popen[bytes]


@pytest.fixture
def service(tmp_path: Path, newest_restic: str) -> Iterator[Service]:
    """`fa-restic serve` as a subprocess on a free port, with a home for alice."""
    folder = tmp_path / "service"
    folder.mkdir()
    port = free_port()
    config = write_config(folder, newest_restic, port=port)
    make_small_tree(make_home(folder / "data", "alice") / "project")
    log = folder / "serve.log"
    environment = {key: value for key, value in os.environ.items() if not key.startswith("FA_")}
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "fa_restic", "serve", "--config", str(config)],
            stdout=output,
            stderr=output,
            env=environment,
        )
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            pytest.fail(f"fa-restic serve exited {process.returncode}: {log.read_text()}")
        try:
            if requests.get(f"{base_url}{API}/healthz", timeout=5).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"fa-restic serve did not answer: {log.read_text()}")
        time.sleep(0.1)
    try:
        yield Service(base_url, folder, log, process)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


@dataclass
class Findings:
    cases: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    trace: list[str] = field(default_factory=list)


def _envelope_checks(case: AnyCase, response: Response) -> None:
    """Our own contract on top of the schema: SPEC §5's envelope, and never a traceback."""
    assert response.status_code < 500, "server error"
    assert "Traceback" not in response.text, "a traceback in the body"
    path = case.operation.path
    media = (response.headers.get("content-type") or [""])[0].split(";")[0].strip()
    if path in RAW_ROUTES and response.status_code == 200:
        return
    assert media == "application/json", f"not JSON: {media!r}"
    body = response.json()
    assert isinstance(body, dict) and set(body) == ENVELOPE_KEYS, f"not the envelope: {body!r}"
    assert isinstance(body["code"], int) and isinstance(body["message"], str)
    if response.status_code == 200:
        assert body["code"] in (2001, 4001), body
    else:
        assert body["code"] == response.status_code and body["data"] is None, body
    # Any positive integer id is a valid GET: known -> 2001, unknown -> 4001, never a 400.
    if (
        case.meta is not None
        and case.meta.generation.mode is GenerationMode.POSITIVE
        and case.method == "GET"
        and path.endswith("{id}")  # a record; browsing a backup that is not a success is a 400
    ):
        assert response.status_code == 200, f"GET of a positive id answered {body!r}"


BOUNDARY_IDS = (1, 10**18 - 1, 10**18, MAX_ID)


def _boundary_runner(
    operation: Any, job_id: int, base_url: str, findings: Findings
) -> Callable[[], None]:
    """One schemathesis case with the path id fixed at a boundary of the documented range."""
    return _runner(
        operation,
        GenerationMode.POSITIVE,
        0,
        base_url,
        findings,
        strategy=operation.as_strategy(
            generation_mode=GenerationMode.POSITIVE, path_parameters={"id": job_id}
        ),
        max_examples=1,
    )


def _runner(
    operation: Any,
    mode: GenerationMode,
    index: int,
    base_url: str,
    findings: Findings,
    *,
    strategy: Any = None,
    max_examples: int = MAX_EXAMPLES,
) -> Callable[[], None]:
    headers = auth("alice")
    if strategy is None:
        strategy = operation.as_strategy(generation_mode=mode)
    checks = CHECKS
    if any(parameter.location == "query" for parameter in operation.query):
        # A negative case "with an unknown query parameter and no Authorization" was sent with
        # neither (the parameter dropped by the serialization, the header put back by this
        # harness) and flagged when the valid request was answered: on the query routes, the
        # refusal of unknown parameters is checked by test_find_restore instead.
        checks = [check for check in CHECKS if check is not negative_data_rejection]

    @seed(SEED + index)
    @settings(
        max_examples=max_examples,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: bounded time
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case: AnyCase) -> None:
        findings.cases += 1
        findings.trace.append(case.as_curl_command(headers=headers, base_url="http://service"))
        try:
            response = case.call(base_url=base_url, headers=headers, timeout=30)
        except requests.RequestException as error:
            findings.failures.append(f"{case.as_curl_command(base_url=base_url)}\n  {error!r}")
            return
        findings.by_status[response.status_code] = (
            findings.by_status.get(response.status_code, 0) + 1
        )
        try:
            case.validate_response(response, checks=checks, headers=headers)
            _envelope_checks(case, response)
        except Exception as error:  # a schemathesis FailureGroup or our AssertionError
            findings.failures.append(
                f"[{mode.value}] {case.as_curl_command(headers=headers, base_url=base_url)}\n"
                f"  -> {response.status_code} {response.text[:300]!r}\n"
                f"  {str(error).strip()[:600]}"
            )

    return run


# In the default suite: the run itself is bounded by MAX_EXAMPLES (~10 s here) and checked
# against TIME_BUDGET_SECONDS; the timeout only catches a hang.
@pytest.mark.timeout(120)
def test_schemathesis_finds_no_server_error_and_only_envelopes(service: Service) -> None:
    document = requests.get(f"{service.base_url}{API}/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(document)
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), f"schemathesis could not load an operation: {result.err()}"
        operations.append(result.ok())
    assert len(operations) == len([1 for item in document["paths"].values() for method in item]), (
        "schemathesis did not load every operation"
    )

    findings = Findings()
    started = time.monotonic()
    index = 0
    for operation in operations:
        raw = document["paths"][operation.path][operation.method.lower()]
        # Only an operation with an input has invalid inputs to generate.
        negatable = "parameters" in raw or "requestBody" in raw
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if mode is GenerationMode.NEGATIVE and not negatable:
                continue
            _runner(operation, mode, index, service.base_url, findings)()
            index += 1
        if "{id}" in operation.path:
            for job_id in BOUNDARY_IDS:
                _boundary_runner(operation, job_id, service.base_url, findings)()
    elapsed = time.monotonic() - started

    summary = (
        f"{findings.cases} cases over {len(operations)} operations in {elapsed:.1f}s, "
        f"statuses {dict(sorted(findings.by_status.items()))}"
    )
    # The same cases on every run (compare this digest between runs to see it).
    digest = hashlib.sha256("\n".join(findings.trace).encode()).hexdigest()[:16]
    print(f"{summary}, cases digest {digest}")
    assert not findings.failures, (
        summary
        + "\n\n"
        + "\n\n".join(findings.failures[:20])
        + "\n\nthe service's log, last lines:\n"
        + service.log.read_text(encoding="utf-8", errors="replace")[-6000:]
    )
    assert findings.cases >= 150, summary
    assert {200, 400, 401, 403} <= set(findings.by_status), summary
    assert elapsed < TIME_BUDGET_SECONDS, summary

    # The service survived all of it and stops cleanly, whatever the fuzzing started.
    assert service.process.poll() is None, "the service died during the run"
    service.process.send_signal(signal.SIGTERM)
    assert service.process.wait(timeout=30) == 0
    serve_log = service.log.read_text(encoding="utf-8", errors="replace")
    assert "Traceback" not in serve_log, serve_log[-4000:]
    assert "unexpected failure" not in serve_log, serve_log[-4000:]


async def test_every_id_a_body_accepts_works_in_urls(make_api: Any, newest_restic: str) -> None:
    """Found by the run above: ids of 19 digits were accepted in bodies (up to 2**63 - 1)
    but refused in URLs (400), so such a backup could be neither read nor deleted."""
    api: Api = await make_api(newest_restic)
    make_small_tree(api.home("alice") / "project")
    for job_id in (10**18, MAX_ID):
        status, body = await api.call("POST", "/backup", json={"id": job_id, "path": "project"})
        assert (status, body["code"], body["data"]["id"]) == (200, 2001, job_id), body
        done = await api.wait("backup", job_id)
        assert done["status"] == "success", done
        status, body = await api.call(
            "POST", "/restore", json={"restore_id": job_id, "backup_id": job_id, "dst_path": "r"}
        )
        assert (status, body["code"]) == (200, 2001), body
        assert (await api.wait("restore", job_id))["status"] == "success"
        assert await api.call("DELETE", f"/backup/{job_id}") == (
            200,
            {"code": 2001, "message": "success", "data": {"id": job_id, "forget": "queued"}},
        )
        status, body = await api.call("GET", f"/backup/{job_id}")
        assert (status, body["code"]) == (200, 4001), body
    # One past the range is refused the same way in a body and in a URL.
    status, body = await api.call("POST", "/backup", json={"id": MAX_ID + 1, "path": "project"})
    assert (status, body["message"]) == (
        400,
        "err when backup file: id: must be a positive integer",
    )
    status, body = await api.call("GET", f"/backup/{MAX_ID + 1}")
    assert (status, body["message"]) == (400, "err when load backup: id must be a positive integer")
