"""``GET /queue`` (auth, ordering, limits), the pre-annotation record in ``/job_status`` and ``/metrics``, and the
RQ pre-annotation job's deterministic id (real redis-server)."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from ml_backend.http.app import create_app
from ml_backend.paths import ProjectPaths
from ml_backend.prelabel.live import TaskPredictions
from ml_backend.prelabel.order import write_queue
from ml_backend.prelabel.progress import PrelabelPhase, PrelabelState, Progress, write_progress
from ml_backend.prelabel.schedule import JOB_FUNC, enqueue_prelabel, prelabel_job_id
from ml_backend.queue.factory import make_scheduler
from ml_backend.serving.store import ModelStore
from ml_backend.settings import Settings
from tests.test_app import metric_values

AUTH = {"Authorization": "Basic " + base64.b64encode(b"ls:pw").decode()}


def _queue(paths: ProjectPaths) -> list[int]:
    """A saved order over 6 tasks (task 101 labelled): returns the expected task order."""
    ids = [100, 101, 102, 103, 104, 105]
    top = np.array([0.9, 0.5, 0.3, 0.99, 0.6, np.nan])  # 105: no embedding (unreadable image)
    emb = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    emb[5] = np.nan
    items = [{"result": [], "score": 0.0, "model_version": "20260101T000000-abcdef"}] * 6
    labelled = np.array([False, True, False, False, False, False])
    write_queue(paths, TaskPredictions(ids, items, emb, top), labelled, n_leaves=1, cold_start_per_class=0.0)
    return [102, 104, 100, 103, 105]  # least confident first, unreadable last


@pytest.fixture
def app_client(tmp_path):
    settings = Settings(model_dir=tmp_path, basic_auth_user="ls", basic_auth_pass="pw")
    store = ModelStore(settings)
    scheduler = make_scheduler(settings, job_func="tests.test_app.sleeping_job")
    try:
        yield settings, create_app(settings, scheduler=scheduler, store=store).test_client()
    finally:
        scheduler.close()
        store.close()


def test_queue_needs_basic_auth_and_serves_the_saved_order(app_client) -> None:
    settings, client = app_client
    assert client.get("/queue?project=7").status_code == 401
    assert client.get("/queue?project=7", headers=AUTH).status_code == 404  # no order yet: says when it comes
    expected = _queue(settings.project(7))
    r = client.get("/queue?project=7&limit=3", headers=AUTH)
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert [t["task"] for t in body["tasks"]] == expected[:3] and body["count"] == 5
    assert [t["reason"] for t in body["tasks"]] == ["uncertain"] * 3
    assert body["tasks"][0]["score"] == pytest.approx(0.7)  # 1 - top path probability
    everything = client.get("/queue?project=7&limit=100", headers=AUTH).get_json()["tasks"]
    assert [t["task"] for t in everything] == expected and everything[-1]["reason"] == "unranked"
    for bad in ("/queue", "/queue?project=x", "/queue?project=7&limit=-1", "/queue?project=7&limit=zz"):
        assert client.get(bad, headers=AUTH).status_code == 400, bad


def test_queue_is_project_data_even_without_configured_auth(tmp_path) -> None:
    settings = Settings(model_dir=tmp_path)
    store = ModelStore(settings)
    scheduler = make_scheduler(settings, job_func="tests.test_app.sleeping_job")
    try:
        _queue(settings.project(7))
        r = create_app(settings, scheduler=scheduler, store=store).test_client().get("/queue?project=7")
        assert r.status_code == 403 and "BASIC_AUTH_USER" in r.get_json()["error"]
    finally:
        scheduler.close()
        store.close()


def test_job_status_and_metrics_show_the_pre_annotation_progress(app_client) -> None:
    settings, client = app_client
    paths = settings.project(7)
    r = client.post("/job_status", json={"project": 7}, headers=AUTH)
    assert r.status_code == 200 and r.get_json()["prelabel"] is None
    write_progress(paths, Progress(version="20260101T000000-abcdef", state=PrelabelState.RUNNING, total=1000,
                                   done=1000, after_task=400, rate_per_s=120.5, phase=PrelabelPhase.CLEANING,
                                   cleanup_total=800, cleanup_done=300))
    status = client.post("/job_status", json={"project": 7}, headers=AUTH).get_json()["prelabel"]
    assert status["state"] == "running" and status["done"] == 1000 and status["total"] == 1000
    assert status["phase"] == "cleaning" and (status["cleanup_done"], status["cleanup_total"]) == (300, 800)
    text = client.get("/metrics", headers=AUTH).get_data(as_text=True)
    values = metric_values(text)
    labels = 'project="7",version="20260101T000000-abcdef"'
    assert values[f"taxomoco_prelabel_tasks{{{labels}}}"] == 1000
    assert values[f"taxomoco_prelabel_written_tasks{{{labels}}}"] == 1000
    assert values[f"taxomoco_prelabel_cleanup_left{{{labels}}}"] == 500
    assert values['taxomoco_prelabel_state{project="7",state="running",version="20260101T000000-abcdef"}'] == 1
    assert "# TYPE taxomoco_prelabel_rate_per_second gauge" in text


@pytest.mark.redis
def test_pre_annotation_job_id_is_deterministic_per_version(redis_url: str, tmp_path) -> None:
    from rq import Queue

    from ml_backend.queue.rq_queue import connect

    settings = Settings(model_dir=tmp_path, redis_url=redis_url)
    redis = connect(redis_url)
    first = enqueue_prelabel(redis, settings, 7, "20260101T000000-abcdef")
    assert first == {"action": "queued", "job_id": prelabel_job_id(7, "20260101T000000-abcdef"),
                     "queue": settings.heads_queue}
    assert enqueue_prelabel(redis, settings, 7, "20260101T000000-abcdef")["action"] == "exists"  # never twice
    assert enqueue_prelabel(redis, settings, 7, "20260102T000000-abcdef")["action"] == "queued"
    queue = Queue(settings.heads_queue, connection=redis)
    assert queue.count == 2
    job = queue.fetch_job(first["job_id"])
    assert job.func_name == JOB_FUNC and job.args == (7, str(tmp_path))


def test_cli_prints_the_order_and_says_when_there_is_none(tmp_path, capsys) -> None:
    import json

    from ml_backend.cli import main

    assert main(["queue", "--project", "7", "--model-dir", str(tmp_path)]) == 2
    assert "no labeling order yet" in capsys.readouterr().err
    expected = _queue(ProjectPaths(tmp_path, 7))
    assert main(["queue", "--project", "7", "--model-dir", str(tmp_path), "--limit", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [t["task"] for t in printed["tasks"]] == expected[:2] and printed["project"] == 7
