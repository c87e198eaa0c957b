"""The labeling loop before the first model, end to end: a real Label Studio and ``taxomoco serve``.

Connecting the model (Label Studio's ``/setup``) starts the project's first job: with no label it embeds the images
and writes the coverage order and the "label next" tab; from the first label on, label propagation serves
predictions of a ``propagation-...`` version (written into Label Studio, pinned, older ones cleaned up, and
``/predict``); at ``MIN_LABELS_TO_TRAIN`` labels a model version replaces them. The project is small (120 colour
images, below ``PRETRAIN_MIN_IMAGES``: no pretraining, the initial encoder with random weights). The images are plain
noisy colours, whose kNN graph that encoder gets right (95-97 % of the 10 nearest neighbours share the colour; with
an inverted square on each image as in ``tests/test_prelabel.py`` it falls to 52-60 %, plain pixels 83 %), so the
propagated paths can be checked. The first-job scheduling itself is also checked on the RQ queue (real
redis-server) with its deterministic job id.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

from ml_backend.http.app import create_app
from ml_backend.labelstudio import predictions as ls_predictions
from ml_backend.labelstudio import tabs as ls_tabs
from ml_backend.labelstudio.client import LabelStudioClient
from ml_backend.prelabel.order import LABEL_NEXT_TAB
from ml_backend.prelabel.writer import OUR_VERSION
from ml_backend.queue.factory import make_scheduler
from ml_backend.serving.store import ModelStore
from ml_backend.settings import Settings
from ml_backend.training.propagation import PROPAGATION_VERSION
from ml_backend.training.records import JobOutcome, JobRecords
from tests.servers import (
    WARM_COLD_COLOURS,
    WARM_COLD_CONFIG,
    BackendServer,
    FakeLabelStudio,
    LabelStudioServer,
    wait_until,
)
from tests.test_prelabel import _result

AUTH = ("ls-cold", "cold-pass-1234")
E2E = pytest.mark.e2e
pytestmark = pytest.mark.timeout(900)
LEAVES = list(WARM_COLD_COLOURS)
TIMEOUT_S = 400


@dataclass
class Project:
    """The backend, the Label Studio project connected to it, and what the tests learned on the way."""

    ls: LabelStudioServer
    backend: BackendServer
    pid: int
    ids: list[int]
    truth: dict[int, tuple[str, str]]
    ml_id: int = 0
    labelled: list[int] = field(default_factory=list)
    seen: dict[str, Any] = field(default_factory=dict)

    @property
    def http(self) -> requests.Session:
        session = requests.Session()
        session.auth = AUTH
        return session

    def client(self) -> LabelStudioClient:
        return LabelStudioClient(self.ls.url, self.ls.admin.token)

    def shown_version(self) -> str:
        """The model version Label Studio shows for the connection (it calls /setup to read it)."""
        return str(self.ls.api("GET", f"/api/ml/{self.ml_id}").json().get("model_version") or "")

    def label(self, task: int) -> None:
        self.ls.annotate(task, _result(self.truth[task]))
        self.labelled.append(task)
        self.http.post(f"{self.backend.url}/train", json={"project": self.pid}, timeout=10).raise_for_status()

    def settle(self, accept: Callable[[str, dict], bool], what: str) -> tuple[str, dict]:
        """Wait until nothing waits or runs, the version Label Studio shows passes ``accept`` and, when it is a served
        version, its bulk pre-annotation is done; returns the version and the job status."""
        def done() -> bool:
            status = self.backend.job_status(self.pid)
            self.seen["status"] = status
            if status.get("queued") or status.get("running"):
                return False
            version = self.seen["version"] = self.shown_version()
            prelabel = status.get("prelabel") or {}
            written = version == "untrained" or (prelabel.get("version") == version and prelabel.get("state") == "done")
            return written and accept(version, status)

        assert wait_until(done, TIMEOUT_S, interval_s=2.0), (
            f"{what}: version {self.seen.get('version')!r}, status {self.seen.get('status')}\n"
            f"{self.backend.log()[-5000:]}")
        return self.seen["version"], self.seen["status"]

    def unlabelled(self) -> list[int]:
        return [t for t in self.ids if t not in self.labelled]

    def queue(self) -> dict:
        answer = self.http.get(f"{self.backend.url}/queue", params={"project": self.pid, "limit": 1000}, timeout=10)
        assert answer.status_code == 200, answer.text
        return answer.json()

    def stored(self) -> dict[int, list[dict]]:
        """Every task's predictions as Label Studio holds them."""
        return {t.id: t.predictions for t in self.client().iter_tasks(self.pid)}


def _png(rgb: tuple[int, int, int], seed: int) -> bytes:
    """A 24 px image of one colour with pixel noise."""
    noise = np.random.default_rng(seed).normal(0, 25, (24, 24, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.array(rgb)[None, None, :] + noise, 0, 255).astype("uint8")).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def project(label_studio: LabelStudioServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    env = {"PRETRAIN_MIN_IMAGES": "500", "MIN_LABELS_TO_TRAIN": "4", "LABEL_NEXT_TAB_TASKS": "20",
           "WEBHOOK_REQUIRE_AUTH": "false"}
    backend = BackendServer(tmp_path_factory.mktemp("cold-start-backend"), env=env, auth=AUTH)
    backend.start()
    try:
        pid = label_studio.create_project(WARM_COLD_CONFIG, title="taxomoco cold start")
        leaves = [LEAVES[i % 3] for i in range(120)]
        files = {f"c{i:03d}.png": _png(WARM_COLD_COLOURS[leaf], seed=100 + i) for i, leaf in enumerate(leaves)}
        ids = label_studio.import_images(pid, files)
        yield Project(label_studio, backend, pid, ids, dict(zip(ids, leaves)))
    finally:
        backend.stop()


def _first_of(project: Project, leaf: tuple[str, str]) -> int:
    return next(t for t in project.unlabelled() if project.truth[t] == leaf)


def _predicted(prediction: dict) -> tuple[str, ...] | None:
    items = prediction.get("result") or []
    if not items:
        return None
    assert len(items) == 1 and items[0]["type"] == "taxonomy", items
    paths = items[0]["value"]["taxonomy"]
    assert len(paths) == 1, paths  # maxUsages="1"
    return tuple(paths[0])


def _check_propagated(project: Project, version: str, unreached: int, before: str | None = None
                      ) -> dict[int, tuple[str, ...]]:
    """Every unlabelled task holds exactly one prediction of ``version`` (beside one of the version ``before`` it,
    which the keep policy leaves): a consistent leaf path, or an empty one for the ``unreached`` tasks no label
    reached; the project is pinned to it. Returns the predicted paths."""
    client = project.client()
    assert ls_predictions.project_model_version(client, project.pid) == version
    stored = project.stored()
    paths: dict[int, tuple[str, ...]] = {}
    for task in project.unlabelled():
        versions = [p["model_version"] for p in stored[task]]
        assert sorted(versions) == sorted([version] + ([before] if before else [])), (task, stored[task])
        mine = next(p for p in stored[task] if p["model_version"] == version)
        path = _predicted(mine)
        if path is None:
            assert mine["score"] == 0
            continue
        assert path in WARM_COLD_COLOURS, path  # leafsOnly: a full path of the taxonomy
        assert path[:1] in {("Warm",), ("Cold",)}  # each level's choice is the parent of the next
        assert 0 < mine["score"] <= 1
        paths[task] = path
    assert len(project.unlabelled()) - len(paths) == unreached
    for task in project.labelled:  # a labelled task gets none (it keeps one written before it was labelled)
        assert version not in [p["model_version"] for p in stored[task]], stored[task]
    return paths


@E2E
def test_connecting_a_project_without_labels_writes_the_coverage_order_and_the_label_next_tab(project: Project) -> None:
    ml = project.ls.connect_backend(project.pid, project.backend.url, auth=AUTH)
    project.ml_id = int(ml["id"])
    version, status = project.settle(lambda v, s: s.get("last_outcome") == "skipped", "the first job after /setup")
    assert version == "untrained"
    skip = status["last_skip"]
    assert skip["reason"].startswith("need 4 more labels")
    result = skip["result"]
    cold = result["cold_start"]
    assert cold["done"] and cold["propagation"]["version"] is None  # no label: nothing to spread
    assert result["counts"]["images"] == result["counts"]["embedded"] == 120
    assert cold["pretrain"]["pretrain"] is False and "PRETRAIN_MIN_IMAGES" in cold["pretrain"]["reason"]
    assert {"images", "encoder", "embed", "neighbors", "order"} <= set(result["durations_s"])
    assert cold["neighbors"]["indexed"] == 120 and cold["order"]["tasks"] == 120
    queue = project.queue()
    assert queue["cold_start"] is True and queue["labelled"] == 0 and queue["version"] is None
    assert sorted(t["task"] for t in queue["tasks"]) == sorted(project.ids)  # every task once
    reasons = [t["reason"] for t in queue["tasks"]]
    assert reasons[0] == "coverage" and reasons.count("coverage") == cold["order"]["coverage"] > 0
    assert reasons == sorted(reasons, key=lambda r: r != "coverage")  # coverage picks head the order
    client = project.client()
    tabs = ls_tabs.list_tabs(client, project.pid)
    assert tabs[0]["data"]["title"] == "Default"  # Label Studio's own tab stays the default one
    ours = next(t for t in tabs if t["data"]["title"] == LABEL_NEXT_TAB)
    assert int(ours["id"]) == cold["order"]["tab"]
    shown = ls_tabs.tab_task_ids(client, project.pid, int(ours["id"]))
    assert sorted(shown) == sorted(t["task"] for t in queue["tasks"][:20])  # the head of the order
    project.seen["first_queue"], project.seen["encoder"] = queue, cold["encoder"]
    print(f"\nconnected: Label Studio shows {version!r}; queue {len(queue['tasks'])} tasks "
          f"({reasons.count('coverage')} coverage); tab {LABEL_NEXT_TAB!r} shows {len(shown)}; steps "
          f"{result['durations_s']}")


@E2E
def test_a_second_run_with_nothing_new_is_cheap(project: Project) -> None:
    before = project.backend.job_status(project.pid)["counts"]["skipped"]
    project.http.post(f"{project.backend.url}/train", json={"project": project.pid}, timeout=10).raise_for_status()
    _, status = project.settle(lambda v, s: s["counts"]["skipped"] > before, "the second cold-start run")
    result = status["last_skip"]["result"]
    assert "encoder" not in result["durations_s"] and "pretrain" not in result["durations_s"]  # the start encoder
    assert result["cold_start"]["neighbors"]["added"] == 0  # the index has every image already
    assert result["cold_start"]["encoder"] == project.seen["encoder"]
    assert project.queue()["tasks"] == project.seen["first_queue"]["tasks"]  # same embeddings, same order
    print(f"second run, nothing new: steps {result['durations_s']}")


@E2E
def test_the_first_label_gives_every_task_a_propagated_prediction(project: Project) -> None:
    project.label(_first_of(project, ("Warm", "Red")))
    version, status = project.settle(lambda v, s: v.startswith("propagation-1-"), "propagation from 1 label")
    assert PROPAGATION_VERSION.match(version)
    propagation = status["last_skip"]["result"]["cold_start"]["propagation"]
    assert propagation["version"] == version and propagation["labels"] == 1
    assert propagation["tasks"] + propagation["unreached"] == 120
    paths = _check_propagated(project, version, propagation["unreached"])
    assert set(paths.values()) == {("Warm", "Red")}  # one label: every task it reaches gets it
    reds = [t for t in project.unlabelled() if project.truth[t] == ("Warm", "Red")]
    assert all(t in paths for t in reds)  # at least the images like the labelled one
    project.seen["versions"] = [version]
    project.seen["reached"] = [len(paths)]
    print(f"1 label: Label Studio shows {version}, pinned; model versions "
          f"{ls_predictions.model_version_counts(project.client(), project.pid)}; {len(paths)} suggestions")


@E2E
def test_predict_answers_the_propagated_prediction_label_studio_holds(project: Project) -> None:
    version = project.seen["versions"][-1]
    stored = project.stored()
    tasks = [project.ls.task(t) for t in project.unlabelled() if _predicted(stored[t][0]) is not None][:3]
    answer = project.http.post(f"{project.backend.url}/predict", timeout=60, json={
        "tasks": tasks, "project": f"{project.pid}.1", "label_config": WARM_COLD_CONFIG}).json()
    assert answer["model_version"] == version and len(answer["results"]) == 3
    for task, item in zip(tasks, answer["results"]):
        mine = stored[task["id"]][0]
        assert item["model_version"] == version and item["result"] == mine["result"], (item, mine)
        assert item["score"] == pytest.approx(mine["score"])
    unknown = project.http.post(f"{project.backend.url}/predict", timeout=60, json={
        "tasks": [{"id": 10**9, "data": {"image": "/data/upload/none.png"}}], "project": project.pid,
        "label_config": WARM_COLD_CONFIG}).json()
    assert unknown["results"] == [{"result": [], "score": 0.0, "model_version": version}]  # not in the graph


@E2E
def test_more_labels_make_new_propagation_versions_that_rank_the_order_and_replace_the_old_ones(project: Project) -> None:
    project.label(_first_of(project, ("Cold", "Blue")))
    second, status = project.settle(lambda v, s: v.startswith("propagation-2-"), "propagation from 2 labels")
    paths = _check_propagated(project, second, status["last_skip"]["result"]["cold_start"]["propagation"]["unreached"],
                              before=project.seen["versions"][0])
    known = [t for t in paths if project.truth[t] in (("Warm", "Red"), ("Cold", "Blue"))]
    right = sum(paths[t] == project.truth[t] for t in known)
    assert right >= 0.8 * len(known), f"{right}/{len(known)} red and blue tasks propagated right"
    print(f"2 labels: Label Studio shows {second}, pinned; model versions "
          f"{ls_predictions.model_version_counts(project.client(), project.pid)}; red and blue right {right}/{len(known)}")
    project.label(_first_of(project, ("Warm", "Orange")))
    third, status = project.settle(lambda v, s: v.startswith("propagation-3-"), "propagation from 3 labels")
    paths = _check_propagated(project, third, status["last_skip"]["result"]["cold_start"]["propagation"]["unreached"],
                              before=second)
    counts = ls_predictions.model_version_counts(project.client(), project.pid)
    first = project.seen["versions"][0]
    assert first not in counts and counts.get(second) == 118  # PRELABEL_KEEP_VERSIONS=2: the one before stays
    assert counts.get(third) == 117 and status["prelabel"]["deleted"] == {first: 119}
    leaf_right = sum(paths[t] == project.truth[t] for t in paths)
    top_right = sum(paths[t][0] == project.truth[t][0] for t in paths)
    project.seen["propagated_accuracy"] = (leaf_right, top_right, len(paths))
    assert top_right >= 0.8 * len(paths), f"level 1 right on {top_right}/{len(paths)}"
    queue = project.queue()
    assert queue["version"] == third and queue["labelled"] == 3
    reasons = [t["reason"] for t in queue["tasks"]]
    rank = {"coverage": 0, "uncertain": 1, "unranked": 2}  # unranked: tasks no label reached
    assert "uncertain" in reasons and reasons == sorted(reasons, key=rank.__getitem__)
    uncertain = [t for t in queue["tasks"] if t["reason"] == "uncertain"]  # after the 100 coverage picks
    assert [t["score"] for t in uncertain] == sorted((t["score"] for t in uncertain), reverse=True)
    stored = project.stored()
    for entry in uncertain:  # least confidence of the propagated path: 1 - the score Label Studio shows
        mine = next(p for p in stored[entry["task"]] if p["model_version"] == third)
        assert entry["score"] == pytest.approx(1 - mine["score"], abs=1e-5)
    project.seen["versions"] += [second, third]
    print(f"3 labels: Label Studio shows {third}, pinned; model versions {counts}; leaf right {leaf_right}/"
          f"{len(paths)}, level 1 right {top_right}/{len(paths)}; queue {reasons.count('coverage')} coverage + "
          f"{len(uncertain)} uncertain")


@E2E
def test_at_min_labels_a_model_version_replaces_label_propagation(project: Project) -> None:
    project.label(_first_of(project, ("Cold", "Blue")))
    version, status = project.settle(lambda v, s: OUR_VERSION.match(v) is not None, "the first model version")
    assert status["last_outcome"] == "succeeded" and status["last_success"]["version"] == version
    counts = ls_predictions.model_version_counts(project.client(), project.pid)
    assert not [v for v in counts if v.startswith("propagation-")], counts  # every propagation version cleaned
    assert counts[version] == 116 and all(OUR_VERSION.match(v) for v in counts), counts  # the webhook's and
    # POST /train's runs may both publish: the one before stays (PRELABEL_KEEP_VERSIONS=2)
    stored = project.stored()
    for task in project.unlabelled():
        versions = [p["model_version"] for p in stored[task]]
        assert versions.count(version) == 1 and not [v for v in versions if v.startswith("propagation-")], versions
    assert ls_predictions.project_model_version(project.client(), project.pid) == version
    task = project.ls.task(project.unlabelled()[0])
    answer = project.http.post(f"{project.backend.url}/predict", timeout=60, json={
        "tasks": [task], "project": project.pid, "label_config": WARM_COLD_CONFIG}).json()
    assert answer["model_version"] == version and _predicted(answer["results"][0]) in WARM_COLD_COLOURS
    assert project.shown_version() == version
    print(f"4 labels: Label Studio shows {version}, pinned; model versions {counts}")


# ---- the first job of a connected project, through both schedulers ----------------------------------------------

def _app(settings: Settings):
    scheduler = make_scheduler(settings, job_func="tests.test_app.sleeping_job")
    store = ModelStore(settings)
    return create_app(settings, scheduler=scheduler, store=store), scheduler, store


@pytest.fixture
def fake_ls() -> Iterator[FakeLabelStudio]:
    server = FakeLabelStudio({7: WARM_COLD_CONFIG, 8: WARM_COLD_CONFIG})
    try:
        yield server
    finally:
        server.close()


def _setup(client, fake_ls: FakeLabelStudio, pid: int) -> None:
    body = {"project": f"{pid}.1712345678", "schema": WARM_COLD_CONFIG, "hostname": fake_ls.url, "access_token": "tok123"}
    answer = client.post("/setup", json=body)
    assert answer.status_code == 200 and answer.get_json() == {"model_version": "untrained"}, answer.get_json()


@pytest.mark.redis
def test_the_first_setup_queues_one_job_with_the_deterministic_id_on_rq(redis_url: str, tmp_path, fake_ls) -> None:
    from rq.job import Job

    settings = Settings(model_dir=tmp_path, redis_url=redis_url, allow_private_setup_hosts=True)
    JobRecords(settings.project(8)).mark_finished(JobOutcome.SKIPPED, 1.0, "old", reason="need 4 more labels")
    app, scheduler, store = _app(settings)
    try:
        client = app.test_client()
        for _ in range(3):  # Label Studio calls /setup before every prediction batch
            _setup(client, fake_ls, 7)
        _setup(client, fake_ls, 8)  # a project that had a job before: nothing to start
        app.extensions["taxomoco"]["first_job"].wait()
        job = Job.fetch("taxomoco-train-7", connection=scheduler.redis)
        assert job.meta["reason"] == "SETUP" and job.args == (7, str(tmp_path), False)
        status = scheduler.status(7)
        assert status["queued"] and status["counts"]["scheduled"] == 1 and status["queued_reason"] == "SETUP"
        assert not scheduler.status(8)["queued"] and scheduler.status(8)["counts"]["scheduled"] == 0
        # another server process (a new app on the same MODEL_DIR) sees the record: no second job
        other, other_scheduler, other_store = _app(settings)
        try:
            _setup(other.test_client(), fake_ls, 7)
            other.extensions["taxomoco"]["first_job"].wait()
            assert other_scheduler.status(7)["counts"]["scheduled"] == 1
        finally:
            other_scheduler.close()
            other_store.close()
    finally:
        scheduler.close()
        store.close()


def test_the_first_setup_runs_one_job_in_the_embedded_trainer(tmp_path, fake_ls) -> None:
    settings = Settings(model_dir=tmp_path, allow_private_setup_hosts=True)
    app, scheduler, store = _app(settings)
    try:
        client = app.test_client()
        _setup(client, fake_ls, 7)
        _setup(client, fake_ls, 7)
        app.extensions["taxomoco"]["first_job"].wait()
        assert scheduler.wait_idle(120)
        assert scheduler.health()["runs"] == 1
        record = JobRecords(settings.project(7)).read()
        assert record["counts"]["scheduled"] == 1 and record["counts"]["started"] == 0  # sleeping_job records nothing
    finally:
        scheduler.close()
        store.close()


# ---- propagation versions on disk (no Label Studio: a kNN index and labels made here) ---------------------------

def test_propagation_versions_are_stable_for_the_same_inputs_and_the_kept_graph_grows_with_the_index(tmp_path) -> None:
    from types import SimpleNamespace

    from ml_backend.labelstudio.label_config import parse_label_config
    from ml_backend.training.images import ProjectImages
    from ml_backend.training.propagation import live_propagation, propagate_labels, read_propagated, version_stamp
    from ml_backend.training.pull import ProjectSource
    from model.neighbors.index import NeighborIndex, load_index

    rng = np.random.default_rng(0)
    emb = np.concatenate([c + rng.normal(0, 0.3, (20, 6)) for c in np.eye(6)[:3] * 5]).astype(np.float32)  # (60, 6)
    hashes = [f"{i:064x}" for i in range(60)]
    tasks = list(range(100, 160))  # task 100 + i shows image i; images 0-19 red, 20-39 orange, 40-59 blue
    settings = Settings(model_dir=tmp_path)
    paths = settings.project(1)
    NeighborIndex.build(hashes[:45], emb[:45], "enc").save(paths.neighbor_index("enc"))
    source = ProjectSource(None, None, parse_label_config(WARM_COLD_CONFIG), [])  # type: ignore[arg-type]

    def run(labels: dict[int, tuple[str, str]], n_images: int = 45) -> dict[str, Any]:
        images = ProjectImages(tasks[:n_images], hashes[:n_images], [], {})
        return propagate_labels(settings, paths, source, SimpleNamespace(result=SimpleNamespace(labels=labels)),
                                images, "enc")

    first = run({100: ("Warm", "Red")})
    assert first["new"] and PROPAGATION_VERSION.match(first["version"]) and first["version"].startswith("propagation-1-")
    assert first["tasks"] + first["unreached"] == 45 and first["tasks"] >= 20
    again = run({100: ("Warm", "Red")})
    assert again["version"] == first["version"] and not again["new"]  # nothing new: the same version
    second = run({100: ("Warm", "Red"), 120: ("Warm", "Orange")})
    assert second["new"] and version_stamp(second["version"]) > version_stamp(first["version"])
    # more images: a new version; the kept graph is extended by the new rows, and equals a full pass
    index = load_index(paths.neighbor_index("enc"))
    index.add(hashes[45:], emb[45:])
    index.save(paths.neighbor_index("enc"))
    third = run({100: ("Warm", "Red"), 120: ("Warm", "Orange"), 140: ("Cold", "Blue")}, n_images=60)
    with np.load(paths.propagation / "knn-enc.npz") as kept:
        full = load_index(paths.neighbor_index("enc")).knn(int(kept["k"]))
        assert int(kept["rows"]) == 60 and kept["similarities"] == pytest.approx(full.similarities, abs=1e-6)
    propagated = read_propagated(paths)
    assert propagated is not None and propagated.version == third["version"] == live_propagation(paths)
    colour = {0: ("Warm", "Red"), 1: ("Warm", "Orange"), 2: ("Cold", "Blue")}
    assert all(propagated.paths[propagated.tasks[t][0]] == colour[(t - 100) // 20] for t in tasks)
    gone = run({})  # every label deleted: nothing is served any more
    assert gone["version"] is None and live_propagation(paths) is None
