"""Similar-image search and duplicates through the backend: the training step's index (build, incremental add,
duplicate groups), the store loading it with the model, the endpoints' auth and errors, and, against a real
Label Studio, the whole training job with the duplicate tabs and the "similar to task N" tab."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from ml_backend.http.app import create_app
from ml_backend.labelstudio import connections
from ml_backend.labelstudio import tabs as ls_tabs
from ml_backend.labelstudio.client import LabelStudioClient
from ml_backend.labelstudio.duplicate_tabs import CONFLICT_TAB_TITLE, DUPLICATES_TAB_TITLE
from ml_backend.labelstudio.label_config import parse_label_config
from ml_backend.labelstudio.tasks import TaskRecord
from ml_backend.paths import ProjectPaths
from ml_backend.queue.factory import make_scheduler
from ml_backend.serving.store import ModelStore
from ml_backend.settings import Settings
from ml_backend.training import jobs
from ml_backend.training import neighbors as neighbors_step
from ml_backend.training.images import ProjectImages
from ml_backend.training.neighbors import index_neighbors, read_duplicates, read_task_map
from model.bundle import load_live
from model.images import content_hash, load_image
from model.neighbors.duplicates import auto_threshold
from model.neighbors.index import load_index
from model.predictor import Predictor
from tests.test_store import publish_tiny_bundle

CONFIG = """<View><Image name="image" value="$image"/>
  <Taxonomy name="taxonomy" toName="image" leafsOnly="true" maxUsages="1">
    <Choice value="Warm"><Choice value="Red"/><Choice value="Orange"/></Choice>
    <Choice value="Cold"><Choice value="Blue"/></Choice>
  </Taxonomy></View>"""
AUTH = ("sim-user", "sim-pass-1234")
HEADERS = {"Authorization": "Basic " + base64.b64encode(f"{AUTH[0]}:{AUTH[1]}".encode()).decode()}
COLOURS = {("Warm", "Red"): (220, 30, 30), ("Warm", "Orange"): (240, 150, 20), ("Cold", "Blue"): (30, 40, 220)}


def picture(rgb: tuple[int, int, int], seed: int, size: int = 24) -> bytes:
    """A noisy colour field with a bright square (the colour says the class)."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(rgb)[None, None, :] + rng.normal(0, 25, (size, size, 3)), 0, 255).astype("uint8")
    x, y = rng.integers(0, size - 10, 2)
    arr[y:y + 8, x:x + 8] = 255 - arr[y:y + 8, x:x + 8]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_copy(png: bytes) -> bytes:
    """The same picture re-encoded as JPEG: other bytes, nearly the same pixels (a near-duplicate)."""
    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


# ----- the training step and the endpoints, on a real model bundle --------------------------------------------


class Project:
    """Project 7 under ``model_dir``: images on disk, a published tiny model, its embeddings."""

    def __init__(self, model_dir: Path) -> None:
        self.paths = ProjectPaths(model_dir, 7)
        self.config = parse_label_config(CONFIG)
        base = [picture(list(COLOURS.values())[i % 3], seed=i) for i in range(10)]
        # task 100+i holds image i; task 110 is a byte-identical copy of task 100; task 111 a JPEG copy of 101
        self.images = {100 + i: data for i, data in enumerate(base)}
        self.images[110] = base[0]
        self.images[111] = jpeg_copy(base[1])
        self.failed = {120: "HTTP 404 for /data/upload/7/gone.png"}

    def publish(self) -> str:
        return str(publish_tiny_bundle(self.paths.models, self.config.taxonomy).version)

    def source(self, task_ids: list[int]) -> SimpleNamespace:
        tasks = [TaskRecord(t, {"image": f"/data/upload/7/{t}.png"}, [], [], None) for t in task_ids + [120]]
        return SimpleNamespace(config=self.config, tasks=tasks)

    def project_images(self, task_ids: list[int]) -> ProjectImages:
        hashes = [content_hash(self.images[t]) for t in task_ids]
        return ProjectImages(task_ids, hashes, [Path("unused")] * len(task_ids), dict(self.failed))

    def embed(self, task_ids: list[int]) -> np.ndarray:
        predictor = Predictor(load_live(self.paths.models), device="cpu")
        emb, ok = predictor.embedder.embed_with_mask([load_image(self.images[t]) for t in task_ids])  # (N, D)
        assert ok.all()
        return emb

    def index(self, settings: Settings, task_ids: list[int]) -> dict[str, int]:
        bundle = load_live(self.paths.models)
        emb = self.embed(task_ids)
        return index_neighbors(settings, self.paths, self.source(task_ids), self.project_images(task_ids),  # type: ignore[arg-type]
                               bundle.manifest.encoder_version, emb, np.ones(len(task_ids), dtype=bool))


def _settings(tmp_path: Path, **over: object) -> Settings:
    return Settings(model_dir=tmp_path, basic_auth_user=AUTH[0], basic_auth_pass=AUTH[1], device="cpu",
                    label_studio_url="http://ls.example:8080", label_studio_api_key="operator-key",
                    **{"near_duplicate_threshold": 0.99, **over})  # type: ignore[arg-type]


def test_the_training_step_builds_then_adds_and_groups_duplicates(tmp_path):
    project = Project(tmp_path)
    project.publish()
    settings = _settings(tmp_path)
    first = project.index(settings, [100, 101, 102, 103, 110])
    assert first == {"indexed": 4, "added": 4, "duplicate_groups": 1, "near_pairs": 0}  # 110 shares 100's bytes
    groups = read_duplicates(project.paths)["groups"]
    assert [(g["items"], g["kind"]) for g in groups] == [([100, 110], "exact")]
    encoder = load_live(project.paths.models).manifest.encoder_version
    generation = (project.paths.neighbor_index(encoder) / "CURRENT").read_text()

    all_tasks = [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111]
    second = project.index(settings, all_tasks)
    assert second["indexed"] == 11 and second["added"] == 7  # only the new images
    assert (project.paths.neighbor_index(encoder) / "CURRENT").read_text() != generation
    groups = {tuple(g["items"]): g for g in read_duplicates(project.paths)["groups"]}
    assert groups[(100, 110)]["kind"] == "exact"
    assert groups[(101, 111)]["kind"] == "near" and groups[(101, 111)]["similarity"] >= 0.99  # the JPEG copy
    tasks, unusable = read_task_map(project.paths)
    assert set(tasks) == set(all_tasks) and tasks[111].image == "/data/upload/7/111.png"
    assert unusable == {120: "HTTP 404 for /data/upload/7/gone.png"}

    # the incremental pairs are those of a full pass
    index = load_index(project.paths.neighbor_index(encoder))
    project.paths.duplicates.unlink()
    assert project.index(settings, all_tasks)["near_pairs"] == second["near_pairs"] and len(index) == 11
    # nothing new: the index is not rewritten
    current = (project.paths.neighbor_index(encoder) / "CURRENT").read_text()
    assert project.index(settings, all_tasks)["added"] == 0
    assert (project.paths.neighbor_index(encoder) / "CURRENT").read_text() == current


def test_by_default_the_threshold_is_calibrated_for_the_encoder_and_kept_while_the_index_grows_little(
        tmp_path, monkeypatch: pytest.MonkeyPatch):
    project = Project(tmp_path)
    project.publish()
    settings = _settings(tmp_path, near_duplicate_threshold=0.0)  # the default
    assert Settings().near_duplicate_threshold == 0.0
    project.index(settings, [100, 101, 102, 103, 104, 105, 106, 107, 108, 109])
    saved = json.loads(project.paths.duplicates.read_text())
    encoder = load_live(project.paths.models).manifest.encoder_version
    index = load_index(project.paths.neighbor_index(encoder))
    assert saved["threshold_rule"] == "auto" and saved["threshold_calibrated_on"] == 10
    assert saved["threshold"] == auto_threshold(index).value < 1.0
    # 10 images: 0.5 % of 10 is none, so the quantile is the highest similarity (and at most the cap)
    assert read_duplicates(project.paths)["threshold_rule"] == "auto"
    # one image more (10 %): the threshold is kept, so the saved pairs stay valid and only the new row is searched
    project.index(settings, [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 111])
    again = json.loads(project.paths.duplicates.read_text())
    assert (again["threshold"], again["threshold_calibrated_on"]) == (saved["threshold"], 10)
    # a fixed setting wins and says so
    project.index(_settings(tmp_path), [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 111])
    fixed = json.loads(project.paths.duplicates.read_text())
    assert (fixed["threshold"], fixed["threshold_rule"], fixed["threshold_calibrated_on"]) == (0.99, "setting", 0)
    # back to automatic after the index grew by more than 20 %: calibrated again on all 13 rows
    project.images[112], project.images[113] = picture((10, 200, 10), seed=12), picture((200, 10, 200), seed=13)
    project.index(settings, [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 111, 112, 113])
    later = json.loads(project.paths.duplicates.read_text())
    assert later["threshold_rule"] == "auto" and later["threshold_calibrated_on"] == 13
    # calibrated on enough images, it is kept for the encoder however much the index grows (no full pair search)
    monkeypatch.setattr(neighbors_step, "RECALIBRATE_BELOW", 13)
    project.images[114], project.images[115] = picture((90, 90, 10), seed=14), picture((10, 90, 90), seed=15)
    project.images[116] = picture((150, 60, 60), seed=16)
    project.index(settings, [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 111, 112, 113, 114, 115, 116])
    kept = json.loads(project.paths.duplicates.read_text())
    assert (kept["threshold"], kept["threshold_calibrated_on"]) == (later["threshold"], 13)


def test_a_new_encoder_gets_a_new_index_and_unused_ones_are_removed(tmp_path):
    import shutil

    project = Project(tmp_path)
    settings = _settings(tmp_path)
    first = project.publish()
    project.index(settings, [100, 101, 102])
    old = load_live(project.paths.models).manifest.encoder_version
    publish_tiny_bundle(project.paths.models, project.config.taxonomy, seed=1)  # pretraining: another encoder
    new = load_live(project.paths.models).manifest.encoder_version
    assert new != old
    out = project.index(settings, [100, 101, 102, 103])
    assert out["indexed"] == 4 and out["added"] == 4  # built from every embedding, not added to the old one
    assert load_index(project.paths.neighbor_index(new)).encoder_version == new
    assert project.paths.neighbor_index(old).is_dir()  # a kept version still uses the old encoder
    shutil.rmtree(project.paths.models / "versions" / first)  # pruned
    project.index(settings, [100, 101, 102, 103])
    assert not project.paths.neighbor_index(old).exists() and project.paths.neighbor_index(new).is_dir()


@pytest.fixture
def served(tmp_path):
    settings = _settings(tmp_path)
    store = ModelStore(settings)
    scheduler = make_scheduler(settings, job_func="tests.test_app.sleeping_job")
    client = create_app(settings, scheduler=scheduler, store=store).test_client()
    yield SimpleNamespace(client=client, settings=settings, store=store, project=Project(tmp_path))
    scheduler.close()
    store.close()
    connections.forget_all()


def test_unauthenticated_callers_get_401(served):
    client = served.client
    assert client.get("/similar?project=7&task=100").status_code == 401
    assert client.post("/similar?project=7", data=b"\x89PNG", content_type="image/png").status_code == 401
    assert client.post("/similar/tab", json={"project": 7, "task": 100}).status_code == 401
    assert client.get("/duplicates?project=7").status_code == 401
    wrong = {"Authorization": "Basic " + base64.b64encode(b"sim-user:wrong").decode()}
    assert client.get("/similar?project=7&task=100", headers=wrong).status_code == 401


def test_errors_name_the_cause_and_the_remedy(served):
    client, project = served.client, served.project
    r = client.get("/similar?project=7&task=100", headers=HEADERS)
    assert r.status_code == 409 and "no trained model yet" in r.get_json()["error"]
    assert "Train" in r.get_json()["error"]
    r = client.get("/duplicates?project=7", headers=HEADERS)
    assert r.status_code == 404 and "computed by each training" in r.get_json()["error"]
    project.publish()  # a model from before similarity search: no index for its encoder
    r = client.get("/similar?project=7&task=100", headers=HEADERS)
    assert r.status_code == 409 and "has no similarity index" in r.get_json()["error"]
    assert "Retrain" in r.get_json()["error"]
    for bad in ("/similar?project=7", "/similar?project=7&task=abc", "/similar?project=7&task=100&k=0",
                "/similar?project=7&task=100&k=100000", "/similar?task=100", "/similar?project=x&task=1"):
        r = client.get(bad, headers=HEADERS)
        assert r.status_code == 400, (bad, r.get_json())
    assert client.post("/similar/tab", data="[1]", content_type="application/json", headers=HEADERS).status_code == 400


def _train_index(served) -> str:
    """Index the project's images, then publish a version (as the job does); wait until the store serves it."""
    project = served.project
    project.publish()
    project.index(served.settings, sorted(project.images))
    version = project.publish()
    served.store.refresh(7)
    assert served.store.get(7, wait_s=60) is not None
    for _ in range(100):
        if served.store.neighbors(7) is not None and served.store.neighbors(7).version == version:
            break
        served.store.refresh(7)
        served.store.get(7, wait_s=5)
    assert served.store.neighbors(7) is not None and served.store.neighbors(7).version == version
    return version


def test_similar_to_a_task_an_upload_and_the_duplicates(served):
    version = _train_index(served)
    client, project = served.client, served.project
    r = client.get("/similar?project=7&task=100&k=5", headers=HEADERS)
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert body["model_version"] == version and body["task"] == 100 and len(body["results"]) == 5
    first = body["results"][0]
    assert first["task"] == 110 and first["score"] == pytest.approx(1.0, abs=1e-4)  # its byte-identical copy
    assert 100 not in [row["task"] for row in body["results"]]
    scores = [row["score"] for row in body["results"]]
    assert scores == sorted(scores, reverse=True)
    assert first["image"] == "/data/upload/7/110.png"
    assert first["image_url"] == "http://ls.example:8080/data/upload/7/110.png"
    assert first["task_url"] == "http://ls.example:8080/projects/7/data?task=110"

    r = client.get("/similar?project=7&task=999", headers=HEADERS)
    assert r.status_code == 404 and "imported after the last training" in r.get_json()["error"]
    r = client.get("/similar?project=7&task=120", headers=HEADERS)
    assert r.status_code == 422 and "no usable image (HTTP 404" in r.get_json()["error"]

    # an uploaded image: raw bytes, and a multipart form
    r = client.post("/similar?project=7&k=3", data=project.images[104], content_type="image/png", headers=HEADERS)
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["results"][0]["task"] == 104 and r.get_json()["results"][0]["score"] > 0.999
    form = {"image": (io.BytesIO(project.images[105]), "query.png")}
    r = client.post("/similar?project=7&k=3", data=form, content_type="multipart/form-data", headers=HEADERS)
    assert r.status_code == 200 and r.get_json()["results"][0]["task"] == 105
    r = client.post("/similar?project=7", data=b"not an image at all", content_type="image/png", headers=HEADERS)
    assert r.status_code == 400
    assert client.post("/similar?project=7", data=b"", headers=HEADERS).status_code == 400

    r = client.get("/duplicates?project=7", headers=HEADERS)
    assert r.status_code == 200
    dup = r.get_json()
    assert dup["summary"] == {"groups": 2, "exact": 1, "near": 1, "tasks": 4} and dup["threshold"] == 0.99
    assert {tuple(g["items"]) for g in dup["groups"]} == {(100, 110), (101, 111)}


# ----- against a real Label Studio: the training job, the duplicate tabs, the "similar to" tab -----------------


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_training_indexes_the_project_and_label_studio_shows_duplicates_and_similar_tabs(label_studio, tmp_path):
    import torch

    from tests.servers import FAST_TRAINING_ENV

    torch.set_num_threads(1)
    pid = label_studio.create_project(CONFIG, title="taxomoco similarity e2e")
    names, truth = {}, []
    for i in range(12):
        path = list(COLOURS)[i % 3]
        names[f"img{i:02d}.png"] = picture(COLOURS[path], seed=i)
        truth.append(path)
    names["copy-of-img00.png"] = names["img00.png"]  # a byte-identical duplicate, labelled differently below
    ids = label_studio.import_images(pid, names)
    copy_task = ids[-1]
    for tid, path in list(zip(ids, truth))[:9]:
        label_studio.annotate(tid, [{"from_name": "taxonomy", "to_name": "image", "type": "taxonomy",
                                     "value": {"taxonomy": [list(path)]}}])
    other = ["Cold", "Blue"] if truth[0] != ("Cold", "Blue") else ["Warm", "Red"]
    label_studio.annotate(copy_task, [{"from_name": "taxonomy", "to_name": "image", "type": "taxonomy",
                                       "value": {"taxonomy": [other]}}])

    env = {k: v for k, v in FAST_TRAINING_ENV.items() if k != "OMP_NUM_THREADS"}
    settings = Settings.from_env(env=env, model_dir=tmp_path, label_studio_url=label_studio.url,
                                 label_studio_api_key=label_studio.admin.token, basic_auth_user=AUTH[0],
                                 basic_auth_pass=AUTH[1])
    jobs.use_settings(settings)
    try:
        result = jobs.train_project(pid, str(tmp_path))
    finally:
        jobs.use_settings(None)
    assert result["status"] == "succeeded", result
    assert result["counts"]["indexed"] == 12 and result["counts"]["duplicate_groups"] >= 1  # 13 tasks, 12 images

    # the disagreement report and Label Studio's tabs name the duplicates whose labels disagree
    paths = ProjectPaths(tmp_path, pid)
    report = json.loads(paths.disagreement_report.read_text())
    conflicting = [g["items"] for g in report["duplicates"]["conflicting"]]
    assert sorted([ids[0], copy_task]) in conflicting, report["duplicates"]
    client = LabelStudioClient(label_studio.url, label_studio.admin.token)
    tabs = {t["data"]["title"]: t for t in ls_tabs.list_tabs(client, pid)}
    assert {DUPLICATES_TAB_TITLE, CONFLICT_TAB_TITLE} <= set(tabs)
    assert {ids[0], copy_task} <= set(ls_tabs.tab_task_ids(client, pid, int(tabs[CONFLICT_TAB_TITLE]["id"])))
    assert {ids[0], copy_task} <= set(ls_tabs.tab_task_ids(client, pid, int(tabs[DUPLICATES_TAB_TITLE]["id"])))

    # the served backend: GET /similar, then POST /similar/tab makes a tab Label Studio filters to the neighbours
    store = ModelStore(settings)
    scheduler = make_scheduler(settings, job_func="tests.test_app.sleeping_job")
    try:
        app = create_app(settings, scheduler=scheduler, store=store).test_client()
        r = app.get(f"/similar?project={pid}&task={ids[0]}&k=4", headers=HEADERS)
        assert r.status_code == 200, r.get_json()
        results = r.get_json()["results"]
        assert results[0]["task"] == copy_task and results[0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert results[0]["image_url"].startswith(f"{label_studio.url}/data/upload/")
        r = app.post("/similar/tab", json={"project": pid, "task": ids[0], "k": 4}, headers=HEADERS)
        assert r.status_code == 200, r.get_json()
        made = r.get_json()
        expected = {ids[0]} | {row["task"] for row in results}
        assert set(made["tasks"]) == expected and made["title"] == f"taxomoco: similar to task {ids[0]}"
        assert set(ls_tabs.tab_task_ids(client, pid, made["tab"])) == expected  # Label Studio's own filtering
        tab = {t["id"]: t for t in ls_tabs.list_tabs(client, pid)}[made["tab"]]
        hidden = tab["data"]["hiddenColumns"]
        assert "tasks:data.image" not in hidden["explore"] and "tasks:data.image" not in hidden["labeling"]
        default = {t["data"]["title"]: t for t in ls_tabs.list_tabs(client, pid)}["Default"]["data"]["hiddenColumns"]
        for column in ("tasks:annotations_results", "tasks:predictions_results"):  # hidden by Label Studio's default
            assert column in default["explore"] and column not in hidden["explore"], (column, hidden)
        assert made["url"] == f"{label_studio.url}/projects/{pid}/data?tab={made['tab']}"
        # asking again updates the same tab
        again = app.post("/similar/tab", json={"project": pid, "task": ids[0], "k": 2}, headers=HEADERS).get_json()
        assert again["tab"] == made["tab"]
        assert set(ls_tabs.tab_task_ids(client, pid, made["tab"])) == set(again["tasks"]) and len(again["tasks"]) == 3
    finally:
        scheduler.close()
        store.close()
        client.close()
        connections.forget_all()


# ----- the command line ------------------------------------------------------------------------------------------


def test_cli_similar_tasks_of_a_project(tmp_path, capsys):
    from ml_backend.cli import main

    assert main(["similar", "--project", "7", "--task", "100", "--model-dir", str(tmp_path)]) == 2
    assert "no trained model yet" in capsys.readouterr().err
    project = Project(tmp_path)
    project.publish()
    project.index(_settings(tmp_path), sorted(project.images))
    assert main(["similar", "--project", "7", "--task", "100", "--k", "3", "--model-dir", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["task"] == 100 and [r["task"] for r in out["results"]][0] == 110 and len(out["results"]) == 3
    assert main(["similar", "--project", "7", "--task", "120", "--model-dir", str(tmp_path)]) == 2
    assert "no usable image" in capsys.readouterr().err


def test_cli_similar_images_in_folders(tmp_path, capsys):
    from ml_backend.cli import main

    labelled = tmp_path / "labelled"
    for path, rgb in COLOURS.items():
        d = labelled.joinpath(*path)
        d.mkdir(parents=True)
        for i in range(4):
            (d / f"{i}.png").write_bytes(picture(rgb, seed=10 * i + len(path[1])))
    models = tmp_path / "models"
    fast = ["--arch", "resnet18-half", "--input-size", "32", "--device", "cpu"]
    assert main(["train", str(labelled), "--models", str(models), *fast]) == 0
    capsys.readouterr()
    query = labelled / "Cold" / "Blue" / "0.png"
    assert main(["similar", str(query), "--models", str(models), "--k", "3", "--device", "cpu"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(row["similar"]) == 3 and str(query.resolve()) not in [s["path"] for s in row["similar"]]
    # a folder with a copy of the query: indexed on the way, the copy comes first
    other = tmp_path / "other"
    other.mkdir()
    (other / "copy.png").write_bytes(query.read_bytes())
    assert main(["similar", str(query), "--models", str(models), "--among", str(other), "--device", "cpu"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["similar"][0]["path"] == str((other / "copy.png").resolve()) and row["similar"][0]["score"] > 0.999
    assert main(["similar", "--models", str(models)]) == 2
    assert "pass --project ID --task TID, or image files" in capsys.readouterr().err
