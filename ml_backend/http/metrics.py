"""The server's Prometheus metrics, with ``prometheus_client``.

Counters and histograms are ``prometheus_client`` metrics in one registry per app. Per-project state (the served
model version, training job counts, times and durations) is collected at scrape time from the store and the
scheduler's job records (:class:`ProjectCollector`).

With ``PROMETHEUS_MULTIPROC_DIR`` set (``prometheus_client``'s multiprocess mode) every server process on the machine
writes its counters and histograms to files in that directory and a scrape of any of them sums all of them. The
directory must exist and be emptied before the servers start; ``prometheus_client`` reads the variable when it is
first imported, so set it in the environment of the processes, not only on a command line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import prometheus_client
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from model.errors import ConfigError

__all__ = ["CONTENT_TYPE", "LATENCY_BUCKETS", "ProjectCollector", "Registry"]

log = logging.getLogger(__name__)

LATENCY_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 100.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST
"""The ``Content-Type`` of :meth:`Registry.render`'s text."""


class Registry:
    """The metrics of one app.

    Args:
        multiproc_dir: ``PROMETHEUS_MULTIPROC_DIR`` (multiprocess mode), or None.

    Raises:
        ConfigError: ``multiproc_dir`` is not an existing directory.
    """

    def __init__(self, multiproc_dir: Path | None = None) -> None:
        if multiproc_dir is not None and not Path(multiproc_dir).is_dir():
            raise ConfigError(f"PROMETHEUS_MULTIPROC_DIR={str(multiproc_dir)!r} is not a directory: create it (empty) "
                              "before the servers start, or unset it.")
        prometheus_client.disable_created_metrics()  # no *_created series: the same text in both modes
        self.multiproc_dir = multiproc_dir
        self.registry = CollectorRegistry()
        self._scrape_time: list[Collector] = []
        r = self.registry
        self.requests = Counter("taxomoco_http_requests", "HTTP requests by endpoint, method and status.",
                                ("endpoint", "method", "status"), registry=r)
        self.latency = Histogram("taxomoco_http_request_duration_seconds", "HTTP request latency by endpoint.",
                                 ("endpoint",), buckets=LATENCY_BUCKETS, registry=r)
        self.predictions = Counter("taxomoco_predictions", "Task predictions served, by project.", ("project",),
                                   registry=r)
        self.empty_predictions = Counter("taxomoco_empty_predictions",
                                         "Tasks answered with an empty result (no model, no image, error).",
                                         ("project",), registry=r)
        self.failed_images = Counter("taxomoco_failed_images", "Task images that could not be used, by reason.",
                                     ("project", "reason"), registry=r)
        self.webhooks = Counter("taxomoco_webhook_events", "Webhook events received, by action and what was done.",
                                ("action", "outcome"), registry=r)

    def add_collector(self, collector: Collector) -> None:
        """A collector run at every scrape (per-project state read from files and the store)."""
        self._scrape_time.append(collector)
        self.registry.register(collector)

    def render(self) -> bytes:
        """The exposition text of every metric (all processes' counters in multiprocess mode)."""
        if self.multiproc_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(self.multiproc_dir))
        for collector in self._scrape_time:
            registry.register(collector)
        return generate_latest(registry)


def _iso_seconds(value: Any) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return None


class ProjectCollector(Collector):
    """Scrape-time metrics per project: the served model version and the training job record.

    Args:
        store: the ``ModelStore`` (``status(pid)``).
        scheduler: the ``Scheduler`` (``status(pid)``: the job record of ``ml_backend.training.records``).
        projects: the project ids to report.
    """

    def __init__(self, store: Any, scheduler: Any, projects: Callable[[], Iterable[int]]) -> None:
        self.store, self.scheduler, self.projects = store, scheduler, projects

    def describe(self) -> list[Metric]:
        return []  # computed at scrape time only (nothing to check at registration)

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("taxomoco_model_info", "The model version served for a project (value 1).",
                                 labels=("project", "version"))
        loads = CounterMetricFamily("taxomoco_model_loads", "Model versions loaded by this process for a project.",
                                    labels=("project",))
        failing = GaugeMetricFamily("taxomoco_model_load_failing",
                                    "1 when the project's newest version failed to load (the previous one is served).",
                                    labels=("project",))
        jobs = CounterMetricFamily("taxomoco_training_jobs", "Training job events of a project (scheduled, coalesced, "
                                   "started, succeeded, skipped, failed).", labels=("project", "event"))
        queued = GaugeMetricFamily("taxomoco_training_queued", "1 while a training job of the project waits.",
                                   labels=("project",))
        running = GaugeMetricFamily("taxomoco_training_running", "1 while a training job of the project runs.",
                                    labels=("project",))
        last = {(kind, what): GaugeMetricFamily(
                    f"taxomoco_training_last_{kind}_{what}",
                    f"When the last {'successful' if kind == 'success' else 'failed'} training finished (Unix time)."
                    if what == "timestamp_seconds" else
                    f"Duration of the last {'successful' if kind == 'success' else 'failed'} training.",
                    labels=("project",))
                for kind in ("success", "failure") for what in ("timestamp_seconds", "duration_seconds")}
        for pid in self.projects():
            p = str(pid)
            served = self.store.status(pid)
            if served.get("served_version"):
                info.add_metric([p, str(served["served_version"])], 1)
            loads.add_metric([p], float(served.get("loads", 0)))
            failing.add_metric([p], float(bool(served.get("load_error"))))
            try:
                record = self.scheduler.status(pid)
            except Exception as exc:  # a scrape must not fail for one project's record
                log.warning("project %s: no training status for /metrics: %s", pid, exc)
                continue
            for outcome, n in (record.get("counts") or {}).items():
                jobs.add_metric([p, str(outcome)], float(n))
            queued.add_metric([p], float(bool(record.get("queued") or record.get("queued_since"))))
            running.add_metric([p], float(bool(record.get("running") or record.get("running_since"))))
            for kind in ("success", "failure"):
                outcome_record = record.get(f"last_{kind}") or {}
                ts = _iso_seconds(outcome_record.get("finished_at"))
                if ts is not None:
                    last[(kind, "timestamp_seconds")].add_metric([p], ts)
                if outcome_record.get("duration_s") is not None:
                    last[(kind, "duration_seconds")].add_metric([p], float(outcome_record["duration_s"]))
        yield from (info, loads, failing, jobs, queued, running, *last.values())
