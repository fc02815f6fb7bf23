"""`browse` (issue 11): browsing a 100,000-file backup, and a selective restore.

A real service backs up two folders of user alice: `many`, BENCH_BROWSE_FILES (100,000)
small files in folders of 1,000, three times (three snapshots of the same tree), and
`big`, BENCH_BROWSE_MB (2,000) MB of random data in 1 MiB files. Then:

1. first listing: for each snapshot of `many`, `restic ls --json <snapshot>` run by hand
   (stdout read to its end) and the service's first `GET /backup/{id}/files` of it (which
   reads the tree with the same `restic ls`), one after the other;
   goal: first listing <= 1.2 x restic ls.
2. cached levels: BENCH_BROWSE_GETS (1,000) `GET /backup/{id}/files?path=d<random>&limit=100`
   one after another, timed on the client; goals: p50 < 100 ms, p99 < 250 ms.
3. the cache's memory for that backup: the service's own estimate (its log line) and the
   growth of its resident memory over the first listing.
4. a selective restore of one 1 MiB file of `big` (`include`) against a full restore of
   `big`, POST to success; goal: a small fraction of the full restore's time.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench import (
    API,
    NOISE_NOTE,
    Service,
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
    rss_bytes,
    say,
    temporary_folder,
    write_config,
    write_results,
)

FILES = int(os.environ.get("BENCH_BROWSE_FILES", 100_000))
BIG_MB = int(os.environ.get("BENCH_BROWSE_MB", 2000))
GETS = int(os.environ.get("BENCH_BROWSE_GETS", 1000))
PER_FOLDER = 1000
MANY_IDS = (1, 2, 3)
BIG_ID = 10
WANTED = f"d{BIG_MB // 2 // 16:04d}/f{BIG_MB // 2:05d}.bin"
"""The one file a selective restore brings back: the middle one of `big`."""
GOAL_FIRST_RATIO = 1.2
GOAL_P50_MS = 100.0
GOAL_P99_MS = 250.0
_CACHED_LINE = re.compile(r"cached the tree of snapshot (\w+): (\d+) entries, ~(\d+) bytes")


def make_many(root: Path, count: int) -> None:
    for index in range(count):
        folder = root / f"d{index // PER_FOLDER:04d}"
        if index % PER_FOLDER == 0:
            folder.mkdir(parents=True)
        (folder / f"f{index:06d}.txt").write_bytes(b"%d\n" % index)


def make_big(root: Path, megabytes: int) -> None:
    for index in range(megabytes):
        folder = root / f"d{index // 16:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{index:05d}.bin").write_bytes(os.urandom(1 << 20))


async def wait_for(
    session: aiohttp.ClientSession, base: str, kind: str, job_id: int
) -> dict[str, Any]:
    while True:
        data = await get_data(session, f"{base}{API}/{kind}/{job_id}")
        if data is not None and data["status"] in ("success", "failed", "cancel"):
            if data["status"] != "success":
                raise RuntimeError(f"{kind} {job_id}: {data}")
            return data
        await asyncio.sleep(0.05)


async def timed_get(session: aiohttp.ClientSession, url: str) -> tuple[float, dict[str, Any]]:
    started = time.monotonic()
    async with session.get(url, headers=headers()) as response:
        body: dict[str, Any] = await response.json()
    seconds = time.monotonic() - started
    if body.get("code") != 2001:
        raise RuntimeError(f"GET {url}: {body}")
    return seconds, body["data"]


def raw_ls(binary: str, repo: Any, snapshot_id: str) -> float:
    started = time.monotonic()
    subprocess.run(
        [binary, "--cache-dir", str(repo.cache), "ls", "--json", "--", snapshot_id],
        env=repo.environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        check=True,
    )
    return time.monotonic() - started


async def first_listings(
    session: aiohttp.ClientSession, service: Service, binary: str, repo: Any
) -> dict[str, Any]:
    raw, ours, growth = [], [], []
    for backup_id in MANY_IDS:
        backup = await get_data(session, f"{service.base}{API}/backup/{backup_id}")
        assert backup is not None
        snapshot_id = backup["snapshot_id"]
        raw.append(await asyncio.to_thread(raw_ls, binary, repo, snapshot_id))
        before = rss_bytes(service.pid)
        seconds, data = await timed_get(session, f"{service.base}{API}/backup/{backup_id}/files")
        ours.append(seconds)
        growth.append(rss_bytes(service.pid) - before)
        log(f"backup {backup_id}: restic ls {raw[-1]:.2f} s, first listing {seconds:.2f} s")
        assert len(data["items"]) == FILES // PER_FOLDER
    return {"raw_ls_seconds": raw, "first_listing_seconds": ours, "rss_growth_bytes": growth}


async def cached_levels(session: aiohttp.ClientSession, service: Service) -> list[float]:
    folders = max(FILES // PER_FOLDER, 1)
    choose = random.Random(11)  # noqa: S311 - which folders to ask for, not a secret
    samples = []
    for _ in range(GETS):
        backup_id = choose.choice(MANY_IDS)
        query = f"path=d{choose.randrange(folders):04d}&limit=100"
        if choose.random() < 0.5:
            query += f"&after=f{choose.randrange(FILES):06d}.txt"
        url = f"{service.base}{API}/backup/{backup_id}/files?{query}"
        seconds, _ = await timed_get(session, url)
        samples.append(seconds * 1000)
    return samples


async def restore_seconds(
    session: aiohttp.ClientSession, service: Service, restore_id: int, **extra: Any
) -> float:
    body = {"restore_id": restore_id, "backup_id": BIG_ID, "dst_path": f"out{restore_id}"}
    started = time.monotonic()
    await post(session, f"{service.base}{API}/restore", {**body, **extra})
    await wait_for(session, service.base, "restore", restore_id)
    return time.monotonic() - started


async def measure(service: Service, binary: str, repo: Any, home: Path) -> dict[str, Any]:
    await service.wait_healthy()
    async with aiohttp.ClientSession() as session:
        for backup_id in MANY_IDS:
            started = time.monotonic()
            await post(session, f"{service.base}{API}/backup", {"id": backup_id, "path": "many"})
            await wait_for(session, service.base, "backup", backup_id)
            log(f"backup {backup_id} of {FILES} files: {time.monotonic() - started:.1f} s")
        started = time.monotonic()
        await post(session, f"{service.base}{API}/backup", {"id": BIG_ID, "path": "big"})
        await wait_for(session, service.base, "backup", BIG_ID)
        log(f"backup {BIG_ID} of {BIG_MB} MB: {time.monotonic() - started:.1f} s")
        result = await first_listings(session, service, binary, repo)
        result["cached_ms"] = await cached_levels(session, service)
        selective, full = [], []
        for trial in range(2):
            selective.append(await restore_seconds(session, service, 1 + trial, include=[WANTED]))
            assert (home / f"out{1 + trial}" / WANTED).stat().st_size == 1 << 20
            full.append(await restore_seconds(session, service, 11 + trial))
            for name in (f"out{1 + trial}", f"out{11 + trial}"):
                await asyncio.to_thread(shutil.rmtree, home / name)
            log(f"restore: selective {selective[-1]:.2f} s, full {full[-1]:.2f} s")
        result["selective_restore_seconds"] = selective
        result["full_restore_seconds"] = full
    return result


def report(result: dict[str, Any], cached_bytes: int, version: str) -> None:
    ratio = median(result["first_listing_seconds"]) / median(result["raw_ls_seconds"])
    cached = result["cached_ms"]
    p50, p99 = percentile(cached, 50), percentile(cached, 99)
    selective = median(result["selective_restore_seconds"])
    full = median(result["full_restore_seconds"])
    result.update(
        first_listing_ratio=ratio,
        cached_p50_ms=p50,
        cached_p99_ms=p99,
        cache_bytes_estimate=cached_bytes,
        selective_over_full=selective / full,
    )
    met = {True: "met", False: "MISSED"}
    say(
        f"first_listing_ratio = {ratio:.2f} (first GET /files "
        f"{median(result['first_listing_seconds']):.2f} s vs restic ls --json "
        f"{median(result['raw_ls_seconds']):.2f} s, medians of {len(MANY_IDS)}, {FILES} files; "
        f"goal <= {GOAL_FIRST_RATIO}: {met[ratio <= GOAL_FIRST_RATIO]}; restic {version})"
    )
    say(
        f"cached_level_ms p50 = {p50:.1f}, p99 = {p99:.1f} ({len(cached)} GETs of 100 entries; "
        f"goals < {GOAL_P50_MS:.0f} / < {GOAL_P99_MS:.0f}: "
        f"{met[p50 < GOAL_P50_MS and p99 < GOAL_P99_MS]})"
    )
    say(
        f"cache_bytes = {cached_bytes} per {FILES}-file backup (the service's estimate, "
        f"{cached_bytes / max(FILES, 1):.0f} B an entry); resident memory grew "
        f"{median(result['rss_growth_bytes']) / 1e6:.1f} MB over a first listing (median)"
    )
    say(
        f"selective_restore = {selective:.2f} s for one 1 MiB file vs full restore "
        f"{full:.2f} s of {BIG_MB} MB: {selective / full:.3f} of it (medians of 2)"
    )


def cached_bytes_from(log_path: Path) -> int:
    sizes = [int(match.group(3)) for match in _CACHED_LINE.finditer(log_path.read_text())]
    return sizes[0] if sizes else 0


def main() -> int:
    binary = restic_binary()
    version = restic_version(binary)
    say(f"== browse: {FILES}-file backup, {BIG_MB} MB selective restore (restic {version})")
    say(NOISE_NOTE)
    with temporary_folder("browse") as scratch:
        folder = Path(scratch)
        home = folder / "data" / "users" / "alice"
        started = time.monotonic()
        make_many(home / "many", FILES)
        make_big(home / "big", BIG_MB)
        log(f"data made in {time.monotonic() - started:.0f} s")
        repo = make_repo(folder, binary)
        port = free_port()
        config = write_config(
            folder, data_root=folder / "data", repo=repo, binary=binary, port=port
        )
        service = Service(config, port)
        service.start()
        try:
            result = asyncio.run(measure(service, binary, repo, home))
        finally:
            exit_code = service.stop()
        cached_bytes = cached_bytes_from(service.log_path)
    report(result, cached_bytes, version)
    write_results(
        "browse",
        {
            "restic": {"binary": binary, "version": version},
            "files": FILES,
            "big_mb": BIG_MB,
            "goals": {
                "first_listing_ratio": GOAL_FIRST_RATIO,
                "cached_p50_ms": GOAL_P50_MS,
                "cached_p99_ms": GOAL_P99_MS,
            },
            **result,
            "exit_code": exit_code,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
