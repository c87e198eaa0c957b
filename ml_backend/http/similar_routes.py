"""Similar-image search and duplicates: ``GET /similar``, ``POST /similar``, ``POST /similar/tab``, ``GET /duplicates``.

All of them reveal project data (access class ``DATA``: Basic auth required). Search runs on the similarity
index the model store loaded with the served model version (``ml_backend.serving.similar``); the duplicate
groups are those of the last training (``ml_backend.training.neighbors``).

Answers: 400 for malformed parameters, 404 for a task the index does not know, 422 for a task without a
usable image, 409 while the project has no trained model or its model has no index yet (each with the remedy).
"""

from __future__ import annotations

import threading
from typing import Any

from flask import Flask, Response, jsonify, request
from flask.typing import ResponseReturnValue

from ml_backend.labelstudio import connections
from ml_backend.labelstudio.ids import project_id_of
from ml_backend.labelstudio.label_config import parse_label_config
from ml_backend.labelstudio.tabs import upsert_task_tab
from ml_backend.serving.similar import Neighbor, ProjectNeighbors, TaskNotIndexed
from ml_backend.serving.store import ModelStore
from ml_backend.settings import Settings
from ml_backend.training.neighbors import read_duplicates
from model.bundle import live_version
from model.errors import DataError, TaxomocoError
from model.images import check_image_header, load_image

__all__ = ["DEFAULT_K", "MAX_K", "SIMILAR_TAB_COLUMNS", "SIMILAR_TAB_PREFIX", "register_routes"]

DEFAULT_K = 20
MAX_K = 500
"""Most neighbours one call returns (a Data Manager tab filters at most this many task ids)."""
SIMILAR_TAB_PREFIX = "taxomoco: similar to task"
"""Title of the tab ``POST /similar/tab`` creates: ``"taxomoco: similar to task N"``."""
SIMILAR_TAB_COLUMNS = ("tasks:annotations_results", "tasks:predictions_results")
"""Columns the similar-to tab shows beside the image thumbnail (Label Studio hides them by default): the labels
given so far and the model's, so a person sees at once how the cluster is labelled."""
LOAD_WAIT_S = 10.0


class _Answer(Exception):
    """An error answer of these routes: HTTP status and message (with its remedy)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def register_routes(app: Flask, settings: Settings, store: ModelStore) -> None:
    """Add the similarity routes to ``app`` (see the module docstring)."""
    forwards = threading.BoundedSemaphore(settings.predict_concurrency)  # uploads embedded at once (own budget)

    @app.errorhandler(_Answer)
    def _answer(exc: _Answer) -> ResponseReturnValue:
        return jsonify(error=str(exc)), exc.status

    @app.get("/similar")
    def similar_to_task() -> Response:
        pid, k = _project(), _k()
        tid = _task()
        neighbors = _neighbors(settings, store, pid)
        return jsonify(_answer_body(settings, pid, neighbors, _search_task(neighbors, tid, k), task=tid))

    @app.post("/similar")
    def similar_to_upload() -> Response:
        pid, k = _project(), _k()
        data = _uploaded_image()
        neighbors = _neighbors(settings, store, pid)
        model = store.get(pid)
        if model is None or model.version != neighbors.version:
            raise _Answer(503, f"Project {pid}'s model is being reloaded; try again in a few seconds.")
        check_image_header(data, settings.image_max_pixels, name="the uploaded image")
        image = load_image(data, settings.image_max_pixels)
        with forwards:
            emb, ok = model.encoder_embedder.embed_with_mask([image])  # type: ignore[attr-defined]  # (1, D), (1,)
        if not ok[0]:
            raise DataError("The uploaded image could not be embedded; send a PNG or JPEG image.")
        found = neighbors.similar_to_vector(emb[0], k)
        return jsonify(_answer_body(settings, pid, neighbors, found))

    @app.post("/similar/tab")
    def similar_tab() -> Response:
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise DataError('POST /similar/tab takes a JSON object: {"project": ID, "task": TID, "k": 20}.')
        pid = project_id_of(body.get("project"))
        tid, k = _int(body.get("task"), "task", 1, 2**31), _int(body.get("k", DEFAULT_K), "k", 1, MAX_K)
        neighbors = _neighbors(settings, store, pid)
        found = _search_task(neighbors, tid, k)
        conn = connections.resolve(settings, pid)
        client = conn.client()
        try:
            image_key = parse_label_config(client.get_project(pid).label_config).image_key
            title = f"{SIMILAR_TAB_PREFIX} {tid}"
            tab_id = upsert_task_tab(client, pid, title, [tid] + [n.task_id for n in found],
                                     shown=(f"tasks:data.{image_key}",) + SIMILAR_TAB_COLUMNS)
        finally:
            client.close()
        return jsonify(tab=tab_id, title=title, project=pid, task=tid, tasks=[tid] + [n.task_id for n in found],
                       url=f"{conn.url}/projects/{pid}/data?tab={tab_id}")

    @app.get("/duplicates")
    def duplicates() -> Response:
        pid = _project()
        try:
            report = read_duplicates(settings.project(pid))
        except DataError as exc:
            raise _Answer(404, str(exc)) from None
        groups = report.get("groups", [])
        report["project"] = pid
        report["summary"] = {"groups": len(groups), "exact": sum(g["kind"] == "exact" for g in groups),
                             "near": sum(g["kind"] == "near" for g in groups),
                             "tasks": sum(len(g["items"]) for g in groups)}
        return jsonify(report)


def _project() -> int:
    raw = request.args.get("project")
    if raw is None:
        raise DataError(f"Pass the Label Studio project id: {request.path}?project=ID.")
    return project_id_of(raw)


def _task() -> int:
    raw = request.args.get("task")
    if raw is None:
        raise DataError("Pass the task: GET /similar?project=ID&task=TID (or POST /similar with an image).")
    return _int(raw, "task", 1, 2**31)


def _k() -> int:
    return _int(request.args.get("k", DEFAULT_K), "k", 1, MAX_K)


def _int(raw: object, name: str, low: int, high: int) -> int:
    try:
        value = int(str(raw)) if not isinstance(raw, bool) and len(str(raw)) < 12 else None
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise DataError(f"{name}={str(raw)[:40]!r} is not a whole number in {low}..{high}.")
    return value


def _uploaded_image() -> bytes:
    """The image of ``POST /similar``: a multipart file field ``image``, or the raw body."""
    if request.files:
        upload = request.files.get("image") or next(iter(request.files.values()))
        data = upload.read()
    else:
        data = request.get_data(cache=False)
    if not data:
        raise DataError("POST /similar needs an image: the raw bytes as the body (Content-Type: image/png or "
                        "image/jpeg) or a multipart file field named 'image'.")
    return data


def _neighbors(settings: Settings, store: ModelStore, pid: int) -> ProjectNeighbors:
    """The served similarity index of ``pid``; 409 with the remedy while there is none."""
    if live_version(settings.project(pid).models) is None:  # no store entry for projects that never trained
        raise _Answer(409, f"Project {pid} has no trained model yet: similarity search uses the model's image "
                           f"embeddings. Label at least MIN_LABELS_TO_TRAIN={settings.min_labels_to_train} tasks "
                           "(two classes) and train (Train button in Label Studio, or POST /train).")
    model = store.get(pid, wait_s=LOAD_WAIT_S)
    neighbors = store.neighbors(pid)
    if model is None:
        raise _Answer(409, f"Project {pid}'s model is still loading or failed to load "
                           f"({store.status(pid).get('load_error') or 'loading'}); try again shortly, or retrain.")
    if neighbors is None:
        why = store.status(pid).get("neighbors_error")
        raise _Answer(409, f"Project {pid}'s model {model.version} has no similarity index"
                           f"{f' ({why})' if why else ''}: it is built by training. Retrain the project (Train "
                           "button in Label Studio, or POST /train).")
    return neighbors


def _search_task(neighbors: ProjectNeighbors, tid: int, k: int) -> list[Neighbor]:
    try:
        return neighbors.similar_to_task(tid, k)
    except TaskNotIndexed as exc:
        raise _Answer(404 if exc.unknown else 422, str(exc)) from None


def _answer_body(settings: Settings, pid: int, neighbors: ProjectNeighbors, found: list[Neighbor],
                 task: int | None = None) -> dict[str, Any]:
    base = _label_studio_url(settings, pid)
    results = []
    for n in found:
        row = n.to_dict()
        if base is not None:
            row["image_url"] = n.image if "://" in n.image or not n.image.startswith("/") else base + n.image
            row["task_url"] = f"{base}/projects/{pid}/data?task={n.task_id}"
        results.append(row)
    body: dict[str, Any] = {"project": pid, "model_version": neighbors.version, "results": results}
    if task is not None:
        body["task"] = task
    return body


def _label_studio_url(settings: Settings, pid: int) -> str | None:
    try:
        return connections.resolve(settings, pid).url.rstrip("/")
    except TaxomocoError:  # no verified connection: image values stay as Label Studio holds them
        return None
