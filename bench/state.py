"""`state` (issue 4): does a POST get slower as the state file grows?

Two real services run at the same time, one on a state file seeded with 1,000
backup records and one with 50,000. 300 POST /backup of a tiny file go to them
alternately (each POST is answered once its record is fsynced); the backups
themselves run in the background, one at a time (`max_running = 1`), in both
services alike, and are cancelled with cancel-all at the end. Then the time from
process start to the first healthz 2001 is taken 3 times for each size.

Goals: POST p50 ratio 50k/1k <= 1.5; start with 50,000 records <= 3 s.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from datetime import UTC, datetime, timedelta
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
    say,
    temporary_folder,
    write_config,
    write_results,
)
from fa_restic.jobs.models import BackupRecord
from fa_restic.jobs.records import LAYOUT
from fa_restic.names import JobStatus
from fa_restic.store import Put, StateStore

SIZES = (1_000, 50_000)
POSTS = int(os.environ.get("BENCH_POSTS", 300))
WARMUP_POSTS = 10
STARTS = 3
GOAL_P50_RATIO = 1.5
GOAL_START_SECONDS = 3.0
SEED_USERS = 100


def seed_records(count: int, data_root: Path) -> dict[str, Any]:
    """`count` finished backups of 100 users, in the store's format (fa_restic/store/state.py)."""
    base = datetime(2025, 1, 1, tzinfo=UTC)
    records: dict[str, Any] = {}
    for number in range(1, count + 1):
        user = f"user{number % SEED_USERS:03d}"
        created = base + timedelta(minutes=number)
        record = BackupRecord(
            id=number,
            user=user,
            path=str(data_root / "users" / user / f"project-{number}"),
            status=JobStatus.SUCCESS,
            total_size=1_000_000 + number,
            pack_size=500_000 + number,
            created_at=created,
            started_at=created + timedelta(seconds=1),
            finished_at=created + timedelta(seconds=30),
            attempts=1,
            sequence=number,
            snapshot_id=f"{number:064x}",
        )
        records[str(number)] = record.model_dump(mode="json")
    return records


def write_state(path: Path, records: dict[str, Any]) -> None:
    """Writes a state file through the store's API, folded in, as a compaction leaves it."""
    for found in path.parent.glob(path.name + "*"):
        found.unlink()

    async def write() -> None:
        store = StateStore(path, LAYOUT)
        store.load()
        await store.write(Put("backup", key, value) for key, value in records.items())
        await store.compact()
        store.close()

    asyncio.run(write())


def journal_statuses(path: Path) -> tuple[int, dict[str, int]]:
    """Returns (journal lines, statuses of the POSTed backups) from a stopped service's files."""
    journal = path.with_name(path.name + ".journal")
    lines = [line for line in journal.read_bytes().split(b"\n") if line.strip()]
    store = StateStore(path, LAYOUT)
    try:
        store.load()
        counts: dict[str, int] = {}
        for value in store.page("backup", owner=USER, limit=1_000_000):
            counts[value["status"]] = counts.get(value["status"], 0) + 1
    finally:
        store.close()
    return len(lines), counts


class Side:
    """One service on a seeded state file."""

    def __init__(self, folder: Path, size: int, records: dict[str, Any], binary: str) -> None:
        self.size = size
        self.folder = folder
        self.records = records
        folder.mkdir(parents=True, exist_ok=True)
        self.data_root = folder / "data"
        home = self.data_root / "users" / USER
        home.mkdir(parents=True, exist_ok=True)
        (home / "tiny.txt").write_bytes(b"tiny\n")
        self.repo = make_repo(folder, binary)
        self.state_file = folder / "state.json"
        self.binary = binary
        self.latencies: list[float] = []

    def service(self) -> Service:
        """A fresh service on a freshly seeded state file."""
        write_state(self.state_file, self.records)
        port = free_port()
        config = write_config(
            self.folder,
            data_root=self.data_root,
            repo=self.repo,
            binary=self.binary,
            port=port,
            max_running=1,
            state_file=self.state_file,
        )
        return Service(config, port)


async def timed_post(session: aiohttp.ClientSession, service: Service, backup_id: int) -> float:
    started = time.perf_counter()
    async with session.post(
        f"{service.base}{API}/backup",
        json={"id": backup_id, "path": "tiny.txt"},
        headers=headers(),
    ) as response:
        body = await response.json()
    elapsed = time.perf_counter() - started
    if body.get("code") != 2001:
        raise RuntimeError(f"POST backup {backup_id} to the {service.base} service: {body}")
    return elapsed


async def post_round(sides: list[Side], services: list[Service]) -> dict[str, Any]:
    """POSTs to the services alternately (the order flips every round); cancels at the end."""
    for side, service in zip(sides, services, strict=True):
        await service.wait_healthy()
        side.latencies = []
    sessions = [aiohttp.ClientSession() for _ in services]
    try:
        pairs = list(zip(sides, services, sessions, strict=True))
        for number in range(WARMUP_POSTS + POSTS):
            order = pairs if number % 2 == 0 else pairs[::-1]
            for side, service, session in order:
                elapsed = await timed_post(session, service, side.size + 1 + number)
                if number >= WARMUP_POSTS:
                    side.latencies.append(elapsed)
        cancels: dict[str, float] = {}
        for side, service, session in pairs:
            started = time.perf_counter()
            async with session.post(
                f"{service.base}{API}/backup/cancel-all", headers=headers()
            ) as response:
                body = await response.json()
            cancels[str(side.size)] = time.perf_counter() - started
            if body.get("code") != 2001:
                raise RuntimeError(f"cancel-all: {body}")
    finally:
        for session in sessions:
            await session.close()
    return cancels


def measure_posts(sides: list[Side]) -> dict[str, Any]:
    services = [side.service() for side in sides]
    for service in services:
        service.start()
    try:
        cancels = asyncio.run(post_round(sides, services))
    finally:
        exits = [service.stop() for service in services]
    details: dict[str, Any] = {"cancel_all_seconds": cancels, "exit_codes": exits}
    for side in sides:
        lines, statuses = journal_statuses(side.state_file)
        details[str(side.size)] = {
            "p50_ms": percentile(side.latencies, 50) * 1000,
            "p99_ms": percentile(side.latencies, 99) * 1000,
            "max_ms": max(side.latencies) * 1000,
            "mean_ms": sum(side.latencies) / len(side.latencies) * 1000,
            "posts": len(side.latencies),
            "journal_lines_at_stop": lines,
            "posted_backups_by_status": statuses,
            "latencies_ms": [round(value * 1000, 3) for value in side.latencies],
        }
    return details


def measure_starts(sides: list[Side]) -> dict[str, Any]:
    """Process start -> first healthz 2001, STARTS times per size, sizes alternating."""
    results: dict[str, dict[str, list[float]]] = {
        str(side.size): {"listening": [], "healthy": []} for side in sides
    }
    for attempt in range(STARTS):
        order = sides if attempt % 2 == 0 else sides[::-1]
        for side in order:
            service = side.service()
            service.start()
            try:
                listening, healthy = asyncio.run(service.wait_healthy())
            finally:
                service.stop()
            results[str(side.size)]["listening"].append(listening)
            results[str(side.size)]["healthy"].append(healthy)
            log(f"start with {side.size} records: port {listening:.2f} s, healthz {healthy:.2f} s")
    return results


def measure_store_load(sides: list[Side], folder: Path) -> dict[str, list[float]]:
    """In-process StateStore.load() (the index, the live records, a short journal), 3 times
    per size: the part of the start-up that grows with the records."""
    results: dict[str, list[float]] = {}
    for side in sides:
        path = folder / f"load-{side.size}" / "state.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        results[str(side.size)] = []
        for _ in range(STARTS):
            write_state(path, side.records)
            store = StateStore(path, LAYOUT)
            started = time.perf_counter()
            store.load()
            results[str(side.size)].append(time.perf_counter() - started)
            store.close()
    return results


def main() -> int:
    binary = restic_binary()
    version = restic_version(binary)
    say(f"== state: POST latency vs state size, start time (restic {version} at {binary})")
    say(NOISE_NOTE)
    with temporary_folder("state") as scratch:
        folder = Path(scratch)
        started = time.monotonic()
        sides = []
        for size in SIZES:
            records = seed_records(size, folder / f"s{size}" / "data")
            sides.append(Side(folder / f"s{size}", size, records, binary))
        state_bytes = {str(side.size): len(json.dumps(side.records)) for side in sides}
        log(f"seeded {SIZES} records in {time.monotonic() - started:.1f} s: {state_bytes} bytes")

        log(f"POST x {POSTS} to both services, alternating")
        posts = measure_posts(sides)
        log("start times")
        starts = measure_starts(sides)
        loads = measure_store_load(sides, folder)

    small, large = (posts[str(size)] for size in SIZES)
    ratio = large["p50_ms"] / small["p50_ms"]
    p99_ratio = large["p99_ms"] / small["p99_ms"]
    rank99 = -(-len(small["latencies_ms"]) * 99 // 100)  # nearest rank: ceil(n * 0.99)
    big = starts[str(SIZES[1])]
    start_median = median(big["healthy"])
    small_start = median(starts[str(SIZES[0])]["healthy"])
    say(
        f"post_p50_ratio_50k_1k = {ratio:.2f} (50k: p50 {large['p50_ms']:.2f} ms, "
        f"p99 {large['p99_ms']:.2f} ms; 1k: p50 {small['p50_ms']:.2f} ms, "
        f"p99 {small['p99_ms']:.2f} ms; {POSTS} POSTs each, interleaved; "
        f"goal <= {GOAL_P50_RATIO}: {'met' if ratio <= GOAL_P50_RATIO else 'MISSED'}; "
        f"restic {version})"
    )
    say(
        f"post_p99_ratio_50k_1k = {p99_ratio:.2f} (informational; p99 of {POSTS} is the "
        f"{len(small['latencies_ms']) - rank99 + 1}th largest)"
    )
    say(
        f"start_to_healthz_50k = {start_median:.2f} s (median of {STARTS}: "
        f"{', '.join(f'{value:.2f}' for value in big['healthy'])} s; port open after "
        f"{median(big['listening']):.2f} s; 1k: {small_start:.2f} s; "
        f"goal <= {GOAL_START_SECONDS} s: "
        f"{'met' if start_median <= GOAL_START_SECONDS else 'MISSED'}; restic {version})"
    )
    say(
        "  in-process StateStore.load() (index + live records), median of "
        f"{STARTS}: "
        + ", ".join(f"{size} records {median(loads[str(size)]):.3f} s" for size in SIZES)
    )
    for size in SIZES:
        detail = posts[str(size)]
        say(
            f"  {size} records: POST mean {detail['mean_ms']:.2f} ms, max {detail['max_ms']:.2f} "
            f"ms; journal lines at stop {detail['journal_lines_at_stop']}; posted backups "
            f"by status {detail['posted_backups_by_status']}; cancel-all "
            f"{posts['cancel_all_seconds'][str(size)]:.2f} s"
        )
    write_results(
        "state",
        {
            "restic": {"binary": binary, "version": version},
            "posts": POSTS,
            "state_file_bytes": state_bytes,
            "post_p50_ratio_50k_1k": ratio,
            "post_p99_ratio_50k_1k": p99_ratio,
            "start_to_healthz_50k_seconds": start_median,
            "goals": {"post_p50_ratio": GOAL_P50_RATIO, "start_seconds": GOAL_START_SECONDS},
            "post_latency": posts,
            "starts": starts,
            "store_load_seconds": loads,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
