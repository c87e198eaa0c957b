"""The labeling loop over HTTP: ``GET /queue``, the pre-annotation record in ``/job_status``, its ``/metrics``.

``GET /queue?project=ID&limit=N`` (access class ``DATA``: it reveals task ids and scores) answers the saved labeling
order (``ml_backend.prelabel.order``): ``{"project", "version", "written_at", "cold_start", "labelled", "count",
"tasks": [{"task", "reason", "score"}, ...]}`` with the first ``limit`` tasks (default 50, at most
:data:`MAX_LIMIT`); 400 for a malformed id or limit, 404 before the first order exists.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flask import Flask, jsonify, request
from flask.typing import ResponseReturnValue
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ml_backend.http.metrics import Registry
from ml_backend.labelstudio.ids import project_id_of
from ml_backend.prelabel.order import read_queue
from ml_backend.prelabel.progress import PrelabelState, read_progress
from ml_backend.settings import Settings
from model.errors import DataError

__all__ = ["DEFAULT_LIMIT", "MAX_LIMIT", "PRELABEL_FAMILIES", "PrelabelCollector", "prelabel_collector",
           "prelabel_status", "register_routes"]

DEFAULT_LIMIT = 50
MAX_LIMIT = 100_000

PRELABEL_FAMILIES = (
    ("taxomoco_prelabel_tasks", "Unlabelled tasks the running or last bulk pre-annotation writes."),
    ("taxomoco_prelabel_written_tasks", "Tasks the running or last bulk pre-annotation has written."),
    ("taxomoco_prelabel_rate_per_second", "Predictions written per second by the last bulk pre-annotation."),
    ("taxomoco_prelabel_cleanup_left", "Predictions of older versions the running or last clean-up has still to "
                                       "delete."),
    ("taxomoco_prelabel_state", "1 for the state of the project's last bulk pre-annotation "
                                "(running, done, failed, superseded)."),
)
"""Name and help of each scrape-time gauge of the pre-annotation record."""


def prelabel_status(settings: Settings, project_id: int) -> dict[str, Any] | None:
    """The project's pre-annotation record as ``/job_status`` shows it (None before the first run)."""
    progress = read_progress(settings.project(project_id))
    return None if progress is None else progress.to_dict()


class PrelabelCollector(Collector):
    """Scrape-time gauges of each project's pre-annotation record (a ``prometheus_client`` collector)."""

    def __init__(self, settings: Settings, projects: Callable[[], Iterable[int]]) -> None:
        self.settings, self.projects = settings, projects

    def describe(self) -> list[Metric]:
        return []  # computed at scrape time only

    def collect(self) -> Iterator[Metric]:
        (tasks_name, tasks_help), (written_name, written_help), (rate_name, rate_help), (left_name, left_help), \
            (state_name, state_help) = PRELABEL_FAMILIES
        base = ("project", "version")
        tasks = GaugeMetricFamily(tasks_name, tasks_help, labels=base)
        written = GaugeMetricFamily(written_name, written_help, labels=base)
        rate = GaugeMetricFamily(rate_name, rate_help, labels=base)
        left = GaugeMetricFamily(left_name, left_help, labels=base)
        states = GaugeMetricFamily(state_name, state_help, labels=(*base, "state"))
        for pid in self.projects():
            progress = read_progress(self.settings.project(pid))
            if progress is None:
                continue
            labels = [str(pid), progress.version]
            tasks.add_metric(labels, float(progress.total))
            written.add_metric(labels, float(progress.done))
            rate.add_metric(labels, float(progress.rate_per_s))
            left.add_metric(labels, float(max(progress.cleanup_total - progress.cleanup_done, 0)))
            for state in PrelabelState:
                states.add_metric([*labels, state.value], float(progress.state is state))
        yield from (tasks, written, rate, left, states)


def prelabel_collector(settings: Settings, projects: Callable[[], Iterable[int]]) -> Collector:
    """Scrape-time gauges of each project's pre-annotation record."""
    return PrelabelCollector(settings, projects)


def register_routes(app: Flask, settings: Settings, metrics: Registry, projects: Callable[[], Iterable[int]]) -> None:
    """Add ``GET /queue`` and the pre-annotation metrics to the app."""
    metrics.add_collector(prelabel_collector(settings, projects))

    @app.get("/queue")
    def labeling_queue() -> ResponseReturnValue:
        raw = request.args.get("project")
        if raw is None:
            return jsonify({"error": "Pass the Label Studio project id: GET /queue?project=ID&limit=N."}), 400
        try:
            pid = project_id_of(raw)
            limit = int(request.args.get("limit", DEFAULT_LIMIT))
            if not 0 <= limit <= MAX_LIMIT:
                raise ValueError(f"limit {limit} is not in 0..{MAX_LIMIT}")
        except (DataError, ValueError) as exc:
            return jsonify({"error": f"{exc}. Use ?project=<id>&limit=<count>."}), 400
        try:
            queue = read_queue(settings.project(pid))
        except DataError as exc:
            return jsonify({"error": str(exc)}), 404
        tasks = queue.get("tasks", [])
        return jsonify({**queue, "count": len(tasks), "tasks": tasks[:limit]})
