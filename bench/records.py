"""`records` (issue 12): a year of records — restart, memory and the journal.

Part 1, a million records: state files of 1,000 and of 1,000,000 finished backups
(1,000 users) are built through the store's own API (`StateStore.write`, batches of
10,000, compactions in the background as the service would run them). For each, a
real service is started 3 times (time from process start to the first healthz 2001,
and its RSS then); then once more for 200 POST /backup of a tiny file (one client,
one after the other; the backups run one at a time and are cancelled at the end) and
500 GET /backup/{id} of random finished records, with the RSS and the state folder's
sizes after.

Part 2, 50,000 over HTTP: bench/cancel_all's set-up (one backup holds the only slot,
50,000 pending backups POSTed by 16 clients for 500 users), then cancel-all, SIGTERM,
and 3 restarts on that state (time to healthz, RSS), with the state and journal sizes.

Goals: restart <= 5 s at 1M and <= 2 s at 50k; RSS <= 400 MB at 1M; about 200 bytes or
less per finished record; journal <= 2x the compacted state after any burst; POST p50
growth 1k -> 1M <= 1.3.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench import (
    API,
    NOISE_NOTE,
    USER,
    Service,
    free_port,
    headers,
    log,
    make_repo,
    median,
    percentile,
    restic_binary,
    restic_version,
    rss_bytes,
    say,
    temporary_folder,
    write_config,
    write_results,
)
from bench import cancel_all as fifty
from fa_restic.jobs.records import LAYOUT
from fa_restic.store import Put, StateStore
from fa_restic.store.state import MIN_JOURNAL_BYTES

SIZES = (1_000, int(os.environ.get("BENCH_RECORDS", 1_000_000)))
USERS = 1_000
BATCH = 10_000
STARTS = 3
POSTS = 200
GETS = 500
POSTERS = tuple(f"poster{number}" for number in range(10))
"""Who POSTs (a user may have at most 100 pending jobs)."""
GOALS = {
    "restart_seconds_1m": 5.0,
    "restart_seconds_50k": 2.0,
    "rss_mb_1m": 400.0,
    "bytes_per_finished_record": 200.0,
    "journal_to_state": 2.0,
    "post_p50_growth": 1.3,
}
TEMPLATE: dict[str, Any] = {
    "status": "success",
    "total_size": 123_456_789,
    "pack_size": 23_456_789,
    "extra": "",
    "created_at": "2026-01-01T00:00:00.000000Z",
    "started_at": "2026-01-01T00:00:01.000000Z",
    "finished_at": "2026-01-01T00:01:00.000000Z",
    "file_count": 1234,
    "attempts": 1,
    "pid": None,
    "pid_start": None,
    "unsettled": False,
    "exclude": [],
}


def user_of(number: int) -> str:
    return f"user{number % USERS:04d}"


def record(number: int, data_root: Path) -> dict[str, Any]:
    user = user_of(number)
    return {
        **TEMPLATE,
        "id": number,
        "user": user,
        "sequence": number,
        "path": f"{data_root}/users/{user}/project-{number % 37}/run-{number}",
        "snapshot_id": f"{number:064x}",
    }


async def build(path: Path, count: int, data_root: Path) -> dict[str, Any]:
    """Writes `count` finished backups through StateStore.write; returns what it took."""
    started = time.monotonic()
    store = StateStore(path, LAYOUT)
    store.load()
    worst_journal_ratio = 0.0
    for first in range(1, count + 1, BATCH):
        last = min(first + BATCH, count + 1)
        await store.write(Put("backup", str(n), record(n, data_root)) for n in range(first, last))
        sizes = store.sizes
        # Against the state file once it is past the journal's floor (1 MiB): a journal of
        # one batch over an empty state file says nothing.
        if sizes["state"] >= MIN_JOURNAL_BYTES:
            worst_journal_ratio = max(worst_journal_ratio, sizes["journal"] / sizes["state"])
        if first % 100_000 == 1:
            log(f"built {last - 1} records, {time.monotonic() - started:.0f} s, {sizes}")
    # As a service leaves it some time after the last burst: folded in, short journal.
    await store.compact()
    sizes = store.sizes
    store.close()
    return {
        "build_seconds": time.monotonic() - started,
        "sizes_after_build": sizes,
        "worst_journal_to_state_while_building": worst_journal_ratio,
    }


def rss_mb(pid: int) -> float:
    return rss_bytes(pid) / (1 << 20)


def folder_sizes(state: Path) -> dict[str, int]:
    return {
        found.name: found.stat().st_size
        for found in sorted(state.parent.iterdir())
        if found.name.startswith(state.name)
    }


async def starts(service: Service) -> tuple[list[float], list[float]]:
    """Starts the service STARTS times; returns the seconds to healthz and the RSS (MB)."""
    seconds, rss = [], []
    for _ in range(STARTS):
        service.start()
        seconds.append((await service.wait_healthy(120))[1])
        rss.append(rss_mb(service.pid))
        service.stop()
    return seconds, rss


async def requests(sides: list[tuple[Service, int]]) -> list[dict[str, Any]]:
    """POSTs and GETs against started services, alternately (so that what else runs on
    the machine weighs on both alike); returns their latencies, per service."""
    chooser = random.Random(12)  # noqa: S311 - a repeatable choice, not a secret
    posts: list[list[float]] = [[] for _ in sides]
    gets: list[list[float]] = [[] for _ in sides]
    async with aiohttp.ClientSession() as session:
        for number in range(POSTS):
            for (service, _), times in zip(sides, posts, strict=True):
                sent = time.perf_counter()
                async with session.post(
                    f"{service.base}{API}/backup",
                    json={"id": 10_000_000 + number, "path": "tiny.txt"},
                    headers=headers(POSTERS[number % len(POSTERS)]),
                ) as response:
                    body = await response.json()
                times.append(time.perf_counter() - sent)
                if body.get("code") != 2001:
                    raise RuntimeError(f"POST: {body}")
        for _ in range(GETS):
            for (service, count), times in zip(sides, gets, strict=True):
                number = chooser.randint(1, count)
                sent = time.perf_counter()
                async with session.get(
                    f"{service.base}{API}/backup/{number}", headers=headers(user_of(number))
                ) as response:
                    body = await response.json()
                times.append(time.perf_counter() - sent)
                if body.get("code") != 2001 or body["data"]["id"] != number:
                    raise RuntimeError(f"GET {number}: {body}")
        results = []
        for (service, _), post_times, get_times in zip(sides, posts, gets, strict=True):
            results.append(
                {
                    "post_p50_ms": percentile(post_times, 50) * 1000,
                    "post_p99_ms": percentile(post_times, 99) * 1000,
                    "get_p50_ms": percentile(get_times, 50) * 1000,
                    "get_p99_ms": percentile(get_times, 99) * 1000,
                    "rss_mb_after_requests": rss_mb(service.pid),
                }
            )
            async with session.post(
                f"{service.base}{API}/backup/cancel-all", headers=headers("root", admin=True)
            ) as response:
                await response.read()
    return results


def service_on(folder: Path, binary: str, data_root: Path) -> tuple[Service, Path]:
    for user in (USER, *POSTERS):
        home = data_root / "users" / user
        home.mkdir(parents=True, exist_ok=True)
        (home / "tiny.txt").write_bytes(b"tiny\n")
    repo = make_repo(folder, binary)
    port = free_port()
    config = write_config(
        folder, data_root=data_root, repo=repo, binary=binary, port=port, max_running=1
    )
    return Service(config, port), folder / "state.json"


async def sizes(scratch: Path, binary: str) -> list[dict[str, Any]]:
    """Builds both state files, starts each service STARTS times, then both at once for
    the requests; returns what was measured, per size."""
    sides, results = [], []
    for count in SIZES:
        folder = scratch / f"n{count}"
        folder.mkdir()
        data_root = folder / "data"
        service, state = service_on(folder, binary, data_root)
        built = await build(state, count, data_root)
        log(f"{count}: built in {built['build_seconds']:.0f} s: {folder_sizes(state)}")
        seconds, rss = await starts(service)
        sides.append((service, count))
        results.append(
            {
                "records": count,
                **built,
                "start_seconds": seconds,
                "start_seconds_median": median(seconds),
                "rss_mb_after_start": rss,
                "state_file": state,
            }
        )
    try:
        for service, _ in sides:
            service.start()
            await service.wait_healthy(120)
        measured = await requests(sides)
    finally:
        for service, _ in sides:
            service.stop()
    for result, more in zip(results, measured, strict=True):
        state = result.pop("state_file")
        after = folder_sizes(state)
        result.update(more)
        result["files_after"] = after
        result["journal_to_state_after"] = after.get("state.json.journal", 0) / after["state.json"]
    return results


async def fifty_thousand(scratch: Path, binary: str) -> dict[str, Any]:
    """bench/cancel_all's 50,000 pending over HTTP, cancel-all, then restarts."""
    folder = scratch / "http50k"
    folder.mkdir()
    data_root = folder / "data"
    for user in {fifty.HOLDER, *(fifty.user_of(n) for n in range(fifty.PENDING))}:
        home = data_root / "users" / user
        home.mkdir(parents=True)
        (home / "tiny.txt").write_bytes(b"tiny\n")
    service, state = service_on(folder, binary, data_root)
    service.start()
    try:
        await service.wait_healthy()
        async with aiohttp.ClientSession() as session:
            holder = await fifty.hold_the_slot(service, session)
            try:
                post_seconds = await fifty.post_all(service)
            finally:
                os.killpg(holder, signal.SIGCONT)
            rss_before = rss_mb(service.pid)
            started = time.perf_counter()
            async with session.post(
                f"{service.base}{API}/backup/cancel-all", headers=headers("root", admin=True)
            ) as response:
                await response.read()
            cancel_seconds = time.perf_counter() - started
            await asyncio.sleep(1)  # a compaction the cancel-all started may finish
    finally:
        service.stop()
    stopped_files = folder_sizes(state)
    seconds, rss = await starts(service)
    return {
        "pending": fifty.PENDING,
        "post_seconds": post_seconds,
        "cancel_all_seconds": cancel_seconds,
        "rss_mb_before_cancel_all": rss_before,
        "files_after_cancel_all": stopped_files,
        "journal_to_state_after_cancel_all": (
            stopped_files.get("state.json.journal", 0) / stopped_files["state.json"]
        ),
        "restart_seconds": seconds,
        "restart_seconds_median": median(seconds),
        "rss_mb_after_restart": rss,
    }


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(small: dict[str, Any], large: dict[str, Any], http: dict[str, Any]) -> dict[str, Any]:
    per_record = (
        (median(large["rss_mb_after_start"]) - median(small["rss_mb_after_start"]))
        * 1024
        * 1024
        / (large["records"] - small["records"])
    )
    growth = large["post_p50_ms"] / small["post_p50_ms"]
    worst_journal = max(
        small["journal_to_state_after"],
        large["journal_to_state_after"],
        http["journal_to_state_after_cancel_all"],
    )
    n = large["records"]
    lines = [
        f"restart_seconds_{n} = {large['start_seconds_median']:.2f} "
        f"(goal <= {GOALS['restart_seconds_1m']}: "
        f"{verdict(large['start_seconds_median'] <= GOALS['restart_seconds_1m'])}; "
        f"1k: {small['start_seconds_median']:.2f})",
        f"restart_seconds_50k_after_cancel_all = {http['restart_seconds_median']:.2f} "
        f"(goal <= {GOALS['restart_seconds_50k']}: "
        f"{verdict(http['restart_seconds_median'] <= GOALS['restart_seconds_50k'])})",
        f"rss_mb_{n} = {median(large['rss_mb_after_start']):.0f} after start, "
        f"{large['rss_mb_after_requests']:.0f} after the requests (goal <= "
        f"{GOALS['rss_mb_1m']:.0f}: {verdict(median(large['rss_mb_after_start']) <= 400)}; "
        f"1k: {median(small['rss_mb_after_start']):.0f})",
        f"bytes_per_finished_record = {per_record:.0f} (goal <= "
        f"{GOALS['bytes_per_finished_record']:.0f}: {verdict(per_record <= 200)})",
        f"journal_to_state_worst = {worst_journal:.2f} (after the bursts; while building "
        f"{n}: {large['worst_journal_to_state_while_building']:.2f}; goal <= 2: "
        f"{verdict(worst_journal <= 2)})",
        f"post_p50_growth_1k_to_{n} = {growth:.2f} ({small['post_p50_ms']:.2f} ms -> "
        f"{large['post_p50_ms']:.2f} ms; goal <= {GOALS['post_p50_growth']}: "
        f"{verdict(growth <= GOALS['post_p50_growth'])})",
        f"get_p50_ms 1k {small['get_p50_ms']:.2f}, {n} {large['get_p50_ms']:.2f}; "
        f"p99 {small['get_p99_ms']:.2f} / {large['get_p99_ms']:.2f}",
        f"  state folder at {n}: {large['files_after']}; built in {large['build_seconds']:.0f} s",
        f"  50k over HTTP: {http['post_seconds']:.0f} s of POSTs, cancel-all "
        f"{http['cancel_all_seconds']:.2f} s, files {http['files_after_cancel_all']}, "
        f"RSS {http['rss_mb_before_cancel_all']:.0f} MB before the cancel-all, "
        f"{median(http['rss_mb_after_restart']):.0f} MB after the restart",
    ]
    for line in lines:
        say(line)
    return {"bytes_per_finished_record": per_record, "post_p50_growth": growth}


def main() -> int:
    binary = restic_binary()
    version = restic_version(binary)
    say(f"== records: {SIZES[1]} records, restart, memory, journal (restic {version})")
    say(NOISE_NOTE)
    with temporary_folder("records") as scratch_name:
        scratch = Path(scratch_name)
        small, large = asyncio.run(sizes(scratch, binary))
        http = asyncio.run(fifty_thousand(scratch, binary))
    summary = report(small, large, http)
    write_results(
        "records",
        {
            "restic": {"binary": binary, "version": version},
            "goals": GOALS,
            "small": small,
            "large": large,
            "http_50k": http,
            **summary,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
