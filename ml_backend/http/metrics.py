"""Prometheus text exposition (format 0.0.4) of the server's counters, histograms and gauges.

Counters and histograms live in this process (each gunicorn worker counts its own requests; scrape with
one worker, or sum over instances). Per-project state (live model version, training job counts, times and
durations) is collected at scrape time from the store and the scheduler's job records.
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

__all__ = [
    "Collector",
    "Counter",
    "GaugeFamily",
    "Histogram",
    "LATENCY_BUCKETS",
    "Labels",
    "PROJECT_FAMILIES",
    "Registry",
    "Sample",
    "project_collector",
]

log = logging.getLogger(__name__)

LATENCY_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 100.0)

Labels = tuple[str, ...]


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Counter:
    """A monotonically increasing count per label set."""

    kind = "counter"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        self.name, self.help, self.labelnames = name, help, tuple(labelnames)
        self._values: dict[Labels, float] = {}
        self._lock = threading.Lock()

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        assert len(labels) == len(self.labelnames), (self.name, labels)
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        with self._lock:
            return self._values.get(tuple(labels), 0.0)

    def samples(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_labels(self.labelnames, k)} {_num(v)}" for k, v in items]


class Histogram:
    """Observations in cumulative buckets per label set (``_bucket``, ``_sum``, ``_count``)."""

    kind = "histogram"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = (), buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.name, self.help, self.labelnames = name, help, tuple(labelnames)
        self.buckets = tuple(sorted(buckets))
        self._values: dict[Labels, list[float]] = {}  # per label set: bucket counts..., +Inf count, sum
        self._lock = threading.Lock()

    def observe(self, value: float, *labels: str) -> None:
        assert len(labels) == len(self.labelnames), (self.name, labels)
        i = bisect.bisect_left(self.buckets, value)
        with self._lock:
            row = self._values.setdefault(labels, [0.0] * (len(self.buckets) + 2))
            row[i] += 1
            row[-1] += value

    def count(self, *labels: str) -> int:
        with self._lock:
            row = self._values.get(tuple(labels))
            return int(sum(row[:-1])) if row else 0

    def samples(self) -> list[str]:
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._values.items())
        out: list[str] = []
        for key, row in items:
            cumulative = 0.0
            for bound, n in zip((*self.buckets, math.inf), row[:-1]):
                cumulative += n
                le = 'le="' + _num(bound) + '"'
                out.append(f"{self.name}_bucket{_labels(self.labelnames, key, le)} {_num(cumulative)}")
            out.append(f"{self.name}_sum{_labels(self.labelnames, key)} {_num(row[-1])}")
            out.append(f"{self.name}_count{_labels(self.labelnames, key)} {_num(cumulative)}")
        return out


@dataclass(frozen=True)
class Sample:
    """One gauge value collected at scrape time."""

    name: str
    labels: dict[str, str]
    value: float


@dataclass(frozen=True)
class GaugeFamily:
    """A gauge (or counter) whose samples are computed at scrape time."""

    name: str
    help: str
    kind: str = "gauge"


Collector = Callable[[], Iterable[Sample]]


class Registry:
    """The server's metrics plus collectors run at scrape time."""

    def __init__(self) -> None:
        self.requests = Counter("taxomoco_http_requests_total", "HTTP requests by endpoint, method and status.", ("endpoint", "method", "status"))
        self.latency = Histogram("taxomoco_http_request_duration_seconds", "HTTP request latency by endpoint.", ("endpoint",))
        self.predictions = Counter("taxomoco_predictions_total", "Task predictions served, by project.", ("project",))
        self.empty_predictions = Counter(
            "taxomoco_empty_predictions_total", "Tasks answered with an empty result (no model, no image, error).", ("project",)
        )
        self.failed_images = Counter("taxomoco_failed_images_total", "Task images that could not be used, by reason.", ("project", "reason"))
        self.webhooks = Counter("taxomoco_webhook_events_total", "Webhook events received, by action and what was done.", ("action", "outcome"))
        self.families: dict[str, GaugeFamily] = {f.name: f for f in PROJECT_FAMILIES}
        self._collectors: list[Collector] = []

    def describe(self, family: GaugeFamily) -> None:
        """Declare a scrape-time family (its HELP and TYPE lines)."""
        self.families[family.name] = family

    def add_collector(self, collector: Collector) -> None:
        self._collectors.append(collector)

    def render(self) -> str:
        """The whole exposition text."""
        lines: list[str] = []
        for metric in (self.requests, self.latency, self.predictions, self.empty_predictions, self.failed_images, self.webhooks):
            lines.append(f"# HELP {metric.name} {metric.help}")
            lines.append(f"# TYPE {metric.name} {metric.kind}")
            lines.extend(metric.samples())
        grouped: dict[str, list[Sample]] = {}
        for collector in self._collectors:
            for sample in collector():
                grouped.setdefault(sample.name, []).append(sample)
        for name, samples in grouped.items():
            family = self.families.get(name, GaugeFamily(name, name))
            lines.append(f"# HELP {name} {family.help}")
            lines.append(f"# TYPE {name} {family.kind}")
            for s in samples:
                keys = sorted(s.labels)
                lines.append(f"{name}{_labels(keys, [s.labels[k] for k in keys])} {_num(s.value)}")
        return "\n".join(lines) + "\n"


def _iso_seconds(value: Any) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return None


def project_collector(store: Any, scheduler: Any, projects: Callable[[], Iterable[int]]) -> Collector:
    """Scrape-time samples per project: the served model version and the training job record.

    Args:
        store: the ``ModelStore`` (``status(pid)``).
        scheduler: the ``Scheduler`` (``status(pid)``: the job record of ``ml_backend.training.records``).
        projects: the project ids to report.
    """
    def collect() -> Iterator[Sample]:
        for pid in projects():
            p = str(pid)
            served = store.status(pid)
            if served.get("served_version"):
                yield Sample("taxomoco_model_info", {"project": p, "version": served["served_version"]}, 1)
            yield Sample("taxomoco_model_loads_total", {"project": p}, float(served.get("loads", 0)))
            yield Sample("taxomoco_model_load_failing", {"project": p}, float(bool(served.get("load_error"))))
            try:
                record = scheduler.status(pid)
            except Exception as exc:  # a scrape must not fail for one project's record
                log.warning("project %s: no training status for /metrics: %s", pid, exc)
                continue
            for outcome, n in (record.get("counts") or {}).items():
                yield Sample("taxomoco_training_jobs_total", {"project": p, "event": str(outcome)}, float(n))
            yield Sample("taxomoco_training_queued", {"project": p}, float(bool(record.get("queued") or record.get("queued_since"))))
            yield Sample("taxomoco_training_running", {"project": p}, float(bool(record.get("running") or record.get("running_since"))))
            for kind in ("success", "failure"):
                last = record.get(f"last_{kind}") or {}
                ts = _iso_seconds(last.get("finished_at"))
                if ts is not None:
                    yield Sample(f"taxomoco_training_last_{kind}_timestamp_seconds", {"project": p}, ts)
                if last.get("duration_s") is not None:
                    yield Sample(f"taxomoco_training_last_{kind}_duration_seconds", {"project": p}, float(last["duration_s"]))

    return collect


PROJECT_FAMILIES = (
    GaugeFamily("taxomoco_model_info", "The model version served for a project (value 1)."),
    GaugeFamily("taxomoco_model_loads_total", "Model versions loaded by this process for a project.", "counter"),
    GaugeFamily("taxomoco_model_load_failing", "1 when the project's newest version failed to load (the previous one is served)."),
    GaugeFamily("taxomoco_training_jobs_total", "Training job events of a project (scheduled, coalesced, started, succeeded, skipped, failed).", "counter"),
    GaugeFamily("taxomoco_training_queued", "1 while a training job of the project waits."),
    GaugeFamily("taxomoco_training_running", "1 while a training job of the project runs."),
    GaugeFamily("taxomoco_training_last_success_timestamp_seconds", "When the last successful training finished (Unix time)."),
    GaugeFamily("taxomoco_training_last_success_duration_seconds", "Duration of the last successful training."),
    GaugeFamily("taxomoco_training_last_failure_timestamp_seconds", "When the last failed training finished (Unix time)."),
    GaugeFamily("taxomoco_training_last_failure_duration_seconds", "Duration of the last failed training."),
)
