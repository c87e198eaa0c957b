"""The HTTP contract of the app with Flask's test client, a real embedded scheduler and a small model of
this file (images -> paths by colour) loaded by the real ModelStore from a LIVE pointer file."""

from __future__ import annotations

import base64
import io
import json
import os
import stat
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ml_backend.http.app import create_app
from ml_backend.labelstudio import connections
from ml_backend.labelstudio.label_config import parse_label_config
from ml_backend.paths import ProjectPaths
from ml_backend.queue.factory import make_scheduler
from ml_backend.serving.store import ModelStore
from ml_backend.settings import Settings
from ml_backend.training.records import JobOutcome, JobRecords
from model.images import load_image
from tests.servers import FakeLabelStudio, wait_until

CHOICES = """<View><Image name="img" value="$url"/><Choices name="kind" toName="img">
      <Choice value="Cat"/><Choice value="Plant"/></Choices></View>"""
CONFIG = """<View><Image name="image" value="$image"/>
  <Taxonomy name="taxonomy" toName="image" leafsOnly="true">
    <Choice value="Animal"><Choice value="Cat"/><Choice value="Dog"/></Choice>
    <Choice value="Plant"/>
  </Taxonomy></View>"""
TAXONOMY = parse_label_config(CONFIG).taxonomy


def sleeping_job(project_id: int, model_dir: str, force_pretrain: bool = False) -> dict:
    """A training job (signature of ml_backend.training.jobs.train_project) that only takes its time."""
    time.sleep(3.0)
    return {"version": None}


@dataclass
class Pred:
    path: tuple
    score: float


class ColourModel:
    """Predicts Animal/Cat for reddish images, Plant for greenish ones, Animal/Dog otherwise; like the real
    Predictor it remembers what it saw by content hash (its "embedding cache") and predicts a cached hash
    without the image."""

    def __init__(self, version: str, taxonomy=TAXONOMY):
        self.version, self.taxonomy = version, taxonomy
        self.calls: list[int] = []
        self.decoded_inputs: list[int] = []  # per call: how many images came decoded
        self.seen: dict[str, Pred] = {}

    def cached(self, hashes):
        return np.array([h in self.seen for h in hashes], dtype=bool)

    def predict_encoded(self, items, leafs_only=True, prefix_threshold=0.5, max_pixels=50_000_000,
                        batch_pixels=200_000_000):
        images, hashes, errors = [], [], {}
        for i, item in enumerate(items):
            if item is None:
                images.append(None)
                hashes.append(None)
                continue
            data, h = item
            hashes.append(h)
            if h in self.seen:
                images.append(None)
                continue
            try:
                images.append(load_image(data, max_pixels))
            except Exception as exc:
                images.append(None)
                errors[i] = str(exc)
        return self.predict(images, hashes, leafs_only, prefix_threshold), errors

    def predict(self, images, hashes, leafs_only=True, prefix_threshold=0.5):
        self.calls.append(len(images))
        self.decoded_inputs.append(sum(im is not None for im in images))
        out = []
        for im, h in zip(images, hashes):
            if im is None:
                out.append(self.seen.get(h) if h else None)
                continue
            assert h and len(h) == 64
            r, g, b = np.asarray(im, dtype=np.float32).reshape(-1, 3).mean(0)
            path = ("Animal", "Cat") if r > g and r > b else ("Plant",) if g > r else ("Animal", "Dog")
            out.append(Pred(path, 0.8))
            self.seen[h] = out[-1]
        return out


class Models:
    """LIVE pointer files plus a loader that builds ColourModels (optionally slowly)."""

    def __init__(self, root: Path):
        self.root, self.delay = root, 0.0
        self.built: list[ColourModel] = []

    def publish(self, pid: int, version: str) -> None:
        d = ProjectPaths(self.root, pid).models / "versions" / version
        d.mkdir(parents=True, exist_ok=True)
        (d / "manifest.json").write_text("{}")
        (d.parent.parent / ".LIVE.tmp").write_text(version)  # switched atomically, as model.bundle.publish does
        os.replace(d.parent.parent / ".LIVE.tmp", d.parent.parent / "LIVE")

    def probe(self, pid: int):
        p = ProjectPaths(self.root, pid).models / "LIVE"
        return p.read_text() if p.exists() else None

    def load(self, pid: int):
        version = self.probe(pid)
        time.sleep(self.delay)
        model = ColourModel(version)
        self.built.append(model)
        return model


def png(color, size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


class _Pixel(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        body = png((250, 10, 10), (1, 1)) if self.path == "/red.png" else b"nope"
        self.send_response(200 if self.path == "/red.png" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def http_images():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Pixel)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def fake_ls():
    """A stand-in Label Studio on loopback that holds projects 7, 8, 9 and 11 (the backend verifies /setup there)."""
    server = FakeLabelStudio({7: CONFIG, 8: CHOICES, 9: CONFIG, 11: CONFIG})
    yield server
    server.close()


@pytest.fixture
def env(tmp_path, fake_ls):
    images = tmp_path / "images"
    images.mkdir()
    (images / "red.png").write_bytes(png((250, 10, 10)))
    (images / "green.png").write_bytes(png((10, 250, 10)))
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    settings = Settings(
        model_dir=tmp_path / "data",
        local_files_root=images,
        allowed_image_hosts=("127.0.0.1",),
        allow_private_image_hosts=True,
        allow_private_setup_hosts=True,
        image_timeout_s=2.0,
        basic_auth_user="ls",
        basic_auth_pass="pw",
        webhook_requires_auth=False,  # Label Studio's own webhook sends no header
    )
    global FAKE_LS_URL
    FAKE_LS_URL = fake_ls.url
    models = Models(settings.model_dir)
    store = ModelStore(settings, loader=models.load, probe=models.probe, check_interval_s=0.05)
    scheduler = make_scheduler(settings, job_func="tests.test_app.sleeping_job")
    app = create_app(settings, scheduler=scheduler, store=store)
    yield app.test_client(), models, settings, scheduler
    scheduler.close()
    store.close()


AUTH = {"Authorization": "Basic " + base64.b64encode(b"ls:pw").decode()}


def post(client, path, body, **kw):
    """POST JSON as Label Studio does with the model connection's Basic auth (``headers={}`` to send none)."""
    kw.setdefault("headers", AUTH)
    return client.post(path, data=json.dumps(body), content_type="application/json", **kw)


FAKE_LS_URL = "http://127.0.0.1:1"


def setup_body(pid=7, schema=CONFIG):
    return {"project": f"{pid}.1712345678", "schema": schema, "hostname": FAKE_LS_URL, "access_token": "tok123"}


def connect(client, pid=7, schema=CONFIG):
    """What Label Studio does before predictions: /setup, which the backend verifies and pins."""
    r = post(client, "/setup", setup_body(pid, schema))
    assert r.status_code == 200, r.get_json()
    return r


def test_health_is_liveness_only_without_authentication(env):
    client = env[0]
    r = client.get("/health")
    assert r.status_code == 200
    assert r.get_json() == {"status": "UP", "model_class": "taxomoco"}  # no project list, no versions


def test_setup_reports_untrained_then_live_version_and_remembers_connection(env):
    client, models, settings, _ = env
    r = connect(client)
    assert r.get_json() == {"model_version": "untrained"}
    conn_file = settings.project(7).connection
    stored = json.loads(conn_file.read_text())
    assert (stored["url"], stored["api_key"]) == (FAKE_LS_URL, "tok123") and stored["verified_at"]
    assert stat.S_IMODE(conn_file.stat().st_mode) == 0o600
    models.publish(7, "v1")
    time.sleep(0.1)
    assert post(client, "/setup", setup_body()).get_json() == {"model_version": "v1"}


def test_before_a_model_setup_and_predict_serve_the_live_propagation_version(env):
    from ml_backend.training.propagation import Propagated, save_propagated

    client, models, settings, _ = env
    connect(client)
    version = "propagation-2-20260101T000000-abcdef"
    save_propagated(settings.project(7), Propagated(version, 2, "enc", "abcdef" * 10, True, "2026-01-01T00:00:00",
                                                    [("Animal", "Cat"), ("Plant",)], {11: (0, 0.75, 0.75),
                                                                                     12: (1, 0.6, 0.6)}))
    assert wait_until(lambda: post(client, "/setup", setup_body()).get_json() == {"model_version": version}, 5)
    tasks = [{"id": 11, "data": {"image": "red.png"}}, {"id": 13, "data": {"image": "red.png"}},
             {"id": 12, "data": {"image": "green.png"}}]
    body = post(client, "/predict", {"tasks": tasks, "project": "7.1712345678", "label_config": CONFIG}).get_json()
    assert body["model_version"] == version and len(body["results"]) == 3  # one item per task, in order
    first, missing, plant = body["results"]
    assert first["result"][0]["value"]["taxonomy"] == [["Animal", "Cat"]] and first["score"] == 0.75
    assert missing == {"result": [], "score": 0.0, "model_version": version}  # a task the version does not hold
    assert plant["result"][0]["value"]["taxonomy"] == [["Plant"]] and plant["model_version"] == version
    models.publish(7, "v1")  # the heads trained: the model takes over
    assert wait_until(lambda: post(client, "/setup", setup_body()).get_json() == {"model_version": "v1"}, 5)
    body = post(client, "/predict", {"tasks": tasks[:1], "project": 7, "label_config": CONFIG}).get_json()
    assert body["model_version"] == "v1"


def test_setup_rejects_unservable_config_and_bad_bodies(env):
    client = env[0]
    bad = CONFIG.replace('toName="image"', 'toName="picture"')
    r = post(client, "/setup", setup_body(schema=bad))
    assert r.status_code == 400 and 'toName="picture"' in r.get_json()["error"]
    assert 'toName="picture"' in r.status  # Label Studio shows the reason phrase only
    r = post(client, "/setup", {"schema": CONFIG})
    assert r.status_code == 400 and "project id" in r.get_json()["error"]
    r = client.post("/setup", data="{not json", content_type="application/json", headers=AUTH)
    assert r.status_code == 400 and "not valid JSON" in r.get_json()["error"]


def predict_body(tasks, pid=7, label_config=CONFIG):
    body = {"tasks": tasks, "project": f"{pid}.1712345678", "params": {}}
    if label_config is not None:
        body["label_config"] = label_config
    return body


def test_predict_before_training_gives_no_predictions(env):
    client = env[0]
    connect(client)
    r = post(client, "/predict", predict_body([{"id": 1, "data": {"image": "red.png"}}]))
    assert r.status_code == 200 and r.get_json()["results"] == []


def test_predict_one_item_per_task_in_order_with_bad_images(env, http_images, caplog):
    client, models, *_ = env
    connect(client)
    models.publish(7, "v1")
    tasks = [
        {"id": 1, "data": {"image": "red.png"}},
        {"id": 2, "data": {"image": "corrupt.png"}},
        {"id": 3, "data": {"other": "x"}},
        {"id": 4, "data": {"image": "green.png"}},
        {"id": 5, "data": {"image": "missing.png"}},
        {"id": 6, "data": {"image": f"{http_images}/red.png"}},
        {"id": 7, "data": {"image": "s3://bucket/x.png"}},
        {"id": 8, "data": {"image": "data:image/png;base64," + base64.b64encode(png((10, 250, 10))).decode()}},
    ]
    with caplog.at_level("WARNING"):
        r = post(client, "/predict", predict_body(tasks))
    assert r.status_code == 200
    results = r.get_json()["results"]
    assert len(results) == len(tasks)
    assert all(item["model_version"] == "v1" for item in results)
    paths = [item["result"][0]["value"]["taxonomy"][0] if item["result"] else None for item in results]
    assert paths == [["Animal", "Cat"], None, None, ["Plant"], None, ["Animal", "Cat"], None, ["Plant"]]
    good = results[0]
    assert good["score"] == pytest.approx(0.8) and good["result"][0]["type"] == "taxonomy"
    assert good["result"][0]["from_name"] == "taxonomy" and good["result"][0]["to_name"] == "image"
    assert all(item["score"] == 0 for item in results if not item["result"])
    assert models.built[-1].calls == [8]  # one batch
    logged = caplog.text
    for task_id in (2, 3, 5, 7):
        assert f"task {task_id}: no prediction" in logged
    metrics = metric_values(client.get("/metrics", headers=AUTH).get_data(as_text=True))
    assert metrics['taxomoco_predictions_total{project="7"}'] == 4
    assert metrics['taxomoco_failed_images_total{project="7",reason="decode"}'] == 1
    assert metrics['taxomoco_failed_images_total{project="7",reason="missing"}'] == 1
    assert metrics['taxomoco_failed_images_total{project="7",reason="fetch"}'] == 2
    assert metrics['taxomoco_model_info{project="7",version="v1"}'] == 1


def test_predict_does_not_decode_images_whose_embedding_is_cached(env):
    client, models, *_ = env
    connect(client)
    models.publish(7, "v1")
    tasks = [{"id": 1, "data": {"image": "red.png"}}, {"id": 2, "data": {"image": "corrupt.png"}},
             {"id": 3, "data": {"image": "green.png"}}]
    first = post(client, "/predict", predict_body(tasks)).get_json()["results"]
    second = post(client, "/predict", predict_body(tasks)).get_json()["results"]
    assert second == first
    assert [bool(item["result"]) for item in first] == [True, False, True]
    assert models.built[-1].decoded_inputs == [2, 0]  # the second call predicted from the hashes alone


def test_version_changes_after_a_new_model_is_published(env):
    client, models, *_ = env
    connect(client)
    models.publish(7, "v1")
    task = [{"id": 1, "data": {"image": "red.png"}}]
    assert post(client, "/predict", predict_body(task)).get_json()["results"][0]["model_version"] == "v1"
    models.publish(7, "v2")
    assert wait_until(lambda: post(client, "/setup", setup_body()).get_json()["model_version"] == "v2", 10)
    assert post(client, "/predict", predict_body(task)).get_json()["results"][0]["model_version"] == "v2"
    versions = client.get("/versions?project=7", headers=AUTH).get_json()["versions"]
    assert set(versions) == {"v1", "v2"}
    assert set(client.get("/versions", headers=AUTH).get_json()["versions"]) == {"v1", "v2"}


def test_predict_uses_setup_schema_and_rejects_bad_bodies(env):
    client, models, *_ = env
    models.publish(9, "v1")
    connect(client, pid=9)
    r = post(client, "/predict", predict_body([{"id": 1, "data": {"image": "red.png"}}], pid=9, label_config=None))
    assert r.status_code == 200 and len(r.get_json()["results"]) == 1  # /setup's schema
    models.publish(7, "v1")
    connections.forget_all()
    settings = env[2]
    fresh = create_app(settings, scheduler=env[3], store=ModelStore(settings, loader=models.load, probe=models.probe))
    r = post(fresh.test_client(), "/predict", predict_body([{"id": 1, "data": {"image": "red.png"}}], label_config=None))
    assert r.status_code == 200 and r.get_json()["results"] == []  # project 7 was never verified by this backend
    connect(client)
    r = post(client, "/predict", predict_body([{"id": 1, "data": {"image": "red.png"}}], label_config=None))
    assert r.status_code == 200 and len(r.get_json()["results"]) == 1
    assert post(client, "/predict", {"project": 7}).status_code == 400
    assert post(client, "/predict", {"tasks": "x", "project": 7}).status_code == 400
    assert post(client, "/predict", {"tasks": [], "project": 7, "label_config": CONFIG}).get_json()["results"] == []


def test_predictions_outside_a_changed_config_are_left_empty(env):
    client, models, *_ = env
    connect(client)
    models.publish(7, "v1")
    changed = CONFIG.replace('<Choice value="Plant"/>', '<Choice value="Fungus"/>')
    tasks = [{"id": 1, "data": {"image": "red.png"}}, {"id": 2, "data": {"image": "green.png"}}]
    results = post(client, "/predict", predict_body(tasks, label_config=changed)).get_json()["results"]
    assert results[0]["result"][0]["value"]["taxonomy"] == [["Animal", "Cat"]]
    assert results[1]["result"] == []


def test_choices_config_gets_choices_items(env):
    client, models, settings, _ = env
    choices = CHOICES
    connect(client, pid=8, schema=choices)
    models.publish(8, "c1")
    tax = parse_label_config(choices).taxonomy
    store = ModelStore(settings, loader=lambda pid: ColourModel("c1", tax), probe=models.probe, check_interval_s=0.05)
    client = create_app(settings, scheduler=env[3], store=store).test_client()
    results = post(client, "/predict", predict_body([{"id": 1, "data": {"url": "green.png"}}], pid=8, label_config=choices))
    item = results.get_json()["results"][0]
    assert item["result"][0]["type"] == "choices" and item["result"][0]["value"] == {"choices": ["Plant"]}
    store.close()


def test_webhook_filters_events_and_schedules(env):
    client, models, _, scheduler = env
    connect(client)
    connect(client, pid=9)
    r = post(client, "/webhook", {"action": "ANNOTATION_CREATED", "project": {"id": 7}, "annotation": {"id": 1}})
    # connecting scheduled the project's first job (http/first_job), which may still wait in line
    assert r.status_code == 200 and r.get_json()["action"] in ("queued", "follow-up", "coalesced")
    r = post(client, "/webhook", {"action": "START_TRAINING", "project": {"id": 7}})
    assert r.get_json()["action"] in ("coalesced", "follow-up", "queued")
    r = post(client, "/webhook", {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 1}], "task": {"project": 9}})
    assert r.status_code == 200 and r.get_json()["project_id"] == 9
    # new tasks schedule a run only while the project has no model (its cold-start work covers them)
    r = post(client, "/webhook", {"action": "TASKS_CREATED", "project": {"id": 9}, "tasks": [{"id": 5}]})
    assert r.status_code == 200 and r.get_json()["status"] == "ok" and r.get_json()["project_id"] == 9
    models.publish(9, "v1")
    r = post(client, "/webhook", {"action": "TASKS_CREATED", "project": {"id": 9}, "tasks": [{"id": 6}]})
    assert r.get_json()["status"] == "ignored" and "model version" in r.get_json()["reason"]
    r = post(client, "/webhook", {"action": "PROJECT_UPDATED", "project": {"id": 7}})
    assert r.get_json() == {"status": "ignored", "action": "PROJECT_UPDATED"}
    assert post(client, "/webhook", {"action": "SOMETHING_NEW"}).get_json()["status"] == "ignored"
    assert post(client, "/webhook", {"no": "action"}).status_code == 400
    assert client.post("/webhook", data="garbage", content_type="application/json").status_code == 400
    r = post(client, "/webhook", {"action": "ANNOTATION_UPDATED"})
    assert r.status_code == 400 and "names no project" in r.get_json()["error"]
    r = post(client, "/webhook", {"action": "START_TRAINING", "project": {"id": 123456}})
    assert r.status_code == 200 and r.get_json()["status"] == "ignored"  # an invented project is never scheduled
    status = post(client, "/job_status", {"project": 7}).get_json()
    assert status["queued"] or status["running"]
    metrics = metric_values(client.get("/metrics", headers=AUTH).get_data(as_text=True))
    assert metrics['taxomoco_webhook_events_total{action="PROJECT_UPDATED",outcome="ignored"}'] == 1
    assert 'taxomoco_training_running{project="7"}' in metrics


def test_train_legacy_endpoint(env):
    client = env[0]
    assert post(client, "/train", {"project": 11}).status_code == 400  # not connected yet
    connect(client, pid=11)
    r = post(client, "/train", {"project": 11, "annotations": []})
    assert r.status_code == 200 and r.get_json()["project_id"] == 11
    assert post(client, "/train", {}).status_code == 400


def test_health_and_setup_fast_while_a_model_loads_and_a_training_runs(env):
    client, models, _, scheduler = env
    connect(client)
    models.delay = 3.0
    models.publish(7, "slow")
    post(client, "/webhook", {"action": "START_TRAINING", "project": {"id": 7}})
    time.sleep(0.5)  # the training child is running, the load thread sleeps
    worst = 0.0
    for _ in range(5):
        for path, body in (("/health", None), ("/setup", setup_body())):
            t0 = time.perf_counter()
            r = client.get(path, headers=AUTH) if body is None else post(client, path, body)
            worst = max(worst, time.perf_counter() - t0)
            assert r.status_code == 200
    assert worst < 0.5, worst
    assert post(client, "/setup", setup_body()).get_json()["model_version"] == "slow"
    assert scheduler.status(7)["running"] is True


def test_basic_auth(tmp_path, fake_ls):
    settings = Settings(model_dir=tmp_path, basic_auth_user="u", basic_auth_pass="p:w", allow_private_setup_hosts=True)
    models = Models(tmp_path)
    store = ModelStore(settings, loader=models.load, probe=models.probe)
    scheduler = make_scheduler(settings, job_func="tests.test_app.sleeping_job")
    client = create_app(settings, scheduler=scheduler, store=store).test_client()
    try:
        good = {"Authorization": "Basic " + base64.b64encode(b"u:p:w").decode()}
        bad = {"Authorization": "Basic " + base64.b64encode(b"u:nope").decode()}
        assert client.get("/health").get_json() == {"status": "UP", "model_class": "taxomoco"}
        assert "scheduler" in client.get("/health", headers=good).get_json()  # details for the authenticated
        body = {**setup_body(), "hostname": fake_ls.url}
        r = post(client, "/setup", body, headers={})
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Basic")
        assert post(client, "/setup", body, headers=bad).status_code == 401
        assert post(client, "/setup", body, headers={"Authorization": "Bearer x"}).status_code == 401
        assert post(client, "/setup", body, headers=good).status_code == 200
        assert client.get("/metrics").status_code == 401 and client.get("/metrics", headers=good).status_code == 200
        # with Basic auth on, /webhook requires it too (WEBHOOK_REQUIRE_AUTH defaults on): the backend registers
        # its own Label Studio webhook that sends the header
        assert settings.webhook_auth is True
        assert post(client, "/webhook", {"action": "PROJECT_UPDATED"}, headers={}).status_code == 401
        assert post(client, "/webhook", {"action": "PROJECT_UPDATED"}, headers=good).status_code == 200
    finally:
        scheduler.close()
        store.close()


def test_data_endpoints_need_configured_basic_auth(tmp_path):
    settings = Settings(model_dir=tmp_path)
    models = Models(tmp_path)
    store = ModelStore(settings, loader=models.load, probe=models.probe)
    scheduler = make_scheduler(settings, job_func="tests.test_app.sleeping_job")
    client = create_app(settings, scheduler=scheduler, store=store).test_client()
    try:
        for path in ("/disagreements?project=1", "/metrics", "/similar?project=1&task=1", "/duplicates?project=1"):
            r = client.get(path)
            assert r.status_code == 403 and "BASIC_AUTH_USER" in r.get_json()["error"], path
        assert post(client, "/job_status", {"project": 1}, headers={}).status_code == 403
        assert client.get("/health").status_code == 200 and client.get("/versions").status_code == 200
    finally:
        scheduler.close()
        store.close()


def test_unknown_route_and_method(env):
    client = env[0]
    assert client.get("/nothing").status_code == 401  # an unknown path is data: no hint without credentials
    assert client.get("/nothing", headers=AUTH).status_code == 404
    assert client.get("/predict", headers=AUTH).status_code == 405


def test_the_server_serves_the_app_and_keeps_the_reason_phrase(tmp_path, fake_ls):
    import os
    import signal
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "from pathlib import Path; from ml_backend.settings import Settings; from ml_backend.http.server import serve; "
        f"serve(Settings(host='127.0.0.1', port={port}, http_threads=4, model_dir=Path({str(tmp_path)!r}), "
        "allow_private_setup_hosts=True))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                health = json.loads(urllib.request.urlopen(f"{base}/health", timeout=1).read())
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
                time.sleep(0.2)
        assert health["status"] == "UP"
        req = urllib.request.Request(f"{base}/setup", data=json.dumps({**setup_body(), "hostname": fake_ls.url}).encode(),
                                     headers={"Content-Type": "application/json"})
        assert json.loads(urllib.request.urlopen(req, timeout=3).read()) == {"model_version": "untrained"}
        import requests

        text_config = ('<View><Text name="t" value="$t"/>'
                       '<Choices name="c" toName="t"><Choice value="a"/><Choice value="b"/></Choices></View>')
        bad = requests.post(f"{base}/setup", json={**setup_body(), "schema": text_config}, timeout=3)
        assert bad.status_code == 400 and "<Image>" in bad.reason and "<Image>" in bad.json()["error"]
        with pytest.raises(requests.HTTPError, match="no <Image> tag"):
            bad.raise_for_status()  # what Label Studio shows the user
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        out = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 0, out


def test_connection_resolution_and_the_setup_trust_model(tmp_path, fake_ls):
    from model.errors import ConfigError

    plain = Settings(model_dir=tmp_path, allow_private_setup_hosts=True)
    with pytest.raises(ConfigError, match="LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY"):
        connections.resolve(plain, 7)

    def setup(settings, pid=7, hostname=fake_ls.url, token="tok123", authenticated=False):
        return connections.accept_setup(settings, connections.SetupRequest(pid, hostname, token, CONFIG, authenticated))

    assert setup(plain, hostname=fake_ls.url + "/") == connections.LSConnection(fake_ls.url, "tok123", trusted=True)
    asked = len(fake_ls.saw("/api/projects/7/"))
    setup(plain)  # unchanged: no second verification
    assert len(fake_ls.saw("/api/projects/7/")) == asked
    connections.forget_all()  # another process: reads the file
    assert connections.resolve(plain, 7).api_key == "tok123"
    assert "tok123" not in repr(connections.resolve(plain, 7))
    with pytest.raises(ConfigError, match="no project 12345"):
        setup(plain, pid=12345)
    with pytest.raises(ConfigError, match="HTTP 401"):
        setup(plain, token="wrong-token")  # a token may rotate only after it is verified
    assert connections.resolve(plain, 7).api_key == "tok123"
    both = Settings(model_dir=tmp_path, label_studio_url="http://other/", label_studio_api_key="k")
    assert connections.resolve(both, 7) == connections.LSConnection("http://other", "k")
    with pytest.raises(ConfigError, match="LABEL_STUDIO_API_KEY is set without LABEL_STUDIO_URL"):
        Settings.from_env(env={"LABEL_STUDIO_API_KEY": "k"})


def metric_values(text: str) -> dict[str, float]:
    """Prometheus exposition text -> ``{'name{label="v",...}': value}`` (labels as written)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def test_metrics_exposition_format():
    from ml_backend.http.metrics import ProjectCollector, Registry

    class Store:
        def projects(self):
            return [1]

        def status(self, pid):
            return {"served_version": 'v"1\n', "loads": 2}

    class Scheduler:
        def status(self, pid):
            return {"counts": {"succeeded": 3}, "running": True, "last_success": {"finished_at": "2026-01-01T00:00:00+00:00",
                                                                                   "duration_s": 4.5}}

    reg = Registry()
    for v in (0.003, 0.02, 0.02, 7.0):
        reg.latency.labels("/predict").observe(v)
    reg.requests.labels("/predict", "POST", "200").inc(3)
    reg.add_collector(ProjectCollector(Store(), Scheduler(), lambda: [1]))
    text = reg.render().decode()
    values = metric_values(text)
    assert values['taxomoco_http_request_duration_seconds_bucket{endpoint="/predict",le="0.005"}'] == 1
    assert values['taxomoco_http_request_duration_seconds_bucket{endpoint="/predict",le="0.025"}'] == 3
    assert values['taxomoco_http_request_duration_seconds_bucket{endpoint="/predict",le="+Inf"}'] == 4
    assert values['taxomoco_http_request_duration_seconds_count{endpoint="/predict"}'] == 4
    assert values['taxomoco_http_requests_total{endpoint="/predict",method="POST",status="200"}'] == 3
    assert '# TYPE taxomoco_model_info gauge' in text and "# TYPE taxomoco_training_jobs_total counter" in text
    assert values['taxomoco_model_info{project="1",version="v\\"1\\n"}'] == 1
    assert values['taxomoco_model_loads_total{project="1"}'] == 2
    assert values['taxomoco_training_jobs_total{event="succeeded",project="1"}'] == 3
    assert values['taxomoco_training_running{project="1"}'] == 1
    assert values['taxomoco_training_last_success_duration_seconds{project="1"}'] == 4.5
    assert values['taxomoco_training_last_success_timestamp_seconds{project="1"}'] == 1767225600


_MULTIPROCESS_CHILD = """
import sys
from pathlib import Path
from ml_backend.http.metrics import Registry
reg = Registry(Path(sys.argv[1]))
if sys.argv[2] == "count":
    reg.webhooks.labels("START_TRAINING", "scheduled").inc()
    reg.latency.labels("/webhook").observe(0.01)
else:
    sys.stdout.write(reg.render().decode())
"""


def test_metrics_in_multiprocess_mode_sum_every_process(tmp_path):
    """PROMETHEUS_MULTIPROC_DIR: counters of several server processes are summed by a scrape of any of them."""
    import subprocess
    import sys

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}

    def child(mode: str) -> str:
        return subprocess.run([sys.executable, "-c", _MULTIPROCESS_CHILD, str(tmp_path), mode], env=env, check=True,
                              capture_output=True, text=True, timeout=120).stdout

    for _ in range(3):
        child("count")
    values = metric_values(child("render"))
    assert values['taxomoco_webhook_events_total{action="START_TRAINING",outcome="scheduled"}'] == 3
    assert values['taxomoco_http_request_duration_seconds_count{endpoint="/webhook"}'] == 3
    from ml_backend.http.metrics import Registry
    from model.errors import ConfigError

    with pytest.raises(ConfigError, match="PROMETHEUS_MULTIPROC_DIR"):
        Registry(tmp_path / "missing")


class _HangingScheduler:
    kind = "hanging"

    def health(self):
        time.sleep(5)
        return {"ok": True}

    def schedule(self, project_id, reason, force_pretrain=False):
        return {"project_id": project_id, "scheduler": self.kind, "action": "error", "reason": "redis down"}

    def status(self, project_id):
        return {}

    def close(self):
        pass


def test_health_answers_fast_when_the_scheduler_hangs_and_webhook_stays_2xx(tmp_path):
    settings = Settings(model_dir=tmp_path, basic_auth_user="ls", basic_auth_pass="pw", webhook_requires_auth=False)
    connections.accept_setup(settings, connections.SetupRequest(1, "http://ls.example", "t", None, False),
                             verify=lambda *_: None)  # project 1 is connected
    models = Models(tmp_path)
    store = ModelStore(settings, loader=models.load, probe=models.probe)
    client = create_app(settings, scheduler=_HangingScheduler(), store=store).test_client()
    try:
        for _ in range(3):
            t0 = time.perf_counter()
            body = client.get("/health", headers=AUTH).get_json()
            assert time.perf_counter() - t0 < 3.0  # the scheduler's 5 s hang is not waited for
            assert body["status"] == "UP" and body["scheduler"]["ok"] is False
        r = post(client, "/webhook", {"action": "START_TRAINING", "project": {"id": 1}})
        assert r.status_code == 200 and r.get_json()["status"] == "error"
    finally:
        store.close()


@pytest.mark.e2e
def test_predict_fetches_label_studio_uploads_with_the_setup_token(label_studio, tmp_path):
    """A real Label Studio: uploaded images (/data/upload/...) are fetched with the token /setup sent."""
    pid = label_studio.create_project(CONFIG, title="taxomoco app e2e")
    task_ids = label_studio.import_images(pid, {"red.png": png((250, 10, 10)), "green.png": png((10, 250, 10))})
    tasks = [label_studio.task(t) for t in task_ids]
    assert all(t["data"]["image"].startswith("/data/upload/") for t in tasks)
    settings = Settings(model_dir=tmp_path, allow_private_setup_hosts=True)
    models = Models(tmp_path)
    store = ModelStore(settings, loader=models.load, probe=models.probe, check_interval_s=0.05)
    scheduler = make_scheduler(settings, job_func="tests.test_app.sleeping_job")
    client = create_app(settings, scheduler=scheduler, store=store).test_client()
    try:
        body = {"project": f"{pid}.1712345678", "schema": CONFIG, "hostname": label_studio.url,
                "access_token": label_studio.admin.token}
        assert post(client, "/setup", body).get_json() == {"model_version": "untrained"}
        models.publish(pid, "e2e-1")
        r = post(client, "/predict", predict_body(tasks, pid=pid))
        results = r.get_json()["results"]
        assert [item["result"][0]["value"]["taxonomy"] for item in results] == [[["Animal", "Cat"]], [["Plant"]]]
        assert {item["model_version"] for item in results} == {"e2e-1"}
        # a wrong token is refused at /setup (verified against Label Studio), the pinned one stays in use
        refused = post(client, "/setup", {**body, "access_token": "wrong-token-123"})
        assert refused.status_code == 400 and "HTTP 401" in refused.get_json()["error"]
        results = post(client, "/predict", predict_body(tasks, pid=pid)).get_json()["results"]
        assert [item["result"][0]["value"]["taxonomy"] for item in results] == [[["Animal", "Cat"]], [["Plant"]]]
    finally:
        scheduler.close()
        store.close()


def test_every_path_has_one_access_class():
    from ml_backend.http.auth import Access, access_of

    assert access_of("/health") is Access.OPEN and access_of("/") is Access.OPEN
    assert access_of("/predict") is Access.PROTOCOL and access_of("/setup") is Access.PROTOCOL
    assert access_of("/webhook") is Access.WEBHOOK
    for path in ("/disagreements", "/metrics", "/job_status", "/similar", "/anything-new"):
        assert access_of(path) is Access.DATA


def test_a_failed_training_shows_in_the_version_health_and_versions_until_one_succeeds(env):
    """Label Studio shows /setup's model version: after a failed training it carries the short reason (the
    predictions carry the same string, so Label Studio re-predicts once); /health and /versions give the state."""
    client, models, settings, _ = env
    connect(client)
    records = JobRecords(settings.project(7))
    reason = ("none of the 3 tasks' images could be fetched (first error: The host http://img.example is not "
              "allowed (http://img.example/a.png); images may come from Label Studio's own origin ...)")
    records.mark_started("job-1")
    records.mark_finished(JobOutcome.FAILED, 1.0, "job-1", reason=reason)
    time.sleep(1.1)  # past the states' cache age
    version = post(client, "/setup", setup_body()).get_json()["model_version"]
    assert version.startswith("untrained · last training failed: none of the 3 tasks' images could be fetched")
    assert "is not allowed" in version and len(version) < 220
    assert post(client, "/predict", predict_body([{"id": 1, "data": {"image": "red.png"}}])).get_json() == {
        "results": [], "model_version": version}
    health = client.get("/health", headers=AUTH).get_json()
    assert health["training"]["7"]["outcome"] == "failed" and health["training"]["7"]["reason"] == reason
    versions = client.get("/versions", query_string={"project": 7}, headers=AUTH).get_json()
    assert versions["versions"] == [] and versions["training"]["reason"] == reason

    models.publish(7, "v1")  # a live model (an earlier one) serves on; its predictions carry the label too
    time.sleep(0.1)
    labelled = post(client, "/setup", setup_body()).get_json()["model_version"]
    assert labelled.startswith("v1 · last training failed: ")
    r = post(client, "/predict", predict_body([{"id": 1, "data": {"image": "red.png"}}])).get_json()
    assert r["model_version"] == labelled and r["results"][0]["model_version"] == labelled

    records.mark_started("job-2")
    records.mark_finished(JobOutcome.SUCCEEDED, 1.0, "job-2", version="v1")
    time.sleep(1.1)
    assert post(client, "/setup", setup_body()).get_json() == {"model_version": "v1"}
    assert client.get("/health", headers=AUTH).get_json()["training"]["7"]["outcome"] == "succeeded"
