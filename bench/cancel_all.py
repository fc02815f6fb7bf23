"""`cancel_all` (issue 8): cancel-all of 50,000 pending backups, and GETs meanwhile.

A real service (`max_running = 1`, the default `max_pending_per_user = 100`) takes
one backup of user `holder`, whose restic is stopped (SIGSTOP on its process group)
as soon as it appears, so that nothing else can start. Then BENCH_PENDING (50,000)
`POST /fa/api/v0/backup` of a tiny file are sent over HTTP by 16 concurrent
clients, 100 for each of 500 users (the cap). healthz must then say 50,000 pending
and 1 running. restic is let go on (SIGCONT), and an admin's
`POST /fa/api/v0/backup/cancel-all` is timed on the client, while another client
sends `GET /fa/api/v0/backup/{id}` of a pending backup one after the other and
times each.

Goals: cancel-all <= 2 s; no GET answered later than 50 ms after it was sent.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import aiohttp

from bench import (
    API,
    NOISE_NOTE,
    Service,
    child_pids,
    free_port,
    get_data,
    headers,
    log,
    make_repo,
    percentile,
    restic_binary,
    restic_version,
    say,
    temporary_folder,
    write_config,
    write_results,
)

PENDING = int(os.environ.get("BENCH_PENDING", 50_000))
PER_USER = 100
CLIENTS = 16
HOLDER = "holder"
HOLDER_ID = 1
GOAL_CANCEL_SECONDS = 2.0
GOAL_GET_MS = 50.0


def user_of(number: int) -> str:
    return f"u{number // PER_USER:04d}"


def backup_children(service_pid: int) -> list[int]:
    """The pids of the service's child processes that run a restic backup."""
    found = []
    for pid in child_pids(service_pid):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        if b"backup" in command:
            found.append(pid)
    return found


async def hold_the_slot(service: Service, session: aiohttp.ClientSession) -> int:
    """POSTs the holder's backup and stops its restic's process group; returns its pid."""
    async with session.post(
        f"{service.base}{API}/backup",
        json={"id": HOLDER_ID, "path": "tiny.txt"},
        headers=headers(HOLDER),
    ) as response:
        body = await response.json()
    if body.get("code") != 2001:
        raise RuntimeError(f"holder POST: {body}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        children = backup_children(service.pid)
        if children:
            os.killpg(children[0], signal.SIGSTOP)
            return children[0]
        await asyncio.sleep(0.002)
    raise RuntimeError(f"the holder's restic never appeared: {service.tail()}")


async def post_all(service: Service) -> float:
    """POSTs PENDING backups with CLIENTS concurrent clients; returns the seconds taken."""
    numbers = iter(range(PENDING))
    started = time.monotonic()

    async def client() -> None:
        async with aiohttp.ClientSession() as session:
            for number in numbers:
                async with session.post(
                    f"{service.base}{API}/backup",
                    json={"id": 1000 + number, "path": "tiny.txt"},
                    headers=headers(user_of(number)),
                ) as response:
                    body = await response.json()
                if body.get("code") != 2001:
                    raise RuntimeError(f"POST backup {1000 + number}: {body}")
                if number % 5000 == 0:
                    log(f"{number} posted, {time.monotonic() - started:.0f} s")

    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return time.monotonic() - started


async def health(session: aiohttp.ClientSession, service: Service) -> dict[str, Any]:
    async with session.get(f"{service.base}{API}/healthz") as response:
        body: dict[str, Any] = await response.json()
    return dict(body["data"])


async def measure(service: Service) -> dict[str, Any]:
    await service.wait_healthy()
    async with aiohttp.ClientSession() as session:
        holder_pid = await hold_the_slot(service, session)
        try:
            log(f"holder restic pid {holder_pid} stopped; posting {PENDING} backups")
            post_seconds = await post_all(service)
            before = await health(session, service)
            if (before["pending"], before["running"]) != (PENDING, 1):
                raise RuntimeError(f"expected {PENDING} pending and 1 running: {before}")
        finally:
            with suppress(ProcessLookupError):
                os.killpg(holder_pid, signal.SIGCONT)

        watched = 1000 + PENDING // 2
        watched_url = f"{service.base}{API}/backup/{watched}"
        watched_headers = headers(user_of(PENDING // 2))
        latencies: list[float] = []
        statuses: list[str] = []
        done = asyncio.Event()

        async def watch() -> None:
            async with aiohttp.ClientSession() as watcher:
                while not done.is_set():
                    sent = time.perf_counter()
                    async with watcher.get(watched_url, headers=watched_headers) as response:
                        body = await response.json()
                    latencies.append(time.perf_counter() - sent)
                    statuses.append(body["data"]["status"])

        watching = asyncio.create_task(watch())
        await asyncio.sleep(0.5)  # warm-up, and a baseline before the cancel-all
        baseline = len(latencies)
        started = time.perf_counter()
        async with session.post(
            f"{service.base}{API}/backup/cancel-all", headers=headers("root", admin=True)
        ) as response:
            body = await response.json()
        cancel_seconds = time.perf_counter() - started
        during = len(latencies)
        done.set()
        await watching
        if body.get("code") != 2001:
            raise RuntimeError(f"cancel-all: {body}")
        after = await health(session, service)
        holder = await get_data(session, f"{service.base}{API}/backup/{HOLDER_ID}", HOLDER)
    inside = latencies[baseline:during]
    return {
        "post_seconds": post_seconds,
        "cancel_all_seconds": cancel_seconds,
        "cancelled": len(body["data"]["cancelled"]),
        "health_before": before,
        "health_after": after,
        "holder_status": holder["status"] if holder else None,
        "gets_during": len(inside),
        "get_max_ms": max(inside) * 1000 if inside else None,
        "get_p99_ms": percentile(inside, 99) * 1000 if inside else None,
        "get_p50_ms": percentile(inside, 50) * 1000 if inside else None,
        "get_baseline_max_ms": max(latencies[:baseline]) * 1000,
        "watched_statuses": list(dict.fromkeys(statuses[baseline:during])),
        "get_latencies_ms": [round(value * 1000, 3) for value in inside],
    }


def main() -> int:
    binary = restic_binary()
    version = restic_version(binary)
    say(f"== cancel_all: cancel-all of {PENDING} pending backups (restic {version} at {binary})")
    say(NOISE_NOTE)
    with temporary_folder("cancel-all") as scratch:
        folder = Path(scratch)
        data_root = folder / "data"
        for user in {HOLDER, *(user_of(number) for number in range(PENDING))}:
            home = data_root / "users" / user
            home.mkdir(parents=True)
            (home / "tiny.txt").write_bytes(b"tiny\n")
        repo = make_repo(folder, binary)
        port = free_port()
        config = write_config(
            folder, data_root=data_root, repo=repo, binary=binary, port=port, max_running=1
        )
        service = Service(config, port)
        service.start()
        try:
            result = asyncio.run(measure(service))
        finally:
            exit_code = service.stop()
    cancel = result["cancel_all_seconds"]
    longest = result["get_max_ms"]
    say(
        f"cancel_all_seconds = {cancel:.2f} ({result['cancelled']} cancelled of {PENDING} pending "
        f"and the holder's backup, {result['holder_status']} at the end; "
        f"goal <= {GOAL_CANCEL_SECONDS} s: "
        f"{'met' if cancel <= GOAL_CANCEL_SECONDS else 'MISSED'}; restic {version})"
    )
    say(
        f"get_max_ms_during_cancel_all = {longest:.1f} ({result['gets_during']} GETs one after "
        f"another; p50 {result['get_p50_ms']:.1f} ms, p99 {result['get_p99_ms']:.1f} ms; "
        f"before the cancel-all: max {result['get_baseline_max_ms']:.1f} ms; "
        f"goal <= {GOAL_GET_MS:.0f} ms: {'met' if longest <= GOAL_GET_MS else 'MISSED'})"
    )
    say(
        f"  {PENDING} POSTs by {CLIENTS} clients took {result['post_seconds']:.0f} s; "
        f"healthz after: {result['health_after']}; watched job went "
        f"{' -> '.join(result['watched_statuses'])}; service exit code {exit_code}"
    )
    write_results(
        "cancel_all",
        {
            "restic": {"binary": binary, "version": version},
            "pending": PENDING,
            "goals": {"cancel_all_seconds": GOAL_CANCEL_SECONDS, "get_max_ms": GOAL_GET_MS},
            **result,
            "exit_code": exit_code,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
