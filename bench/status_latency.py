"""`status_latency` (issue 5): how quickly GET /backup/{id} answers while a backup runs.

16 concurrent clients (one aiohttp session and connection each) send REQUESTS
GETs in all, while restic backs up BENCH_SIZE_MB (default 600) of random data:

- service: the real service, GET /fa/api/v0/backup/{id} of the running backup;
- bare: a bare aiohttp server in a separate process (this module with --bare)
  that answers the same path with the same JSON bytes from memory (captured from
  the service), while raw restic backs the same data up into a fresh repository.

The load starts 1 s after restic started on both sides. Three rounds, the order
flipped every round; ratio = median service p99 / median bare p99. Goal <= 2.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from bench import (
    API,
    NOISE_NOTE,
    ROOT,
    USER,
    Service,
    backup_argv,
    cpu_times,
    free_port,
    get_data,
    headers,
    log,
    make_repo,
    median,
    percentile,
    post,
    restic_binary,
    restic_version,
    say,
    size_mb,
    temporary_folder,
    write_config,
    write_results,
)
from tests.helpers import make_random_tree

CLIENTS = 16
REQUESTS = int(os.environ.get("BENCH_REQUESTS", 3000))
WARMUP_PER_CLIENT = 2
ROUNDS = int(os.environ.get("BENCH_TRIALS", 3))
SETTLE_SECONDS = 1.0
GOAL_RATIO = 2.0
SOURCE = "src"


# -- the bare server (a separate process) ------------------------------------------------


def bare_server(port: int, body_file: Path, work_us: float = 0.0) -> None:
    """Answers GET /fa/api/v0/backup/{id} with fixed JSON bytes, nothing else; after
    `work_us` microseconds of busy work, if given (a calibration: bench.database)."""
    body = body_file.read_bytes()
    work = work_us / 1e6

    async def get_backup(request: web.Request) -> web.Response:
        if work:
            until = time.perf_counter() + work
            while time.perf_counter() < until:
                pass
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get(f"{API}/backup/{{id}}", get_backup)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


async def wait_port(port: int, limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.02)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise RuntimeError(f"nothing listens on port {port} after {limit}s")


# -- the load ----------------------------------------------------------------------------


async def load(url: str, server_pid: int, *, check_code: bool) -> dict[str, Any]:
    """REQUESTS GETs from CLIENTS concurrent clients; returns latency percentiles and the
    server process's own CPU time per request."""
    remaining = REQUESTS
    latencies: list[float] = []
    failures = 0

    async def client() -> None:
        nonlocal remaining, failures
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector, headers=headers()) as session:
            for _ in range(WARMUP_PER_CLIENT):
                async with session.get(url) as response:
                    await response.read()
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                async with session.get(url) as response:
                    body = await response.read()
                    status = response.status
                latencies.append(time.perf_counter() - started)
                if status != 200 or (check_code and b'"code": 2001' not in body):
                    failures += 1

    before = cpu_times(server_pid)
    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    wall = time.perf_counter() - started
    cpu = cpu_times(server_pid).own - before.own
    return {
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "max_ms": max(latencies) * 1000,
        "requests": len(latencies),
        "failures": failures,
        "wall_s": wall,
        "requests_per_s": len(latencies) / wall,
        "server_cpu_ms_per_request": cpu * 1000 / (len(latencies) + CLIENTS * WARMUP_PER_CLIENT),
    }


# -- the two sides -----------------------------------------------------------------------


def service_round(
    folder: Path, data_root: Path, binary: str, backup_id: int
) -> tuple[dict[str, Any], bytes]:
    """Loads the real service during a backup; returns the result and a GET body seen."""
    repo = make_repo(folder, binary)
    port = free_port()
    config = write_config(folder, data_root=data_root, repo=repo, binary=binary, port=port)
    service = Service(config, port)
    service.start()
    url = f"{service.base}{API}/backup/{backup_id}"

    async def run() -> tuple[dict[str, Any], bytes]:
        await service.wait_healthy()
        await asyncio.sleep(1.0)  # its start-up `restic cat config` has ended by now
        async with aiohttp.ClientSession() as session:
            await post(session, f"{service.base}{API}/backup", {"id": backup_id, "path": SOURCE})
            while True:  # until restic runs
                data = await get_data(session, url)
                if data is not None and data["status"] != "pending":
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(SETTLE_SECONDS)
            result = await load(url, service.pid, check_code=True)
            async with session.get(url, headers=headers()) as response:
                body = await response.read()
            after = await get_data(session, url)
            assert after is not None
            result["status_after_load"] = after["status"]
            result["percent_done_after_load"] = after["progress"]["percent_done"]
            await post(session, f"{service.base}{API}/backup/cancel", {"id": backup_id})
        return result, body

    try:
        return asyncio.run(run())
    finally:
        result_code = service.stop()
        if result_code != 0:
            log(f"service exited {result_code}")
        shutil.rmtree(repo.path, ignore_errors=True)


def start_bare(body_file: Path, work_us: float = 0.0) -> tuple[subprocess.Popen[bytes], int]:
    """Starts bare_server in a process of its own; returns it and its port, which it may not
    listen on yet (wait_port)."""
    port = free_port()
    command = [sys.executable, "-m", "bench.status_latency", "--bare", str(port), str(body_file)]
    process = subprocess.Popen(
        [*command, "--work-us", str(work_us)], cwd=ROOT, stdin=subprocess.DEVNULL
    )
    return process, port


def bare_round(folder: Path, source: Path, binary: str, body: bytes) -> dict[str, Any]:
    """Loads the bare server while raw restic backs the same data up."""
    repo = make_repo(folder, binary)
    body_file = folder / "body.json"
    body_file.write_bytes(body)
    server, port = start_bare(body_file)
    url = f"http://127.0.0.1:{port}{API}/backup/1"
    restic: subprocess.Popen[bytes] | None = None
    try:
        asyncio.run(wait_port(port))
        with (folder / "backup.out").open("wb") as output:
            restic = subprocess.Popen(
                backup_argv(binary, repo.cache, 1),
                cwd=source,
                env=repo.environment(),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
            )
        time.sleep(SETTLE_SECONDS)
        result = asyncio.run(load(url, server.pid, check_code=False))
        result["restic_running_after_load"] = restic.poll() is None
    finally:
        if restic is not None and restic.poll() is None:
            restic.send_signal(signal.SIGINT)
            restic.wait()
        server.send_signal(signal.SIGINT)
        server.wait()
        shutil.rmtree(repo.path, ignore_errors=True)
    return result


def main() -> int:
    binary = restic_binary()
    version = restic_version(binary)
    megabytes = size_mb()
    say(
        f"== status_latency: GET under {CLIENTS} clients during a backup, service vs bare "
        f"aiohttp + raw restic, {megabytes} MB (restic {version} at {binary})"
    )
    say(NOISE_NOTE)
    service_results: list[dict[str, Any]] = []
    bare_results: list[dict[str, Any]] = []
    with temporary_folder("status") as scratch:
        folder = Path(scratch)
        data_root = folder / "data"
        source = data_root / "users" / USER / SOURCE
        started = time.monotonic()
        make_random_tree(source, megabytes * 1_000_000)
        log(f"made {megabytes} MB of random data in {time.monotonic() - started:.1f} s")
        body = b""
        for number in range(1, ROUNDS + 1):
            sides = ("service", "bare") if number % 2 == 1 else ("bare", "service")
            for side in sides:
                if side == "service":
                    result, body = service_round(
                        folder / f"service-{number}", data_root, binary, number
                    )
                    service_results.append(result)
                else:
                    result = bare_round(folder / f"bare-{number}", source, binary, body)
                    bare_results.append(result)
                log(
                    f"round {number} {side}: p50 {result['p50_ms']:.2f} ms, p99 "
                    f"{result['p99_ms']:.2f} ms, {result['requests_per_s']:.0f} req/s, "
                    f"failures {result['failures']}"
                )

    service_p99 = median([result["p99_ms"] for result in service_results])
    bare_p99 = median([result["p99_ms"] for result in bare_results])
    ratio = service_p99 / bare_p99
    throughout = all(r["status_after_load"] == "running" for r in service_results) and all(
        r["restic_running_after_load"] for r in bare_results
    )

    def listed(results: list[dict[str, Any]], key: str) -> str:
        return ", ".join(f"{result[key]:.2f}" for result in results)

    say(
        f"status_p99_ratio = {ratio:.2f} (service p99 {service_p99:.2f} ms, bare {bare_p99:.2f} "
        f"ms; median of {ROUNDS} rounds of {REQUESTS} GETs from {CLIENTS} clients; service p99 "
        f"[{listed(service_results, 'p99_ms')}] bare [{listed(bare_results, 'p99_ms')}]; goal <= "
        f"{GOAL_RATIO}: {'met' if ratio <= GOAL_RATIO else 'MISSED'}; restic {version})"
    )
    say(
        f"  p50: service [{listed(service_results, 'p50_ms')}] ms, bare "
        f"[{listed(bare_results, 'p50_ms')}] ms; req/s service "
        f"[{listed(service_results, 'requests_per_s')}] bare "
        f"[{listed(bare_results, 'requests_per_s')}]; server CPU per request service "
        f"[{listed(service_results, 'server_cpu_ms_per_request')}] ms, bare "
        f"[{listed(bare_results, 'server_cpu_ms_per_request')}] ms; restic ran throughout "
        f"every load: {throughout}"
    )
    write_results(
        "status_latency",
        {
            "restic": {"binary": binary, "version": version},
            "size_mb": megabytes,
            "clients": CLIENTS,
            "requests": REQUESTS,
            "status_p99_ratio": ratio,
            "goal": GOAL_RATIO,
            "restic_ran_throughout": throughout,
            "service": service_results,
            "bare": bare_results,
        },
    )
    return 0


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.status_latency")
    parser.add_argument(
        "--bare", nargs=2, metavar=("PORT", "BODY_FILE"), help="run the bare server only"
    )
    parser.add_argument(
        "--work-us", type=float, default=0.0, help="the bare server's busy work per request"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_arguments(sys.argv[1:])
    if arguments.bare:
        bare_server(int(arguments.bare[0]), Path(arguments.bare[1]), arguments.work_us)
        raise SystemExit(0)
    raise SystemExit(main())
