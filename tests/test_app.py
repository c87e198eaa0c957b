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
from ml_backend.labelstudio.label_config import parse_label_config
from ml_backend.paths import ProjectPaths
from ml_backend.queue.factory import make_scheduler
from ml_backend.serving.store import ModelStore
from ml_backend.settings import Settings

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

    def predict(self, images, hashes, leafs_only=True, prefix_threshold=0.5):
        self.calls.append(len(images))
        self.decoded_inputs.append(sum(im is not None for im in images))
        out = []
        for im, h in zip(images, hashes):
            if im is None:
                out.append(self.seen.get(h))
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


@pytest.fixture
def env(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "red.png").write_bytes(png((250, 10, 10)))
    (images / "green.png").write_bytes(png((10, 250, 10)))
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    settings = Settings(
        model_dir=tmp_path / "data",
        local_files_root=images,
        allowed_image_hosts=("127.0.0.1",),
        image_timeout_s=2.0,
    )
    models = Models(settings.model_dir)
    store = ModelStore(settings, loader=models.load, probe=models.probe, check_interval_s=0.05)
    scheduler = make_scheduler(settings, job_func="tests.test_app.sleeping_job")
    app = create_app(settings, scheduler=scheduler, store=store)
    yield app.test_client(), models, settings, scheduler
    scheduler.close()
    store.close()


def post(client, path, body, **kw):
    return client.post(path, data=json.dumps(body), content_type="application/json", **kw)


def setup_body(pid=7, schema=CONFIG):
    return {"project": f"{pid}.1712345678", "schema": schema, "hostname": "http://127.0.0.1:1", "access_token": "tok123"}


def test_health(env):
    client = env[0]
    t0 = time.perf_counter()
    r = client.get("/health")
    assert time.perf_counter() - t0 < 1.0
    assert r.status_code == 200
    body = r.get_json()
    assert body["status"] == "UP" and body["model_class"] == "taxomoco"
    assert body["scheduler"]["ok"] is True and body["scheduler"]["scheduler"] == "embedded"


def test_setup_reports_untrained_then_live_version_and_remembers_connection(env):
    client, models, settings, _ = env
    r = post(client, "/setup", setup_body())
    assert r.status_code == 200 and r.get_json() == {"model_version": "untrained"}
    conn_file = settings.project(7).connection
    assert json.loads(conn_file.read_text()) == {"url": "http://127.0.0.1:1", "api_key": "tok123"}
    assert stat.S_IMODE(conn_file.stat().st_mode) == 0o600
    models.publish(7, "v1")
    time.sleep(0.1)
    assert post(client, "/setup", setup_body()).get_json() == {"model_version": "v1"}


def test_setup_rejects_unservable_config_and_bad_bodies(env):
    client = env[0]
    bad = CONFIG.replace('toName="image"', 'toName="picture"')
    r = post(client, "/setup", setup_body(schema=bad))
    assert r.status_code == 400 and 'toName="picture"' in r.get_json()["error"]
    assert 'toName="picture"' in r.status  # Label Studio shows the reason phrase only
    r = post(client, "/setup", {"schema": CONFIG})
    assert r.status_code == 400 and "project id" in r.get_json()["error"]
    r = client.post("/setup", data="{not json", content_type="application/json")
    assert r.status_code == 400 and "JSON object" in r.get_json()["error"]


def predict_body(tasks, pid=7, label_config=CONFIG):
    body = {"tasks": tasks, "project": f"{pid}.1712345678", "params": {}}
    if label_config is not None:
        body["label_config"] = label_config
    return body


def test_predict_before_training_gives_no_predictions(env):
    client = env[0]
    r = post(client, "/predict", predict_body([{"id": 1, "data": {"image": "red.png"}}]))
    assert r.status_code == 200 and r.get_json()["results"] == []


def test_predict_one_item_per_task_in_order_with_bad_images(env, http_images, caplog):
    client, models, *_ = env
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
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'taxomoco_predictions_total{project="7"} 4' in metrics
    assert 'taxomoco_failed_images_total{project="7",reason="decode"} 1' in metrics
    assert 'taxomoco_failed_images_total{project="7",reason="missing"} 1' in metrics
    assert 'taxomoco_failed_images_total{project="7",reason="fetch"} 2' in metrics
    assert 'taxomoco_model_info{project="7",version="v1"} 1' in metrics


def test_predict_does_not_decode_images_whose_embedding_is_cached(env):
    client, models, *_ = env
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
    models.publish(7, "v1")
    task = [{"id": 1, "data": {"image": "red.png"}}]
    assert post(client, "/predict", predict_body(task)).get_json()["results"][0]["model_version"] == "v1"
    models.publish(7, "v2")
    deadline = time.monotonic() + 5
    while post(client, "/setup", setup_body()).get_json()["model_version"] != "v2" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert post(client, "/setup", setup_body()).get_json()["model_version"] == "v2"
    assert post(client, "/predict", predict_body(task)).get_json()["results"][0]["model_version"] == "v2"
    versions = client.get("/versions?project=7").get_json()["versions"]
    assert set(versions) == {"v1", "v2"}
    assert set(client.get("/versions").get_json()["versions"]) == {"v1", "v2"}


def test_predict_uses_setup_schema_and_rejects_bad_bodies(env):
    client, models, *_ = env
    models.publish(7, "v1")
    r = post(client, "/predict", predict_body([{"id": 1, "data": {"image": "red.png"}}], label_config=None))
    assert r.status_code == 400 and "/setup" in r.get_json()["error"]
    post(client, "/setup", setup_body())
    r = post(client, "/predict", predict_body([{"id": 1, "data": {"image": "red.png"}}], label_config=None))
    assert r.status_code == 200 and len(r.get_json()["results"]) == 1
    assert post(client, "/predict", {"project": 7}).status_code == 400
    assert post(client, "/predict", {"tasks": "x", "project": 7}).status_code == 400
    assert post(client, "/predict", {"tasks": [], "project": 7, "label_config": CONFIG}).get_json()["results"] == []


def test_predictions_outside_a_changed_config_are_left_empty(env):
    client, models, *_ = env
    models.publish(7, "v1")
    changed = CONFIG.replace('<Choice value="Plant"/>', '<Choice value="Fungus"/>')
    tasks = [{"id": 1, "data": {"image": "red.png"}}, {"id": 2, "data": {"image": "green.png"}}]
    results = post(client, "/predict", predict_body(tasks, label_config=changed)).get_json()["results"]
    assert results[0]["result"][0]["value"]["taxonomy"] == [["Animal", "Cat"]]
    assert results[1]["result"] == []


def test_choices_config_gets_choices_items(env):
    client, models, settings, _ = env
    choices = """<View><Image name="img" value="$url"/><Choices name="kind" toName="img">
      <Choice value="Cat"/><Choice value="Plant"/></Choices></View>"""
    models.publish(8, "c1")
    tax = parse_label_config(choices).taxonomy
    store = ModelStore(settings, loader=lambda pid: ColourModel("c1", tax), probe=models.probe, check_interval_s=0.05)
    client = create_app(settings, scheduler=env[3], store=store).test_client()
    results = post(client, "/predict", predict_body([{"id": 1, "data": {"url": "green.png"}}], pid=8, label_config=choices))
    item = results.get_json()["results"][0]
    assert item["result"][0]["type"] == "choices" and item["result"][0]["value"] == {"choices": ["Plant"]}
    store.close()


def test_webhook_filters_events_and_schedules(env):
    client, _, _, scheduler = env
    t0 = time.perf_counter()
    r = post(client, "/webhook", {"action": "ANNOTATION_CREATED", "project": {"id": 7}, "annotation": {"id": 1}})
    assert r.status_code == 200 and r.get_json()["action"] in ("queued", "follow-up")
    r = post(client, "/webhook", {"action": "START_TRAINING", "project": {"id": 7}})
    assert r.get_json()["action"] in ("coalesced", "follow-up", "queued")
    r = post(client, "/webhook", {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 1}], "task": {"project": 9}})
    assert r.status_code == 200 and r.get_json()["project_id"] == 9
    r = post(client, "/webhook", {"action": "PROJECT_UPDATED", "project": {"id": 7}})
    assert r.get_json() == {"status": "ignored", "action": "PROJECT_UPDATED"}
    assert post(client, "/webhook", {"action": "SOMETHING_NEW"}).get_json()["status"] == "ignored"
    assert post(client, "/webhook", {"no": "action"}).status_code == 400
    assert client.post("/webhook", data="garbage", content_type="application/json").status_code == 400
    r = post(client, "/webhook", {"action": "ANNOTATION_UPDATED"})
    assert r.status_code == 400 and "names no project" in r.get_json()["error"]
    assert time.perf_counter() - t0 < 5.0  # ten answers; a webhook that trained inline would take far longer
    status = post(client, "/job_status", {"project": 7}).get_json()
    assert status["queued"] or status["running"]
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'taxomoco_webhook_events_total{action="PROJECT_UPDATED",outcome="ignored"} 1' in metrics
    assert 'taxomoco_training_running{project="7"}' in metrics


def test_train_legacy_endpoint(env):
    client = env[0]
    r = post(client, "/train", {"project": 11, "annotations": []})
    assert r.status_code == 200 and r.get_json()["project_id"] == 11
    assert post(client, "/train", {}).status_code == 400


def test_health_and_setup_fast_while_a_model_loads_and_a_training_runs(env):
    client, models, _, scheduler = env
    models.delay = 3.0
    models.publish(7, "slow")
    post(client, "/webhook", {"action": "START_TRAINING", "project": {"id": 7}})
    time.sleep(0.5)  # the training child is running, the load thread sleeps
    worst = 0.0
    for _ in range(5):
        for path, body in (("/health", None), ("/setup", setup_body())):
            t0 = time.perf_counter()
            r = client.get(path) if body is None else post(client, path, body)
            worst = max(worst, time.perf_counter() - t0)
            assert r.status_code == 200
    assert worst < 0.5, worst
    assert post(client, "/setup", setup_body()).get_json()["model_version"] == "slow"
    assert scheduler.status(7)["running"] is True


def test_basic_auth(tmp_path):
    settings = Settings(model_dir=tmp_path, basic_auth_user="u", basic_auth_pass="p:w")
    models = Models(tmp_path)
    store = ModelStore(settings, loader=models.load, probe=models.probe)
    scheduler = make_scheduler(settings, job_func="tests.test_app.sleeping_job")
    client = create_app(settings, scheduler=scheduler, store=store).test_client()
    try:
        good = {"Authorization": "Basic " + base64.b64encode(b"u:p:w").decode()}
        bad = {"Authorization": "Basic " + base64.b64encode(b"u:nope").decode()}
        assert client.get("/health").status_code == 200
        r = post(client, "/setup", setup_body())
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Basic")
        assert post(client, "/setup", setup_body(), headers=bad).status_code == 401
        assert post(client, "/setup", setup_body(), headers={"Authorization": "Bearer x"}).status_code == 401
        assert post(client, "/setup", setup_body(), headers=good).status_code == 200
        assert client.get("/metrics").status_code == 401 and client.get("/metrics", headers=good).status_code == 200
        assert post(client, "/webhook", {"action": "PROJECT_UPDATED"}).status_code == 200  # LS's webhook has no auth
    finally:
        scheduler.close()
        store.close()


def test_unknown_route_and_method(env):
    client = env[0]
    assert client.get("/nothing").status_code == 404
    assert client.get("/predict").status_code == 405


def test_gunicorn_server_serves_the_app(tmp_path):
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
        f"serve(Settings(host='127.0.0.1', port={port}, http_threads=4, model_dir=Path({str(tmp_path)!r})))"
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
        req = urllib.request.Request(f"{base}/setup", data=json.dumps(setup_body()).encode(), headers={"Content-Type": "application/json"})
        assert json.loads(urllib.request.urlopen(req, timeout=3).read()) == {"model_version": "untrained"}
        import requests

        text_config = '<View><Text name="t" value="$t"/><Choices name="c" toName="t"><Choice value="a"/><Choice value="b"/></Choices></View>'
        bad = requests.post(f"{base}/setup", json={**setup_body(), "schema": text_config}, timeout=3)
        assert bad.status_code == 400 and "<Image>" in bad.reason and "<Image>" in bad.json()["error"]
        with pytest.raises(requests.HTTPError, match="no <Image> tag"):
            bad.raise_for_status()  # what Label Studio shows the user
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        out = proc.communicate(timeout=30)[0].decode()
    assert "gthread" in out and proc.returncode == 0, out


def test_connection_resolution_prefers_settings_field_by_field(tmp_path):
    from ml_backend.labelstudio import connections
    from model.errors import ConfigError

    plain = Settings(model_dir=tmp_path)
    with pytest.raises(ConfigError, match="LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY"):
        connections.resolve(plain, 3)
    assert connections.remember(plain, 3, "http://ls:8080/", "t1") is True
    assert connections.remember(plain, 3, "http://ls:8080", "t1") is False  # unchanged: no write
    assert connections.remember(plain, 3, None, "t1") is False
    assert connections.resolve(plain, 3) == connections.LSConnection("http://ls:8080", "t1")
    connections.forget_all()  # another process: reads the file
    assert connections.resolve(plain, 3).api_key == "t1"
    assert "t1" not in repr(connections.resolve(plain, 3))
    both = Settings(model_dir=tmp_path, label_studio_url="http://other/", label_studio_api_key="k")
    assert connections.resolve(both, 3) == connections.LSConnection("http://other", "k")
    url_only = Settings(model_dir=tmp_path, label_studio_url="http://other")
    assert connections.resolve(url_only, 3) == connections.LSConnection("http://other", "t1")
    with pytest.raises(ConfigError, match="LABEL_STUDIO_API_KEY"):
        connections.resolve(url_only, 4)


def test_metrics_exposition_format():
    from ml_backend.http.metrics import Registry, Sample

    reg = Registry()
    for v in (0.003, 0.02, 0.02, 7.0):
        reg.latency.observe(v, "/predict")
    reg.requests.inc("/predict", "POST", "200", amount=3)
    reg.add_collector(lambda: [Sample("taxomoco_model_info", {"project": "1", "version": 'v"1\n'}, 1)])
    text = reg.render()
    assert 'taxomoco_http_request_duration_seconds_bucket{endpoint="/predict",le="0.005"} 1' in text
    assert 'taxomoco_http_request_duration_seconds_bucket{endpoint="/predict",le="0.025"} 3' in text
    assert 'taxomoco_http_request_duration_seconds_bucket{endpoint="/predict",le="+Inf"} 4' in text
    assert 'taxomoco_http_request_duration_seconds_count{endpoint="/predict"} 4' in text
    assert 'taxomoco_http_requests_total{endpoint="/predict",method="POST",status="200"} 3' in text
    assert '# TYPE taxomoco_model_info gauge' in text
    assert 'taxomoco_model_info{project="1",version="v\\"1\\n"} 1' in text


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
    settings = Settings(model_dir=tmp_path)
    models = Models(tmp_path)
    store = ModelStore(settings, loader=models.load, probe=models.probe)
    client = create_app(settings, scheduler=_HangingScheduler(), store=store).test_client()
    try:
        for _ in range(3):
            t0 = time.perf_counter()
            body = client.get("/health").get_json()
            assert time.perf_counter() - t0 < 0.6
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
    settings = Settings(model_dir=tmp_path)
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
        # a wrong token: the images are refused by Label Studio, every task still gets its (empty) item
        connections_file = settings.project(pid).connection
        connections_file.unlink()
        from ml_backend.labelstudio import connections

        connections.forget_all()
        post(client, "/setup", {**body, "access_token": "wrong-token-123"})
        results = post(client, "/predict", predict_body(tasks, pid=pid)).get_json()["results"]
        assert len(results) == 2 and all(item["result"] == [] for item in results)
    finally:
        scheduler.close()
        store.close()


def test_which_paths_need_auth():
    from ml_backend.http.auth import needs_auth

    assert not needs_auth("/predict", None, False)
    assert needs_auth("/predict", "u", False) and needs_auth("/metrics", "u", False)
    assert not needs_auth("/health", "u", True) and not needs_auth("/webhook", "u", False)
    assert needs_auth("/webhook", "u", True)
