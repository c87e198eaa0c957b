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

from ml_backend.http.metrics import Collector, GaugeFamily, Registry, Sample
from ml_backend.labelstudio.ids import project_id_of
from ml_backend.prelabel.order import read_queue
from ml_backend.prelabel.progress import PrelabelState, read_progress
from ml_backend.settings import Settings
from model.errors import DataError

__all__ = ["DEFAULT_LIMIT", "MAX_LIMIT", "PRELABEL_FAMILIES", "prelabel_collector", "prelabel_status",
           "register_routes"]

DEFAULT_LIMIT = 50
MAX_LIMIT = 100_000

PRELABEL_FAMILIES = (
    GaugeFamily("taxomoco_prelabel_tasks", "Unlabelled tasks the running or last bulk pre-annotation writes."),
    GaugeFamily("taxomoco_prelabel_written_tasks", "Tasks the running or last bulk pre-annotation has written."),
    GaugeFamily("taxomoco_prelabel_rate_per_second", "Predictions written per second by the last bulk pre-annotation."),
    GaugeFamily("taxomoco_prelabel_state", "1 for the state of the project's last bulk pre-annotation "
                                           "(running, done, failed, superseded)."),
)


def prelabel_status(settings: Settings, project_id: int) -> dict[str, Any] | None:
    """The project's pre-annotation record as ``/job_status`` shows it (None before the first run)."""
    progress = read_progress(settings.project(project_id))
    return None if progress is None else progress.to_dict()


def prelabel_collector(settings: Settings, projects: Callable[[], Iterable[int]]) -> Collector:
    """Scrape-time samples of each project's pre-annotation record."""
    def collect() -> Iterator[Sample]:
        for pid in projects():
            progress = read_progress(settings.project(pid))
            if progress is None:
                continue
            labels = {"project": str(pid), "version": progress.version}
            yield Sample("taxomoco_prelabel_tasks", labels, float(progress.total))
            yield Sample("taxomoco_prelabel_written_tasks", labels, float(progress.done))
            yield Sample("taxomoco_prelabel_rate_per_second", labels, float(progress.rate_per_s))
            for state in PrelabelState:
                yield Sample("taxomoco_prelabel_state", {**labels, "state": state.value},
                             float(progress.state is state))

    return collect


def register_routes(app: Flask, settings: Settings, metrics: Registry, projects: Callable[[], Iterable[int]]) -> None:
    """Add ``GET /queue`` and the pre-annotation metrics to the app."""
    for family in PRELABEL_FAMILIES:
        metrics.describe(family)
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
