"""`restore_fs` (issue 13): a restore into a home that is its own file system, and into a
home on the data root's file system, each against raw `restic restore` into the same one.

Needs root (it mounts a tmpfs). Random data (BENCH_RESTORE_MB, default 500) in 1 MiB
files is made in two homes: alice's, a tmpfs this benchmark mounts at
`<data_root>/users/alice` (a home on its own file system, as a ZFS dataset or an XFS
project would be), and carol's, a plain folder beside it. One service, started once, backs
both up once. Then, BENCH_TRIALS times (default 4), with the order flipped every trial:

- service: POST a restore of the backup into a new folder of the same home and wait for
  `success`; time = the record's `finished_at` minus the moment the POST was sent.
- raw: `restic restore --json --target <new folder of the same home> -- <snapshot>`, the
  argv the service builds, with the same RESTIC_PROGRESS_FPS.

Every restore starts after an `os.sync()` (what the one before left dirty is not written
back during it), and each home's pair after an untimed raw restore of the same snapshot
(without it, the first restore after the other home's ran up to 0.5 s slower on the
disk-backed home, whichever side it was). ratio = median service time / median raw time,
per home; `paired_ratio` is the median of each trial's service/raw (the two ran back to
back), `paired_geometric_mean` their geometric mean (with the order flipped every trial,
what being first or second costs cancels out in it). Goals (issue 13): own file system
<= 1.05, one file system <= 1.02. The log line of each service restore says which path it
took (`direct into` or `staged`); the result records it.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench import (
    API,
    NOISE_NOTE,
    PROGRESS_FPS,
    Repo,
    Service,
    free_port,
    get_data,
    log,
    make_repo,
    median,
    parse_time,
    post,
    restic_binary,
    restic_version,
    run_raw,
    say,
    temporary_folder,
    write_config,
    write_results,
)
from fa_restic.restic.commands import Binary, restore_command
from fa_restic.restic.features import parse_version
from tests.helpers import make_random_tree

TRIALS = int(os.environ.get("BENCH_TRIALS", 4))
"""Even by default: each side comes first in half the trials."""
MEGABYTES = int(os.environ.get("BENCH_RESTORE_MB", 500))
POLL_SECONDS = 0.25
"""As bench.overhead: polling the service costs it CPU that raw restic does not pay."""
GOALS = {"own_file_system": 1.05, "one_file_system": 1.02}
HOMES = {"own_file_system": "alice", "one_file_system": "carol"}


async def wait_finished(session: aiohttp.ClientSession, url: str, user: str) -> dict[str, Any]:
    deadline = time.monotonic() + 3600
    while time.monotonic() < deadline:
        data = await get_data(session, url, user)
        if data is not None and data["status"] in ("success", "failed", "cancel"):
            return data
        await asyncio.sleep(POLL_SECONDS)
    raise RuntimeError(f"{url} did not finish")


async def back_up(service: Service, user: str, backup_id: int) -> str:
    """Backs the user's `src` up through the service; returns the snapshot id."""
    async with aiohttp.ClientSession() as session:
        await post(session, f"{service.base}{API}/backup", {"id": backup_id, "path": "src"}, user)
        data = await wait_finished(session, f"{service.base}{API}/backup/{backup_id}", user)
    if data["status"] != "success":
        raise RuntimeError(f"backup for {user} ended {data['status']}: {data['extra']}")
    return str(data["snapshot_id"])


async def service_restore(
    service: Service, user: str, restore_id: int, backup_id: int, dst: str
) -> float:
    """Returns the seconds from the POST to the record's finished_at."""
    payload = {"restore_id": restore_id, "backup_id": backup_id, "dst_path": dst}
    async with aiohttp.ClientSession() as session:
        sent = time.time()
        await post(session, f"{service.base}{API}/restore", payload, user)
        data = await wait_finished(session, f"{service.base}{API}/restore/{restore_id}", user)
    if data["status"] != "success":
        raise RuntimeError(f"restore {restore_id} ended {data['status']}: {data['extra']}")
    log(
        f"restore {restore_id}: started {parse_time(data['started_at']) - sent:.3f} s after "
        f"the POST, ran {parse_time(data['finished_at']) - parse_time(data['started_at']):.3f} s"
    )
    return parse_time(data["finished_at"]) - sent


def raw_restore(repo: Repo, binary: str, snapshot_id: str, target: Path, log_to: Path) -> float:
    version = parse_version(f"restic {restic_version(binary)}")
    argv = restore_command(Binary(binary, version, repo.cache), snapshot_id, target).argv
    run = run_raw(argv, repo.environment(PROGRESS_FPS), target.parent, log_to)
    if run.exit_code != 0:
        raise RuntimeError(f"raw restore exit {run.exit_code}: see {log_to}")
    return run.seconds


def paths_taken(service: Service) -> dict[str, int]:
    text = service.log_path.read_text(encoding="utf-8", errors="replace")
    return {"direct": text.count(": direct into "), "staged": text.count(": staged (")}


def trials(
    service: Service, repo: Repo, binary: str, homes: dict[str, Path], snapshots: dict[str, str]
) -> dict[str, dict[str, list[float]]]:
    """Runs the trials; returns seconds per home and side."""
    seconds: dict[str, dict[str, list[float]]] = {
        kind: {"service": [], "raw": []} for kind in HOMES
    }
    restore_id = 0
    for trial in range(1, TRIALS + 1):
        for kind, user in HOMES.items():
            sides = ("service", "raw") if trial % 2 == 1 else ("raw", "service")
            # An untimed restore first: whichever side came first after the other home's
            # restores ran up to 0.5 s slower on the disk-backed home (caches), whichever it was.
            warm = homes[kind] / f"warm-{trial}"
            raw_restore(repo, binary, snapshots[kind], warm, repo.path.parent / "warm.out")
            shutil.rmtree(warm)
            os.sync()
            for side in sides:
                target = homes[kind] / f"{side}-{trial}"
                if side == "service":
                    restore_id += 1
                    backup_id = list(HOMES).index(kind) + 1
                    took = asyncio.run(
                        service_restore(service, user, restore_id, backup_id, target.name)
                    )
                else:
                    out = repo.path.parent / f"raw-{kind}-{trial}.out"
                    took = raw_restore(repo, binary, snapshots[kind], target, out)
                seconds[kind][side].append(took)
                log(f"trial {trial} {kind} {side}: {took:.2f} s")
                shutil.rmtree(target)
                # Each side starts with no dirty pages of the one before: 500 MB written
                # back during the next restore would be charged to whichever side came next.
                os.sync()
    return seconds


def main() -> int:
    if os.geteuid() != 0:
        say("restore_fs: needs root (it mounts a tmpfs as a home); skipped")
        return 1
    binary = restic_binary()
    version = restic_version(binary)
    say(f"== restore_fs: service vs raw restic restore, {MEGABYTES} MB (restic {version})")
    say(NOISE_NOTE)
    with temporary_folder("restore-fs") as scratch:
        folder = Path(scratch)
        data_root = folder / "data"
        homes = {kind: data_root / "users" / user for kind, user in HOMES.items()}
        for home in homes.values():
            home.mkdir(parents=True)
        size = f"size={MEGABYTES * 4}m"
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", size, "fa-bench", str(homes["own_file_system"])],
            check=True,
        )
        try:
            return measure(folder, data_root, homes, binary, version)
        finally:
            subprocess.run(["umount", "--lazy", str(homes["own_file_system"])], check=False)


def measure(
    folder: Path, data_root: Path, homes: dict[str, Path], binary: str, version: str
) -> int:
    for home in homes.values():
        make_random_tree(home / "src", MEGABYTES * 1_000_000)
    repo = make_repo(folder / "service", binary)
    port = free_port()
    config = write_config(
        folder / "service", data_root=data_root, repo=repo, binary=binary, port=port
    )
    service = Service(config, port)
    service.start()
    try:
        asyncio.run(service.wait_healthy())
        snapshots = {
            kind: asyncio.run(back_up(service, user, list(HOMES).index(kind) + 1))
            for kind, user in HOMES.items()
        }
        seconds = trials(service, repo, binary, homes, snapshots)
        taken = paths_taken(service)
    finally:
        code = service.stop()
    results: dict[str, Any] = {}
    for kind, sides in seconds.items():
        ratio = median(sides["service"]) / median(sides["raw"])
        pairs = [ours / raw for ours, raw in zip(sides["service"], sides["raw"], strict=True)]
        paired = median(pairs)
        geometric = math.exp(sum(math.log(pair) for pair in pairs) / len(pairs))
        met = "met" if ratio <= GOALS[kind] else "MISSED"
        results[kind] = {
            "ratio": ratio,
            "paired_ratio": paired,
            "paired_geometric_mean": geometric,
            "goal": GOALS[kind],
            **sides,
        }
        say(
            f"{kind}_ratio = {ratio:.3f}, paired {paired:.3f}, geometric mean {geometric:.3f} "
            f"(service {median(sides['service']):.2f} s, raw "
            f"{median(sides['raw']):.2f} s; median of {TRIALS}; service "
            f"[{', '.join(f'{value:.2f}' for value in sides['service'])}] raw "
            f"[{', '.join(f'{value:.2f}' for value in sides['raw'])}]; goal <= "
            f"{GOALS[kind]}: {met}; restic {version})"
        )
    say(f"  service restores by path: {taken}; service exit code {code}")
    write_results(
        "restore_fs",
        {
            "restic": {"binary": binary, "version": version},
            "size_mb": MEGABYTES,
            "trials": TRIALS,
            "paths_taken": taken,
            **results,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
