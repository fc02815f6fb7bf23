"""Prometheus metrics (prometheus-client). Labels carry kinds and statuses only:
never a user name, a path or an id."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from fa_restic.jobs.models import JobRecord
    from fa_restic.jobs.service import JobService

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _JobsCollector(Collector):
    """Jobs by kind and status, read from the records at scrape time (as GET sees them)."""

    def __init__(self) -> None:
        self.service: JobService | None = None

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "fa_restic_jobs", "Job records by kind and status.", labels=["kind", "status"]
        )
        queue = GaugeMetricFamily("fa_restic_queue_depth", "Jobs waiting for a slot.")
        running = GaugeMetricFamily("fa_restic_running_jobs", "Jobs whose restic runs now.")
        forgets = GaugeMetricFamily(
            "fa_restic_forget_queue", "Deleted backups whose snapshot is still to be forgotten."
        )
        service = self.service
        if service is not None:
            for kind, records in (("backup", service.backups), ("restore", service.restores)):
                tally = Tally(record.status.value for record in records.values())
                for status in ("pending", "running", "success", "failed", "cancel"):
                    family.add_metric([kind, status], tally.get(status, 0))
            health = service.health()
            queue.add_metric([], health.pending)
            running.add_metric([], health.running)
            forgets.add_metric([], len(service.forgets))
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

    def bind(self, service: JobService) -> None:
        """Lets the scrape read job counts from `service`."""
        self._jobs.service = service

    def observe_duration(self, kind: str, seconds: float) -> None:
        self.durations.labels(kind).observe(seconds)

    def jobs_cancelled(self, kind: str, count: int) -> None:
        """Counts `count` jobs cancelled before they started (one call for a cancel-all)."""
        self.finished.labels(kind, "cancel").inc(count)

    def job_finished(self, kind: str, record: JobRecord) -> None:
        self.finished.labels(kind, record.status.value).inc()
        if record.status.value != "success":
            return
        if record.finished_at is not None:
            self.last_success.labels(kind).set(record.finished_at.timestamp())
        if kind == "backup":
            self.bytes_backed_up.inc(record.total_size)
            self.bytes_added.inc(record.pack_size)
        else:
            self.bytes_restored.inc(record.total_size)

    def render(self) -> bytes:
        """Returns the Prometheus text exposition."""
        return generate_latest(self.registry)
