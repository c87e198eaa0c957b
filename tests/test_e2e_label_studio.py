"""End to end: a real Label Studio server and our real backend (``taxomoco serve``) talking to each other.

Label Studio calls the backend the way it does for users: ``/health`` + ``/setup`` when the model is
connected and before every prediction batch, ``/predict`` for the "Retrieve predictions" action and when a
task is opened, ``/webhook`` on every annotation. Training runs in the backend's embedded scheduler with
settings that take seconds (:data:`tests.servers.FAST_TRAINING_ENV`). Images are synthetic (colour =
level 1, stripe direction = level 2), rendered here.
"""

from __future__ import annotations

import base64
import io
import json
import random
import time
from collections.abc import Iterator

import pytest
import requests
from PIL import Image

from ml_backend.labelstudio import tabs as ls_tabs
from ml_backend.labelstudio.client import LabelStudioClient
from tests.servers import TWO_LEVEL_CONFIG, BackendServer, LabelStudioServer, free_port, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

CONFIG = TWO_LEVEL_CONFIG
LEAVES = {("Animal", "Cat"), ("Animal", "Dog"), ("Plant", "Tree"), ("Plant", "Flower")}
TRAINING_TIMEOUT_S = 300


def render(path: tuple[str, str], seed: int, size: int = 32) -> bytes:
    """A PNG whose colour says the level-1 class and whose stripes say the level-2 class."""
    rng = random.Random(seed)
    base = (200 + rng.randint(-30, 30), 40 + rng.randint(-20, 20), 40) if path[0] == "Animal" else \
        (40, 200 + rng.randint(-30, 30), 40 + rng.randint(-20, 20))
    dark = tuple(c // 3 for c in base)
    img = Image.new("RGB", (size, size), base)
    px = img.load()
    horizontal = path[1] in ("Cat", "Tree")
    for y in range(size):
        for x in range(size):
            if ((y if horizontal else x) // 4) % 2 == 0:
                px[x, y] = dark
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def png(size: tuple[int, int], color: tuple[int, int, int] = (90, 90, 90)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def result(path: tuple[str, ...]) -> list[dict]:
    return [{"from_name": "taxonomy", "to_name": "image", "type": "taxonomy", "value": {"taxonomy": [list(path)]}}]


def predicted_path(prediction: dict) -> tuple[str, ...] | None:
    items = prediction.get("result") or []
    if not items:
        return None
    assert len(items) == 1 and items[0]["type"] == "taxonomy", items
    assert (items[0]["from_name"], items[0]["to_name"]) == ("taxonomy", "image")
    paths = items[0]["value"]["taxonomy"]
    assert len(paths) == 1, paths  # maxUsages="1"
    return tuple(paths[0])


AUTH = ("ls-e2e", "e2e-pass-1234")
"""The backend's Basic auth (the recommended deployment), set in Label Studio's model connection too."""
LS_AUTH = {"auth_method": "BASIC_AUTH", "basic_auth_user": AUTH[0], "basic_auth_pass": AUTH[1]}


class Stack:
    """Label Studio + backend + one connected project with labelled, unlabelled and broken image tasks."""

    def __init__(self, ls: LabelStudioServer, backend: BackendServer) -> None:
        self.ls, self.backend = ls, backend
        self.http = requests.Session()  # what an operator's scripts and Label Studio send: Basic auth
        self.http.auth = AUTH
        self.pid = ls.create_project(CONFIG, title="taxomoco e2e")
        self.truth: dict[int, tuple[str, str]] = {}
        images, paths = {}, []
        leaves = sorted(LEAVES)
        for i in range(16):
            path = leaves[i % 4]
            images[f"good{i:02d}.png"] = render(path, seed=i)
            paths.append(path)
        ids = ls.import_images(self.pid, images)
        self.truth = dict(zip(ids, paths))
        self.good = ids
        broken = ls.import_images(self.pid, {
            "corrupt.png": b"\x89PNG\r\n\x1a\n this is not an image",
            "one-pixel.png": png((1, 1)),
            "huge.png": png((3000, 3000)),  # 9 Mpx > IMAGE_MAX_PIXELS of the backend below
        })
        self.corrupt, self.one_pixel, self.huge = broken
        self.unreachable = ls.import_tasks(self.pid, [{"image": f"http://127.0.0.1:{free_port()}/missing.png"}])[0]
        self.users = [ls.create_user(f"{n}@taxomoco.test") for n in ("ann", "ben", "cat")]
        self.ml: dict = {}
        self.first_connect_error: str | None = None

    def connect(self) -> dict:
        """Connect the backend to the project once (``POST /api/ml``); Label Studio calls /health and /setup.

        A refused first attempt is kept in ``first_connect_error`` (its own test reports it) and retried,
        so the tests after it still run.
        """
        if self.ml:
            return self.ml
        body = {"project": self.pid, "url": self.backend.url, "title": "taxomoco", **LS_AUTH}
        for _ in range(3):
            answer = self.ls.api("POST", "/api/ml", json=body, expect=(201, 400))
            if answer.status_code == 201:
                self.ml.update(answer.json())
                return self.ml
            self.first_connect_error = self.first_connect_error or answer.text
        raise AssertionError(f"Label Studio refused the backend three times: {answer.text}")

    def client(self) -> LabelStudioClient:
        return LabelStudioClient(self.ls.url, self.ls.admin.token)

    def ml_state(self) -> dict:
        """``GET /api/ml/<id>``: Label Studio calls /health and /setup and records the model version."""
        return self.ls.api("GET", f"/api/ml/{self.ml['id']}").json()

    def wait_for_new_version(self, old: str) -> str:
        """Wait until training has caught up with every annotation, then return the version Label Studio sees.

        Done when the backend is idle (nothing queued or running: the webhooks of a burst of annotations
        may start a run before the last one arrives, then one more) and Label Studio's ``GET /api/ml/<id>``
        (which calls /setup) reports a model version other than ``old`` (not a propagation version). A failed
        training fails the wait.
        """
        failed_before = self.backend.job_status(self.pid).get("counts", {}).get("failed", 0)
        seen: dict = {}

        def done() -> bool:
            status = self.backend.job_status(self.pid)
            seen["status"] = status
            idle = not status.get("queued") and not status.get("running")
            if not idle:
                return False
            if status.get("counts", {}).get("failed", 0) > failed_before:
                return True
            seen["version"] = self.ml_state().get("model_version")
            # a propagation version serves before the heads train (1-3 labels); wait for the model
            return seen["version"] not in (None, "", old) and not str(seen["version"]).startswith("propagation-")

        time.sleep(2.0)  # let the last webhook arrive
        wait_until(done, TRAINING_TIMEOUT_S, interval_s=3.0)
        assert seen.get("version") not in (None, "", old), (
            f"model version stayed {old!r}; job status {seen.get('status')}\n"
            f"backend log:\n{self.backend.log()[-6000:]}")
        return str(seen["version"])

    def retrieve_predictions(self, task_ids: list[int]) -> None:
        """The Data Manager's "Retrieve predictions" action on the given tasks."""
        self.ls.api("POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": self.pid},
                    json={"selectedItems": {"all": False, "included": task_ids}})

    def predictions(self) -> dict[int, list[dict]]:
        return {t.id: t.predictions for t in self.client().iter_tasks(self.pid)}


@pytest.fixture(scope="module")
def stack(label_studio: LabelStudioServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # enough MoCo steps (3 per epoch) for the encoder's BatchNorm statistics to settle
    env = {"IMAGE_MAX_PIXELS": "4000000", "MIN_LABELS_TO_TRAIN": "4", "PRETRAIN_EPOCHS": "4", "PRETRAIN_BATCH_SIZE": "8"}
    backend = BackendServer(tmp_path_factory.mktemp("e2e-backend"), env=env, auth=AUTH)
    backend.start()
    try:
        yield Stack(label_studio, backend)
    finally:
        backend.stop()


def test_connecting_the_backend_reports_the_untrained_version(stack: Stack) -> None:
    stack.connect()
    # Label Studio gives /setup 3 s (ML_TIMEOUT_SETUP); a cold backend must answer the very first one in time
    assert stack.first_connect_error is None, stack.first_connect_error
    state = stack.ml_state()
    assert state["state"] == "CO", state  # CONNECTED: /health and /setup answered
    setup = stack.http.post(f"{stack.backend.url}/setup", json={"project": str(stack.pid), "schema": CONFIG}, timeout=10)
    assert state["model_version"] == setup.json()["model_version"] == "untrained"
    # nothing to predict with yet: Label Studio stores no prediction
    stack.retrieve_predictions(stack.good[:3])
    assert all(stack.predictions()[t] == [] for t in stack.good[:3])
    # with Basic auth on, the backend replaces Label Studio's header-less webhook by one that sends the header, by
    # itself: the first /setup came before Label Studio saved the connection, and no later /setup is needed
    header = "Basic " + base64.b64encode(f"{AUTH[0]}:{AUTH[1]}".encode()).decode()

    def webhook_is_ours() -> bool:
        hooks = [h for h in stack.ls.api("GET", "/api/webhooks/", params={"project": stack.pid}).json()
                 if h["url"].startswith(stack.backend.url)]
        return len(hooks) == 1 and (hooks[0].get("headers") or {}).get("Authorization") == header

    assert wait_until(webhook_is_ours, 45, interval_s=1.0), stack.backend.log()[-3000:]


def test_annotations_from_several_users_train_a_model(stack: Stack) -> None:
    stack.connect()
    ann, ben, cat = stack.users
    for i, tid in enumerate(stack.good[:8]):
        stack.ls.annotate(tid, result(stack.truth[tid]), user=ann)
        if i % 2 == 0:
            stack.ls.annotate(tid, result(stack.truth[tid]), user=ben)
    wrong = ("Plant", "Tree") if stack.truth[stack.good[0]][0] == "Animal" else ("Animal", "Cat")
    stack.ls.annotate(stack.good[0], result(wrong), user=cat)  # a disagreement
    version = stack.wait_for_new_version("untrained")
    assert version != "untrained"
    stack.ml["version"] = version
    status = stack.backend.job_status(stack.pid)
    assert status["last_outcome"] == "succeeded" and status["last_success"]["version"] == version, status
    pulled = {(t.id, a["completed_by"]) for t in stack.client().iter_tasks(stack.pid) for a in t.annotations}
    assert len(pulled) == 8 + 4 + 1


def test_annotator_disagreement_is_flagged_in_a_data_manager_tab(stack: Stack) -> None:
    client = stack.client()
    title = "taxomoco: annotators disagree"
    tabs: dict[str, dict] = {}

    def tab_there() -> bool:  # flags are posted right after the model is published
        tabs.update({t["data"].get("title"): t for t in ls_tabs.list_tabs(client, stack.pid)})
        return title in tabs

    assert tab_there(), (sorted(tabs), stack.backend.log()[-4000:])  # posted before the version went live
    flagged = ls_tabs.tab_task_ids(client, stack.pid, int(tabs[title]["id"]))
    assert stack.good[0] in flagged, flagged  # ann and ben said one thing, cat another
    unanimous = [t for t in stack.good[1:8:2]]  # labelled by ann alone
    assert not set(unanimous) & set(flagged), flagged


def test_retrieve_predictions_gives_valid_paths_of_the_live_version(stack: Stack) -> None:
    version = stack.ml["version"]
    stack.retrieve_predictions(stack.good)
    preds = stack.predictions()
    correct_top = 0
    for tid in stack.good:
        mine = [p for p in preds[tid] if p["model_version"] == version]
        assert len(mine) == 1, preds[tid]  # exactly one per version: no duplicates piling up
        path = predicted_path(mine[0])
        assert path in LEAVES, path
        assert 0.0 <= float(mine[0]["score"]) <= 1.0
        correct_top += path[0] == stack.truth[tid][0]
    assert correct_top >= 12, f"level-1 correct on {correct_top}/16 synthetic images"
    stack.retrieve_predictions(stack.good)  # same version again: Label Studio does not ask twice
    again = stack.predictions()
    assert all(len(again[t]) == len(preds[t]) for t in stack.good)


def test_opening_a_task_predicts_it(stack: Stack) -> None:
    stack.ls.api("PATCH", f"/api/projects/{stack.pid}", json={"evaluate_predictions_automatically": True})
    new = stack.ls.import_images(stack.pid, {"new.png": render(("Plant", "Flower"), seed=99)})[0]
    task = stack.ls.task(new, token=stack.users[2].token)  # what the labeling UI loads
    preds = [p for p in task["predictions"] if p["model_version"] == stack.ml["version"]]
    assert len(preds) == 1 and predicted_path(preds[0]) in LEAVES, task["predictions"]
    stack.ls.api("PATCH", f"/api/projects/{stack.pid}", json={"evaluate_predictions_automatically": False})


def test_broken_images_get_an_empty_answer_and_do_not_break_the_batch(stack: Stack) -> None:
    version = stack.ml["version"]
    batch = [stack.good[8], stack.corrupt, stack.unreachable, stack.one_pixel, stack.huge, stack.good[9]]
    tasks = [stack.ls.task(t) for t in batch]
    answer = stack.http.post(f"{stack.backend.url}/predict", timeout=120, json={
        "tasks": tasks, "project": f"{stack.pid}.0", "label_config": CONFIG})
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert len(results) == len(batch)  # one per task, in order
    assert predicted_path(results[0]) in LEAVES and predicted_path(results[-1]) in LEAVES
    for broken in (results[1], results[2], results[4]):
        assert broken["result"] == [], broken
    assert predicted_path(results[3]) in (LEAVES | {None})  # a 1-pixel image is an image
    assert all(r.get("model_version") == version for r in results)
    log = stack.backend.log()
    for task_id in (stack.corrupt, stack.unreachable, stack.huge):
        assert f"task {task_id}" in log, f"no reason logged for task {task_id}"
    # and through Label Studio: every task of the batch gets its answer stored
    stack.retrieve_predictions(batch)
    preds = stack.predictions()
    assert all(any(p["model_version"] == version for p in preds[t]) for t in batch), {t: preds[t] for t in batch}


def test_malformed_requests_get_clear_answers_and_the_server_keeps_serving(stack: Stack) -> None:
    url = stack.backend.url
    requests = stack.http  # noqa: F811 - authenticated, as Label Studio calls
    for path in ("/predict", "/setup", "/webhook"):
        bad = requests.post(url + path, data="{not json", headers={"Content-Type": "application/json"}, timeout=10)
        assert bad.status_code == 400, (path, bad.status_code, bad.text)
        assert bad.json()["error"], bad.text
    no_tasks = requests.post(url + "/predict", json={"project": stack.pid, "label_config": CONFIG}, timeout=10)
    assert no_tasks.status_code == 400 and "tasks" in no_tasks.json()["error"]
    unknown = requests.post(url + "/webhook", json={"action": "SOMETHING_NEW", "project": {"id": stack.pid}}, timeout=10)
    assert unknown.status_code == 200 and unknown.json()["status"] == "ignored"
    assert requests.get(url + "/health", timeout=5).json()["status"] == "UP"
    assert stack.ml_state()["state"] == "CO"


def test_a_label_config_we_cannot_serve_is_shown_in_label_studio(stack: Stack) -> None:
    text_config = ('<View><Text name="text" value="$text"/>'
                   '<Choices name="c" toName="text"><Choice value="a"/><Choice value="b"/></Choices></View>')
    pid = stack.ls.create_project(text_config, title="not an image project")
    answer = stack.ls.api("POST", "/api/ml", expect=(201, 400),
                          json={"project": pid, "url": stack.backend.url, "title": "taxomoco", **LS_AUTH})
    if answer.status_code == 201:
        state = stack.ls.api("GET", f"/api/ml/{answer.json()['id']}").json()
        assert state["state"] == "ER", state
        message = state["error_message"]
    else:
        message = answer.text
    # Label Studio 1.23 shows only str(requests.HTTPError) of a failed /setup: "400 Client Error: <reason
    # phrase> for url ...", never the body. Our reason reaches the user only as the HTTP reason phrase.
    assert "Image" in message, f"Label Studio shows the user no reason: {message}"


def test_more_annotations_retrain_and_predictions_follow_the_new_version(stack: Stack) -> None:
    old = stack.ml["version"]
    ann, ben, _ = stack.users
    for tid in stack.good[8:12]:
        stack.ls.annotate(tid, result(stack.truth[tid]), user=ben)
    new = stack.wait_for_new_version(old)
    assert new != old
    stack.retrieve_predictions(stack.good[12:])
    preds = stack.predictions()
    for tid in stack.good[12:]:
        versions = [p["model_version"] for p in preds[tid]]
        assert versions.count(new) == 1, versions
        assert predicted_path(next(p for p in preds[tid] if p["model_version"] == new)) in LEAVES
    versions = stack.http.get(f"{stack.backend.url}/versions", params={"project": stack.pid}, timeout=10).json()
    assert new in versions["versions"]


def test_a_backend_configured_with_a_personal_access_token_trains_and_predicts(
        stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> None:
    """LABEL_STUDIO_URL + a JWT personal access token instead of what /setup sends: pull, download, predict."""
    pat = stack.ls.personal_access_token()
    env = {"LABEL_STUDIO_URL": stack.ls.url, "LABEL_STUDIO_API_KEY": pat, "MIN_LABELS_TO_TRAIN": "4",
           "PRETRAIN_EPOCHS": "4", "PRETRAIN_BATCH_SIZE": "8"}
    other = BackendServer(tmp_path_factory.mktemp("e2e-pat-backend"), env=env, auth=AUTH)
    other.start()
    try:
        started = stack.http.post(f"{other.url}/train", json={"project": stack.pid}, timeout=10)
        assert started.status_code == 200, started.text
        status: dict = {}

        def finished() -> bool:
            status.update(other.job_status(stack.pid))
            return status.get("last_outcome") in ("succeeded", "failed") and not status.get("running") \
                and not status.get("queued")

        assert wait_until(finished, TRAINING_TIMEOUT_S, interval_s=2.0), status
        assert status["last_outcome"] == "succeeded", (status, other.log()[-4000:])
        stored = json.loads(next(other.model_dir.rglob("connection.json")).read_text())
        assert stored["url"] == stack.ls.url and stored["api_key"] == ""  # verified; the key stays in the settings
        tasks = [stack.ls.task(t) for t in stack.good[:4]]  # /data/upload/... images: need the Bearer token
        answer = stack.http.post(f"{other.url}/predict", timeout=120,
                               json={"tasks": tasks, "project": stack.pid, "label_config": CONFIG}).json()
        assert [predicted_path(r) in LEAVES for r in answer["results"]] == [True] * 4, answer
    finally:
        other.stop()


def test_a_failed_training_is_shown_in_label_studio(stack: Stack) -> None:
    """Images on a host the backend may not fetch from: the training fails, and Label Studio's model connection
    shows it (its model version, read through /setup) with the reason, as do /health, /versions and /job_status."""
    ls = stack.ls
    pid = ls.create_project(CONFIG, title="taxomoco blocked image host")
    ids = ls.import_tasks(pid, [{"image": f"http://images.example.invalid/{i}.png"} for i in range(6)])
    ml = ls.api("POST", "/api/ml", json={"project": pid, "url": stack.backend.url, "title": "taxomoco", **LS_AUTH},
                expect=(201,)).json()
    # Connecting schedules the cold-start job, which may already have failed on these images by now.
    assert ls.api("GET", f"/api/ml/{ml['id']}").json()["model_version"].startswith("untrained")
    leaves = sorted(LEAVES)
    for i, tid in enumerate(ids[:4]):
        ls.annotate(tid, result((leaves[0], leaves[-1])[i % 2]))  # two top-level classes
    stack.http.post(f"{stack.backend.url}/train", json={"project": pid}, timeout=10).raise_for_status()

    backend = stack.backend
    assert wait_until(lambda: backend.job_status(pid).get("last_outcome") == "failed", TRAINING_TIMEOUT_S,
                      interval_s=2.0), backend.job_status(pid)
    reason = backend.job_status(pid)["last_failure"]["reason"]
    assert "images.example.invalid is not allowed" in reason and "ALLOWED_IMAGE_HOSTS" in reason, reason
    time.sleep(1.2)  # the backend re-reads a project's training state at most once a second
    state = ls.api("GET", f"/api/ml/{ml['id']}").json()  # Label Studio calls /setup and stores the version
    assert state["state"] == "CO", state
    assert state["model_version"].startswith("untrained · last training failed: none of the 6 tasks' images"), state
    assert "images.example.invalid is not allowed" in state["model_version"], state
    health = stack.http.get(f"{stack.backend.url}/health", timeout=10).json()
    assert health["training"][str(pid)]["outcome"] == "failed" and health["training"][str(pid)]["reason"] == reason
    versions = stack.http.get(f"{stack.backend.url}/versions", params={"project": pid}, timeout=10).json()
    assert versions["versions"] == [] and versions["training"]["reason"] == reason
