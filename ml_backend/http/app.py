"""The Flask WSGI app Label Studio talks to: /health /setup /predict /webhook /train /job_status /versions /metrics.

Timing contract (Label Studio's timeouts): /health answers in < 1 s and /setup in < 3 s whatever the store
or the trainer are doing (models load in the store's threads; the scheduler's health is asked with a time
limit); /webhook answers 2xx at once (it only schedules); /predict answers exactly one item per task, in
task order, and never fails as a batch: a task whose image cannot be read gets an empty item and a log line.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import torch
from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from ml_backend.http.auth import decide
from ml_backend.http.data_routes import register_routes as register_data_routes
from ml_backend.http.first_job import FirstJob
from ml_backend.http.health import SchedulerHealth
from ml_backend.http.loop_routes import prelabel_status
from ml_backend.http.loop_routes import register_routes as register_loop_routes
from ml_backend.http.metrics import CONTENT_TYPE, ProjectCollector, Registry
from ml_backend.http.similar_routes import register_routes as register_similar_routes
from ml_backend.labelstudio import connections
from ml_backend.labelstudio.ids import project_id_of
from ml_backend.labelstudio.label_config import parse_label_config
from ml_backend.labelstudio.webhook_setup import WebhookRegistrar
from ml_backend.labelstudio.webhooks import COLD_START_EVENTS, TRAINING_EVENTS, WebhookEvent
from ml_backend.paths import ProjectPaths
from ml_backend.queue.factory import make_scheduler
from ml_backend.serving.predict import PredictService
from ml_backend.serving.store import UNTRAINED, ModelStore
from ml_backend.serving.training_state import TrainingStates
from ml_backend.settings import Settings
from model.bundle import live_version
from model.errors import ConfigError, DataError, TaxomocoError

__all__ = ["MODEL_CLASS", "create_app"]

log = logging.getLogger(__name__)

MODEL_CLASS = "taxomoco"
LARGE_BODY_PATHS = frozenset({"/predict", "/similar"})
"""Paths whose bodies may be as large as MAX_REQUEST_BYTES (image batches); all others: SMALL_REQUEST_MAX_BYTES."""


def create_app(settings: Settings, scheduler: Any = None, store: ModelStore | None = None) -> Flask:
    """Build the WSGI app.

    Args:
        settings: the process settings.
        scheduler: a ``ml_backend.queue.base.Scheduler``; default ``make_scheduler(settings)``.
        store: the model store; default ``ModelStore(settings)`` (bundles + Predictor, hot reload).
    """
    if scheduler is None:
        scheduler = make_scheduler(settings)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    store = store or ModelStore(settings)
    scheduled: set[int] = set()  # projects this process scheduled training for
    metrics = Registry(settings.prometheus_multiproc_dir)
    states = TrainingStates(settings)  # last training per project: /health, /versions, the reported version
    service = PredictService(settings, store, metrics, states)
    scheduler_health = SchedulerHealth(scheduler)
    webhook_registrar = WebhookRegistrar(settings)
    first_job = FirstJob(settings, scheduler)  # a newly connected project's cold start (ml_backend.training.coldstart)

    app = Flask("taxomoco")
    app.config["MAX_CONTENT_LENGTH"] = max(settings.max_request_bytes, settings.small_request_max_bytes)
    app.extensions["taxomoco"] = {"settings": settings, "scheduler": scheduler, "store": store, "metrics": metrics,
                                  "first_job": first_job}

    # ----- cross-cutting ------------------------------------------------------------------------------
    @app.before_request
    def _start() -> Response | None:
        g.t0 = time.perf_counter()
        decision = decide(request.path, request.headers.get("Authorization"), settings)
        g.authenticated = decision.authenticated
        if not decision.allowed:
            resp = jsonify(error=decision.message)
            resp.status = f"{decision.status} {_reason_phrase(decision.message)}"
            if decision.status == 401:
                resp.headers["WWW-Authenticate"] = 'Basic realm="taxomoco"'
            return resp
        # the body limit of this endpoint, checked before anything reads the body
        limit = settings.max_request_bytes if request.path in LARGE_BODY_PATHS else settings.small_request_max_bytes
        request.max_content_length = limit
        if request.content_length is not None and request.content_length > limit:
            resp = jsonify(error=f"The body has {request.content_length} bytes; {request.path} accepts at most {limit}.")
            resp.status_code = 413
            return resp
        return None

    @app.after_request
    def _count(resp: Response) -> Response:
        endpoint = request.url_rule.rule if request.url_rule is not None else "other"
        metrics.requests.labels(endpoint, request.method, str(resp.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - g.get("t0", time.perf_counter()))
        return resp

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> tuple[Response, int]:
        return jsonify(error=exc.description or exc.name), exc.code or 500

    @app.errorhandler(TaxomocoError)
    def _our_error(exc: TaxomocoError) -> Response:
        log.warning("%s %s: %s", request.method, request.path, exc)
        code = 400 if isinstance(exc, (ConfigError, DataError)) else 500
        resp = jsonify(error=str(exc))
        # Label Studio shows only "<code> Client Error: <reason phrase> for url ..." of a failed call, so the
        # cause and the fix travel in the reason phrase as well as in the body
        resp.status = f"{code} {_reason_phrase(str(exc))}"
        return resp

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> tuple[Response, int]:  # request boundary: record and answer
        log.exception("%s %s failed", request.method, request.path)
        return jsonify(error=f"Internal error ({exc.__class__.__name__}); see the backend's log."), 500

    # ----- Label Studio protocol ----------------------------------------------------------------------
    @app.get("/")
    @app.get("/health")
    def health() -> Response:
        if not g.get("authenticated"):  # liveness only: no project list, no versions
            return jsonify(status="UP", model_class=MODEL_CLASS)
        return jsonify(status="UP", model_class=MODEL_CLASS, scheduler=scheduler_health.get(), models=_models(),
                       training=_training())

    def _models() -> dict[str, Any]:
        return {str(pid): store.status(pid)["served_version"] for pid in store.projects()}

    def _training() -> dict[str, Any]:
        """Per project: how its last training ended and why (a failure or a skip says what to do)."""
        return {str(pid): states.get(pid).to_dict() for pid in _all_projects()}

    @app.post("/setup")
    def setup() -> Response:
        body = _json_object()
        pid = project_id_of(body.get("project"))
        schema = _optional_str(body, "schema")
        if schema:
            parse_label_config(schema)  # ConfigError -> 400 with the tag and the fix (Label Studio shows it)
        conn = connections.accept_setup(settings, connections.SetupRequest(
            pid, _optional_str(body, "hostname"), _optional_str(body, "access_token"), schema,
            bool(g.get("authenticated"))))
        if conn is not None and settings.webhook_auth:
            webhook_registrar.ensure(pid, connections.resolve(settings, pid))
        if conn is not None and first_job.connected(pid):
            scheduled.add(pid)
        if schema:
            service.remember_schema(pid, schema)
        return jsonify(model_version=states.label(pid, service.version(pid)))

    @app.post("/predict")
    def predict() -> Response:
        body = _json_object()
        tasks = body.get("tasks")
        if not isinstance(tasks, list):
            raise DataError('The /predict body needs "tasks": a list of task objects.')
        project = body.get("project")
        if project is None and tasks and isinstance(tasks[0], dict):
            project = tasks[0].get("project")
        pid = project_id_of(project)
        if not connections.known(settings, pid):  # no state for projects nobody verified
            return jsonify(results=[], model_version=states.label(pid, UNTRAINED))
        label_config = body.get("label_config")
        results, version = service.predict(pid, tasks, label_config if isinstance(label_config, str) else None)
        return jsonify(results=results, model_version=version)

    @app.post("/webhook")
    def webhook() -> Response:
        try:
            body = _json_object()
        except DataError:
            body = {}
        if not isinstance(body.get("action"), str):
            metrics.webhooks.labels("malformed", "rejected").inc()
            raise DataError('A webhook body must be a JSON object with an "action" string (Label Studio sends one).')
        action = body["action"]
        try:
            event = WebhookEvent(action)
        except ValueError:
            event = None
        if event not in TRAINING_EVENTS and event not in COLD_START_EVENTS:
            metrics.webhooks.labels(event.value if event is not None else "unknown", "ignored").inc()  # bounded labels
            return jsonify(status="ignored", action=action)
        pid = _webhook_project(body)
        if not connections.ensure_known(settings, pid):  # only projects verified against Label Studio are trained
            metrics.webhooks.labels(action, "unknown-project").inc()
            return jsonify(status="ignored", action=action, reason=f"project {pid} is not connected to this backend")
        if event in COLD_START_EVENTS and live_version(settings.project(pid).models) is not None:
            metrics.webhooks.labels(action, "ignored").inc()
            return jsonify(status="ignored", action=action, reason="the project has a model version: new tasks get "
                                                                  "predictions from /predict and the next training")
        scheduled.add(pid)
        result = scheduler.schedule(pid, reason=action)
        outcome = str(result.get("action", "scheduled"))
        metrics.webhooks.labels(action, outcome).inc()
        if outcome == "error":  # still 2xx: Label Studio disables a webhook that keeps failing
            log.error("project %s: %s not scheduled: %s", pid, action, result.get("reason"))
        return jsonify(status="error" if outcome == "error" else "ok", **result)

    @app.post("/train")
    def train() -> Response:
        body = _json_object()
        pid = project_id_of(body.get("project"))
        if not connections.ensure_known(settings, pid):
            raise ConfigError(f"Project {pid} is not connected to this backend: connect the model in Label Studio "
                              "(its /setup call verifies the project), or set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY.")
        force = bool(body.get("force_pretrain", False))
        scheduled.add(pid)
        return jsonify(status="ok", **scheduler.schedule(pid, reason="TRAIN", force_pretrain=force))

    @app.post("/job_status")
    def job_status() -> Response:
        body = _json_object()
        pid = project_id_of(body.get("project", request.args.get("project")))
        return jsonify({**scheduler.status(pid), "prelabel": prelabel_status(settings, pid)})

    @app.get("/versions")
    def versions() -> Response:
        # "versions" is what Label Studio lists; "training" says how the last training ended (and why it failed)
        project = request.args.get("project")
        if project is not None:
            pid = project_id_of(project)
            return jsonify(versions=store.versions(pid), training=states.get(pid).to_dict())
        seen: list[str] = []
        for pid in _all_projects():
            seen.extend(v for v in store.versions(pid) if v not in seen)
        return jsonify(versions=seen, training={str(pid): states.get(pid).to_dict() for pid in _all_projects()})

    @app.get("/metrics")
    def metrics_text() -> Response:
        return Response(metrics.render(), content_type=CONTENT_TYPE)

    def _all_projects() -> list[int]:
        # a project whose first job is still queued has no directory yet
        return sorted(set(store.projects()) | scheduled | set(ProjectPaths.project_ids(settings.model_dir)))

    metrics.add_collector(ProjectCollector(store, scheduler, _all_projects))

    register_data_routes(app, settings)
    register_loop_routes(app, settings, metrics, _all_projects)
    register_similar_routes(app, settings, store)
    return app


def _reason_phrase(message: str, limit: int = 500) -> str:
    """``message`` as an HTTP reason phrase: printable ASCII on one line, at most ``limit`` characters."""
    text = " ".join(message.split())
    text = "".join(c if 32 <= ord(c) < 127 else "?" for c in text)
    return text[:limit] or "Bad Request"


def _json_object() -> dict[str, Any]:
    """The request body as a JSON object ({} for an empty body); 400 for anything else, however malformed."""
    data = request.get_data(cache=True)
    if not data:
        return {}
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
        raise DataError("The request body is not valid JSON (or is nested too deeply); send a JSON object.") from None
    if not isinstance(body, dict):
        raise DataError("The request body must be a JSON object (Content-Type: application/json).")
    return body


def _optional_str(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise DataError(f'"{key}" must be a string.')
    return value


def _webhook_project(body: dict[str, Any]) -> int:
    project = body.get("project")
    if project is None:
        for key in ("annotation", "task"):
            inner = body.get(key)
            if isinstance(inner, dict) and inner.get("project") is not None:
                project = inner["project"]
                break
    if project is None:
        raise DataError(f'The {body.get("action")} webhook names no project (expected "project": {{"id": ...}}).')
    return project_id_of(project)
