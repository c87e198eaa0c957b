"""The Flask WSGI app Label Studio talks to: /health /setup /predict /webhook /train /job_status /versions /metrics.

Timing contract (Label Studio's timeouts): /health answers in < 1 s and /setup in < 3 s whatever the store
or the trainer are doing (models load in the store's threads; the scheduler's health is asked with a time
limit); /webhook answers 2xx at once (it only schedules); /predict answers exactly one item per task, in
task order, and never fails as a batch: a task whose image cannot be read gets an empty item and a log line.
"""

from __future__ import annotations

import importlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from enum import Enum
from typing import Any

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from ml_backend.labelstudio import connections
from ml_backend.http.auth import basic_auth_ok, needs_auth
from ml_backend.labelstudio.label_config import parse_label_config
from ml_backend.labelstudio.results import project_id_of
from ml_backend.http.metrics import Registry, project_collector
from ml_backend.serving.predict import PredictService
from ml_backend.settings import Settings
from ml_backend.serving.store import ModelStore
from model.errors import ConfigError, DataError, TaxomocoError

log = logging.getLogger(__name__)

MODEL_CLASS = "taxomoco"
HEALTH_DETAIL_TIMEOUT_S = 0.4
"""Longest a /health call waits for the scheduler's own health check."""
HEALTH_DETAIL_MAX_AGE_S = 1.0
"""A scheduler health answer younger than this is reused as is; an older one triggers a new check."""
HEALTH_DETAIL_STALE_S = 5.0
"""An answer older than this is not shown any more: /health waits (within the budget) for a new one."""

ROUTE_EXTENSIONS: tuple[str, ...] = ("ml_backend.training.disagreements",)
"""Modules that add endpoints of their own: each may define ``register_routes(app: Flask, settings: Settings)``
(e.g. ``GET /disagreements?project=ID``); Basic auth and request metrics apply to them as well."""


class WebhookEvent(str, Enum):
    """Label Studio webhook actions the backend knows; the first four schedule training."""

    ANNOTATION_CREATED = "ANNOTATION_CREATED"
    ANNOTATION_UPDATED = "ANNOTATION_UPDATED"
    ANNOTATIONS_DELETED = "ANNOTATIONS_DELETED"
    START_TRAINING = "START_TRAINING"
    ANNOTATIONS_CREATED = "ANNOTATIONS_CREATED"
    TASKS_CREATED = "TASKS_CREATED"
    TASKS_DELETED = "TASKS_DELETED"
    PROJECT_CREATED = "PROJECT_CREATED"
    PROJECT_UPDATED = "PROJECT_UPDATED"
    PROJECT_DELETED = "PROJECT_DELETED"


TRAINING_EVENTS = frozenset(
    {WebhookEvent.ANNOTATION_CREATED, WebhookEvent.ANNOTATION_UPDATED, WebhookEvent.ANNOTATIONS_DELETED, WebhookEvent.START_TRAINING}
)


def create_app(settings: Settings, scheduler: Any = None, store: ModelStore | None = None) -> Flask:
    """Build the WSGI app.

    Args:
        settings: the process settings.
        scheduler: a ``ml_backend.queue.base.Scheduler``; default ``make_scheduler(settings)``.
        store: the model store; default ``ModelStore(settings)`` (bundles + Predictor, hot reload).
    """
    if scheduler is None:
        from ml_backend.queue.base import make_scheduler

        scheduler = make_scheduler(settings)
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    store = store or ModelStore(settings)
    scheduled: set[int] = set()  # projects this process scheduled training for
    metrics = Registry()
    service = PredictService(settings, store, metrics)
    health_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="health")
    health_state: dict[str, Any] = {"future": None}
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
        return jsonify(status="UP", model_class=MODEL_CLASS, scheduler=_scheduler_health(), models=_models())

    def _scheduler_health() -> dict[str, Any]:
        # the last answer is reused for up to HEALTH_DETAIL_MAX_AGE_S: most /health calls hand nothing to
        # another thread (a hand-off waits for the GIL twice behind busy /predict threads)
        now = time.monotonic()
        future = health_state["future"]
        if future is not None and future.done():
            try:
                health_state["last"] = dict(future.result())
            except Exception as exc:  # health must always answer
                health_state["last"] = {"ok": False, "reason": f"{exc.__class__.__name__}: {exc}"}
            health_state["last_at"], health_state["future"], future = health_state["since"], None, None
        last_at = health_state.get("last_at")
        if future is None and (last_at is None or now - last_at > HEALTH_DETAIL_MAX_AGE_S):
            health_state["since"] = now
            health_state["future"] = future = health_pool.submit(scheduler.health)
        if last_at is not None and now - last_at <= HEALTH_DETAIL_STALE_S:
            return {**health_state["last"], "checked_s_ago": round(now - last_at, 3)}
        # no recent answer: wait for the running check, never longer than the budget since it started
        assert future is not None
        wait = max(0.0, HEALTH_DETAIL_TIMEOUT_S - (now - health_state["since"]))
        try:
            answer = dict(future.result(timeout=wait))
        except FutureTimeout:
            return {"ok": False, "reason": f"the scheduler did not answer within {HEALTH_DETAIL_TIMEOUT_S} s"}
        except Exception as exc:  # health must always answer
            return {"ok": False, "reason": f"{exc.__class__.__name__}: {exc}"}
        health_state["last"], health_state["last_at"], health_state["future"] = answer, health_state["since"], None
        return {**answer, "checked_s_ago": round(time.monotonic() - health_state["since"], 3)}

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
        found = set(store.projects()) | scheduled  # a project whose first job is still queued has no directory yet
        try:
            for p in settings.model_dir.iterdir():
                if p.name.startswith("project-") and p.name[8:].isdigit():
                    found.add(int(p.name[8:]))
        except FileNotFoundError:
            pass
        return sorted(found)

    metrics.add_collector(project_collector(store, scheduler, _all_projects))

    for name in ROUTE_EXTENSIONS:
        register = getattr(importlib.import_module(name), "register_routes", None)
        if register is not None:
            register(app, settings)
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
