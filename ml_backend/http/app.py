"""The Flask WSGI app Label Studio talks to: /health /setup /predict /webhook /train /job_status /versions /metrics.

Timing contract (Label Studio's timeouts): /health answers in < 1 s and /setup in < 3 s whatever the store
or the trainer are doing (models load in the store's threads; the scheduler's health is asked with a time
limit); /webhook answers 2xx at once (it only schedules); /predict answers exactly one item per task, in
task order, and never fails as a batch: a task whose image cannot be read gets an empty item and a log line.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from ml_backend.http.auth import basic_auth_ok, needs_auth
from ml_backend.http.data_routes import register_routes as register_data_routes
from ml_backend.http.health import SchedulerHealth
from ml_backend.http.metrics import Registry, project_collector
from ml_backend.labelstudio import connections
from ml_backend.labelstudio.ids import project_id_of
from ml_backend.labelstudio.label_config import parse_label_config
from ml_backend.labelstudio.webhooks import TRAINING_EVENTS, WebhookEvent
from ml_backend.paths import ProjectPaths
from ml_backend.queue.factory import make_scheduler
from ml_backend.serving.predict import PredictService
from ml_backend.serving.store import ModelStore
from ml_backend.settings import Settings
from model.errors import ConfigError, DataError, TaxomocoError

__all__ = ["MODEL_CLASS", "create_app"]

log = logging.getLogger(__name__)

MODEL_CLASS = "taxomoco"


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
    metrics = Registry()
    service = PredictService(settings, store, metrics)
    scheduler_health = SchedulerHealth(scheduler)
    webhook_auth = settings.webhook_requires_auth

    app = Flask("taxomoco")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.extensions["taxomoco"] = {"settings": settings, "scheduler": scheduler, "store": store, "metrics": metrics}

    # ----- cross-cutting ------------------------------------------------------------------------------
    @app.before_request
    def _start() -> Response | None:
        g.t0 = time.perf_counter()
        if needs_auth(request.path, settings.basic_auth_user, webhook_auth) and not basic_auth_ok(
            request.headers.get("Authorization"), settings.basic_auth_user or "", settings.basic_auth_pass or ""
        ):
            resp = jsonify(error="Authentication required: use the BASIC_AUTH_USER / BASIC_AUTH_PASS of this backend.")
            resp.status_code = 401
            resp.headers["WWW-Authenticate"] = 'Basic realm="taxomoco"'
            return resp
        return None

    @app.after_request
    def _count(resp: Response) -> Response:
        endpoint = request.url_rule.rule if request.url_rule is not None else "other"
        metrics.requests.inc(endpoint, request.method, str(resp.status_code))
        metrics.latency.observe(time.perf_counter() - g.get("t0", time.perf_counter()), endpoint)
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
        return jsonify(error=f"Internal error: {exc.__class__.__name__}: {exc}"), 500

    # ----- Label Studio protocol ----------------------------------------------------------------------
    @app.get("/")
    @app.get("/health")
    def health() -> Response:
        return jsonify(status="UP", model_class=MODEL_CLASS, scheduler=scheduler_health.get(), models=_models())

    def _models() -> dict[str, Any]:
        return {str(pid): store.status(pid)["served_version"] for pid in store.projects()}

    @app.post("/setup")
    def setup() -> Response:
        body = _json_object()
        pid = project_id_of(body.get("project"))
        schema = body.get("schema")
        if schema:
            parse_label_config(schema)  # ConfigError -> 400 with the tag and the fix (Label Studio shows it)
            service.remember_schema(pid, schema)
        try:
            connections.remember(settings, pid, body.get("hostname"), body.get("access_token"))
        except OSError as exc:
            log.warning("project %s: cannot store the Label Studio connection: %s", pid, exc)
        return jsonify(model_version=store.version(pid))

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
        results, version = service.predict(pid, tasks, body.get("label_config"))
        return jsonify(results=results, model_version=version)

    @app.post("/webhook")
    def webhook() -> Response:
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("action"), str):
            metrics.webhooks.inc("malformed", "rejected")
            raise DataError('A webhook body must be a JSON object with an "action" string (Label Studio sends one).')
        action = body["action"]
        try:
            event = WebhookEvent(action)
        except ValueError:
            event = None
        if event not in TRAINING_EVENTS:
            metrics.webhooks.inc(event.value if event is not None else "unknown", "ignored")  # bounded labels
            return jsonify(status="ignored", action=action)
        pid = _webhook_project(body)
        scheduled.add(pid)
        result = scheduler.schedule(pid, reason=action)
        outcome = str(result.get("action", "scheduled"))
        metrics.webhooks.inc(action, outcome)
        if outcome == "error":  # still 2xx: Label Studio disables a webhook that keeps failing
            log.error("project %s: %s not scheduled: %s", pid, action, result.get("reason"))
        return jsonify(status="error" if outcome == "error" else "ok", **result)

    @app.post("/train")
    def train() -> Response:
        body = _json_object()
        pid = project_id_of(body.get("project"))
        force = bool(body.get("force_pretrain", False))
        scheduled.add(pid)
        return jsonify(status="ok", **scheduler.schedule(pid, reason="TRAIN", force_pretrain=force))

    @app.post("/job_status")
    def job_status() -> Response:
        body = _json_object()
        pid = project_id_of(body.get("project", request.args.get("project")))
        return jsonify(scheduler.status(pid))

    @app.get("/versions")
    def versions() -> Response:
        project = request.args.get("project")
        if project is not None:
            return jsonify(versions=store.versions(project_id_of(project)))
        seen: list[str] = []
        for pid in _all_projects():
            seen.extend(v for v in store.versions(pid) if v not in seen)
        return jsonify(versions=seen)

    @app.get("/metrics")
    def metrics_text() -> Response:
        return Response(metrics.render(), mimetype="text/plain; version=0.0.4")

    def _all_projects() -> list[int]:
        # a project whose first job is still queued has no directory yet
        return sorted(set(store.projects()) | scheduled | set(ProjectPaths.project_ids(settings.model_dir)))

    metrics.add_collector(project_collector(store, scheduler, _all_projects))

    register_data_routes(app, settings)
    return app


def _reason_phrase(message: str, limit: int = 500) -> str:
    """``message`` as an HTTP reason phrase: printable ASCII on one line, at most ``limit`` characters."""
    text = " ".join(message.split())
    text = "".join(c if 32 <= ord(c) < 127 else "?" for c in text)
    return text[:limit] or "Bad Request"


def _json_object() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if body is None and not request.get_data():
        return {}
    if not isinstance(body, dict):
        raise DataError("The request body must be a JSON object (Content-Type: application/json).")
    return body


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
