"""Prometheus metrics (prometheus-client). Labels carry kinds, statuses and a cluster's
node names only: never a user name, a path or an id."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from fa_restic.names import JobKind, JobStatus

if TYPE_CHECKING:
    from prometheus_client.core import Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class FinishedJob(Protocol):
    """What the metrics read of a job that ended (a job record)."""

    @property
    def status(self) -> str: ...

    @property
    def total_size(self) -> int: ...

    @property
    def pack_size(self) -> int: ...

    @property
    def finished_at(self) -> datetime | None: ...


@dataclass
class JobCounts:
    """The job layer's numbers at scrape time."""

    statuses: dict[str, Tally[str]] = field(default_factory=dict)
    """kind -> status -> how many records."""
    pending: int = 0
    running: int = 0
    forgets: int = 0


class _JobsCollector(Collector):
    """Jobs by kind and status, read from the records at scrape time (as GET sees them)."""

    def __init__(self) -> None:
        self.read: Callable[[], JobCounts] | None = None

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "fa_restic_jobs", "Job records by kind and status.", labels=["kind", "status"]
        )
        queue = GaugeMetricFamily("fa_restic_queue_depth", "Jobs waiting for a slot.")
        running = GaugeMetricFamily("fa_restic_running_jobs", "Jobs whose restic runs now.")
        forgets = GaugeMetricFamily(
            "fa_restic_forget_queue", "Deleted backups whose snapshot is still to be forgotten."
        )
        if self.read is not None:
            counts = self.read()
            for kind in JobKind:
                tally = counts.statuses.get(kind, Tally())
                for status in JobStatus:
                    family.add_metric([kind, status], tally.get(status, 0))
            queue.add_metric([], counts.pending)
            running.add_metric([], counts.running)
            forgets.add_metric([], counts.forgets)
        yield from (family, queue, running, forgets)


class Metrics:
    """The service's metrics in a registry of its own (one per app, so tests do not share)."""

    def __init__(self, restic_version: str) -> None:
        self.registry = CollectorRegistry()
        self._jobs = _JobsCollector()
        self.registry.register(self._jobs)
        info = Gauge(
            "fa_restic_restic_info", "The restic in use.", ["version"], registry=self.registry
        )
        info.labels(restic_version).set(1)
        self.finished = Counter(
            "fa_restic_jobs_finished",
            "Jobs that reached a final status.",
            ["kind", "status"],
            registry=self.registry,
        )
        self.bytes_backed_up = Counter(
            "fa_restic_backup_processed_bytes",
            "Source bytes read by successful backups.",
            registry=self.registry,
        )
        self.bytes_added = Counter(
            "fa_restic_backup_added_bytes",
            "Bytes successful backups added to the repository.",
            registry=self.registry,
        )
        self.bytes_restored = Counter(
            "fa_restic_restore_bytes",
            "Bytes restored by successful restores.",
            registry=self.registry,
        )
        self.durations = Histogram(
            "fa_restic_restic_duration_seconds",
            "Wall time of restic backup and restore runs.",
            ["kind"],
            buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600),
            registry=self.registry,
        )
        self.last_success = Gauge(
            "fa_restic_last_success_timestamp_seconds",
            "When a job of this kind last succeeded (Unix time).",
            ["kind"],
            registry=self.registry,
        )
        self._node_running: Gauge | None = None
        self._lease_age: Gauge | None = None
        """Made by the first `nodes`: a single node shows no cluster."""

    def nodes(self, leases: dict[str, tuple[int, float]]) -> None:
        """Shows the cluster's live nodes (SPEC §10): name -> (jobs running, lease age)."""
        if self._node_running is None or self._lease_age is None:
            self._node_running = Gauge(
                "fa_restic_node_running_jobs",
                "Jobs running on each live node of the cluster.",
                ["node"],
                registry=self.registry,
            )
            self._lease_age = Gauge(
                "fa_restic_node_lease_age_seconds",
                "Seconds since each live node of the cluster last renewed its lease.",
                ["node"],
                registry=self.registry,
            )
        self._node_running.clear()
        self._lease_age.clear()
        for name, (running, age) in leases.items():
            self._node_running.labels(name).set(running)
            self._lease_age.labels(name).set(age)

    def bind(self, read: Callable[[], JobCounts]) -> None:
        """Lets the scrape read the job layer's counts."""
        self._jobs.read = read

    def observe_duration(self, kind: str, seconds: float) -> None:
        self.durations.labels(kind).observe(seconds)

    def jobs_cancelled(self, kind: str, count: int) -> None:
        """Counts `count` jobs cancelled before they started (one call for a cancel-all)."""
        self.finished.labels(kind, "cancel").inc(count)

    def job_finished(self, kind: str, record: FinishedJob) -> None:
        self.finished.labels(kind, record.status).inc()
        if record.status != JobStatus.SUCCESS:
            return
        if record.finished_at is not None:
            self.last_success.labels(kind).set(record.finished_at.timestamp())
        if kind == JobKind.BACKUP:
            self.bytes_backed_up.inc(record.total_size)
            self.bytes_added.inc(record.pack_size)
        else:
            self.bytes_restored.inc(record.total_size)

    def render(self) -> bytes:
        """Returns the Prometheus text exposition."""
        return generate_latest(self.registry)
