"""`overhead` (issue 5): what the service adds to a backup and a restore.

Random data (BENCH_SIZE_MB, default 600) is made once. Then, 3 times, with the
order service/raw flipped every trial:

- service: a fresh service on a fresh (initialised) repository; POST a backup of
  the data and wait for `success`, then POST a restore of it and wait again. Time
  = the record's `finished_at` minus the moment the POST was sent (the status is
  polled 4 times a second; the poll only tells when to look).
- raw: `restic backup --json` of the same folder, run the way the service runs it
  (same working folder, argv, tags, RESTIC_PROGRESS_FPS), into its own fresh
  repository; then `restic restore --json latest --target` from it.

backup_overhead / restore_overhead = median service time / median raw time.
wrapper_cpu_share = the service process's own CPU time during the backup (from
/proc/<pid>/stat utime+stime, all threads, polling GETs included) / the CPU time
of its reaped restic children in the same window (cutime+cstime).

Goals: backup_overhead <= 1.03, wrapper_cpu_share <= 0.02.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench import (
    API,
    NOISE_NOTE,
    PROGRESS_FPS,
    USER,
    Repo,
    Service,
    backup_argv,
    cpu_times,
    free_port,
    get_data,
    log,
    make_repo,
    median,
    parse_time,
    post,
    restic_binary,
    restic_version,
    restore_argv,
    run_raw,
    say,
    size_mb,
    temporary_folder,
    write_config,
    write_results,
)
from tests.helpers import make_random_tree

TRIALS = int(os.environ.get("BENCH_TRIALS", 3))
POLL_SECONDS = 0.25
GOAL_OVERHEAD = 1.03
GOAL_CPU_SHARE = 0.02
SOURCE = "src"


@dataclass
class Measured:
    seconds: float
    own_cpu: float = 0.0
    """Service: its own CPU seconds in the window. Raw: 0."""
    restic_cpu: float = 0.0
    detail: dict[str, Any] | None = None


async def wait_finished(
    session: aiohttp.ClientSession, url: str, limit: float = 3600.0
) -> tuple[dict[str, Any], float]:
    """Polls a job until it ends; returns its data and when the poll saw it end."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        data = await get_data(session, url)
        if data is not None and data["status"] in ("success", "failed", "cancel"):
            return data, time.time()
        await asyncio.sleep(POLL_SECONDS)
    raise RuntimeError(f"{url} did not finish within {limit}s")


async def service_job(
    service: Service, kind: str, payload: dict[str, Any], job_id: int
) -> Measured:
    async with aiohttp.ClientSession() as session:
        before = cpu_times(service.pid)
        sent = time.time()
        await post(session, f"{service.base}{API}/{kind}", payload)
        data, seen = await wait_finished(session, f"{service.base}{API}/{kind}/{job_id}")
        after = cpu_times(service.pid)
    if data["status"] != "success":
        raise RuntimeError(f"service {kind} ended {data['status']}: {data['extra']}")
    seconds = parse_time(data["finished_at"]) - sent
    return Measured(
        seconds,
        own_cpu=after.own - before.own,
        restic_cpu=after.children - before.children,
        detail={
            "created_to_finished_s": parse_time(data["finished_at"])
            - parse_time(data["created_at"]),
            "started_to_finished_s": parse_time(data["finished_at"])
            - parse_time(data["started_at"]),
            "post_to_poll_seen_s": seen - sent,
            "total_size": data["stat"]["total_size"],
            "pack_size": data["stat"]["pack_size"],
        },
    )


def service_trial(
    folder: Path, data_root: Path, binary: str, trial: int
) -> tuple[Measured, Measured, int]:
    repo = make_repo(folder, binary)
    port = free_port()
    config = write_config(folder, data_root=data_root, repo=repo, binary=binary, port=port)
    service = Service(config, port)
    service.start()
    target = data_root / "users" / USER / f"restore-{trial}"
    try:

        async def run() -> tuple[Measured, Measured]:
            await service.wait_healthy()
            await asyncio.sleep(1.0)  # its start-up `restic cat config` has ended by now
            backup = await service_job(service, "backup", {"id": trial, "path": SOURCE}, trial)
            restore = await service_job(
                service,
                "restore",
                {"restore_id": trial, "backup_id": trial, "dst_path": target.name},
                trial,
            )
            return backup, restore

        backup, restore = asyncio.run(run())
    finally:
        code = service.stop()
        shutil.rmtree(target, ignore_errors=True)
        shutil.rmtree(repo.path, ignore_errors=True)
    return backup, restore, code


def raw_trial(folder: Path, source: Path, binary: str, trial: int) -> tuple[Measured, Measured]:
    repo: Repo = make_repo(folder, binary)
    environment = repo.environment(PROGRESS_FPS)
    target = folder / "restore"
    try:
        backup = run_raw(
            backup_argv(binary, repo.cache, trial),
            environment,
            source,
            folder / "backup.out",
        )
        if backup.exit_code != 0:
            raise RuntimeError(f"raw backup exit {backup.exit_code}: see {folder}/backup.out")
        restore = run_raw(
            restore_argv(binary, repo.cache, target),
            environment,
            folder,
            folder / "restore.out",
        )
        if restore.exit_code != 0:
            raise RuntimeError(f"raw restore exit {restore.exit_code}: see {folder}/restore.out")
    finally:
        shutil.rmtree(target, ignore_errors=True)
        shutil.rmtree(repo.path, ignore_errors=True)
    return (
        Measured(backup.seconds, restic_cpu=backup.cpu_seconds),
        Measured(restore.seconds, restic_cpu=restore.cpu_seconds),
    )


def summary(kind: str, service: list[Measured], raw: list[Measured]) -> dict[str, Any]:
    service_median = median([run.seconds for run in service])
    raw_median = median([run.seconds for run in raw])
    shares = [run.own_cpu / run.restic_cpu for run in service if run.restic_cpu > 0]
    paired = [mine.seconds / theirs.seconds for mine, theirs in zip(service, raw, strict=True)]
    service_cpu = median([run.own_cpu + run.restic_cpu for run in service])
    raw_cpu = median([run.restic_cpu for run in raw])
    return {
        f"{kind}_overhead": service_median / raw_median,
        "paired_ratios": paired,
        "paired_ratio_median": median(paired),
        "cpu_overhead": service_cpu / raw_cpu,
        "service_seconds": [run.seconds for run in service],
        "raw_seconds": [run.seconds for run in raw],
        "service_median_s": service_median,
        "raw_median_s": raw_median,
        "service_own_cpu_s": [run.own_cpu for run in service],
        "service_restic_cpu_s": [run.restic_cpu for run in service],
        "raw_restic_cpu_s": [run.restic_cpu for run in raw],
        "wrapper_cpu_share": median(shares) if shares else None,
        "wrapper_cpu_shares": shares,
        "service_details": [run.detail for run in service],
    }


def seconds_list(values: list[float]) -> str:
    return ", ".join(f"{value:.2f}" for value in values)


def main() -> int:
    binary = restic_binary()
    version = restic_version(binary)
    megabytes = size_mb()
    say(f"== overhead: service vs raw restic, {megabytes} MB (restic {version} at {binary})")
    say(NOISE_NOTE)
    with temporary_folder("overhead") as scratch:
        folder = Path(scratch)
        data_root = folder / "data"
        source = data_root / "users" / USER / SOURCE
        started = time.monotonic()
        make_random_tree(source, megabytes * 1_000_000)
        log(f"made {megabytes} MB of random data in {time.monotonic() - started:.1f} s")
        results: dict[str, list[Measured]] = {
            "service_backup": [],
            "service_restore": [],
            "raw_backup": [],
            "raw_restore": [],
        }
        exits = []
        for trial in range(1, TRIALS + 1):
            sides = ("service", "raw") if trial % 2 == 1 else ("raw", "service")
            for side in sides:
                if side == "service":
                    backed_up, restored, code = service_trial(
                        folder / f"service-{trial}", data_root, binary, trial
                    )
                    exits.append(code)
                else:
                    backed_up, restored = raw_trial(folder / f"raw-{trial}", source, binary, trial)
                results[f"{side}_backup"].append(backed_up)
                results[f"{side}_restore"].append(restored)
                log(
                    f"trial {trial} {side}: backup {backed_up.seconds:.2f} s "
                    f"(restic cpu {backed_up.restic_cpu:.2f} s, "
                    f"own cpu {backed_up.own_cpu:.2f} s), "
                    f"restore {restored.seconds:.2f} s"
                )

    backup = summary("backup", results["service_backup"], results["raw_backup"])
    restore = summary("restore", results["service_restore"], results["raw_restore"])
    fps = f"RESTIC_PROGRESS_FPS={PROGRESS_FPS:g} on both sides (the service's default progress_fps)"
    for kind, data in (("backup", backup), ("restore", restore)):
        ratio = data[f"{kind}_overhead"]
        goal = f"; goal <= {GOAL_OVERHEAD}: {'met' if ratio <= GOAL_OVERHEAD else 'MISSED'}"
        say(
            f"{kind}_overhead = {ratio:.3f} (service {data['service_median_s']:.2f} s, raw "
            f"{data['raw_median_s']:.2f} s; median of {TRIALS}; service "
            f"[{seconds_list(data['service_seconds'])}] raw [{seconds_list(data['raw_seconds'])}]"
            f"{goal if kind == 'backup' else '; no goal set'}; restic {version})"
        )
    for kind, data in (("backup", backup), ("restore", restore)):
        say(
            f"  {kind}: per-trial service/raw [{seconds_list(data['paired_ratios'])}] (median "
            f"{data['paired_ratio_median']:.3f}); CPU-time overhead {data['cpu_overhead']:.3f} "
            "(service own + its restic CPU / raw restic CPU, medians; barely affected by "
            "a busy machine)"
        )
    share = backup["wrapper_cpu_share"]
    say(
        f"wrapper_cpu_share = {share:.4f} (service own CPU "
        f"[{seconds_list(backup['service_own_cpu_s'])}] s / its restic's CPU "
        f"[{seconds_list(backup['service_restic_cpu_s'])}] s during the backup; median of "
        f"{TRIALS}; raw restic CPU [{seconds_list(backup['raw_restic_cpu_s'])}] s; goal <= "
        f"{GOAL_CPU_SHARE}: {'met' if share <= GOAL_CPU_SHARE else 'MISSED'}; restic {version})"
    )
    restore_share = restore["wrapper_cpu_share"]
    say(
        f"wrapper_cpu_share_restore = {restore_share:.4f} (informational; own "
        f"[{seconds_list(restore['service_own_cpu_s'])}] s / restic "
        f"[{seconds_list(restore['service_restic_cpu_s'])}] s)"
    )
    say(f"  {fps}; service exit codes {exits}")
    write_results(
        "overhead",
        {
            "restic": {"binary": binary, "version": version},
            "size_mb": megabytes,
            "trials": TRIALS,
            "progress_fps": PROGRESS_FPS,
            "backup_overhead": backup["backup_overhead"],
            "restore_overhead": restore["restore_overhead"],
            "wrapper_cpu_share": share,
            "backup_cpu_overhead": backup["cpu_overhead"],
            "goals": {"backup_overhead": GOAL_OVERHEAD, "wrapper_cpu_share": GOAL_CPU_SHARE},
            "backup": backup,
            "restore": restore,
            "service_exit_codes": exits,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
