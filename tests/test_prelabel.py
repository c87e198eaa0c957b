"""The labeling loop: ranking rule, bulk pre-annotation (chunks, resume, pin, clean-up) and the "label next" tab.

The Label Studio parts run against a real Label Studio 1.23 server (``tests/servers.py``); the project is trained
with the real training job (fast settings), whose hook pre-annotates the new version in the same process.
"""

from __future__ import annotations

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ml_backend.labelstudio import predictions as ls_predictions
from ml_backend.labelstudio import tabs as ls_tabs
from ml_backend.labelstudio.client import LabelStudioClient
from ml_backend.labelstudio.errors import LabelStudioUnreachable
from ml_backend.labelstudio.snapshot import read_tasks
from ml_backend.paths import ProjectPaths
from ml_backend.prelabel import writer
from ml_backend.prelabel.order import LABEL_NEXT_TAB, read_queue
from ml_backend.prelabel.progress import PrelabelState, Progress, read_progress, write_progress
from ml_backend.prelabel.writer import run_prelabel, versions_to_delete
from ml_backend.settings import Settings
from ml_backend.training import jobs
from model.ranking import Reason, is_cold_start, labeling_order, least_confidence, typical_cover
from tests.servers import WARM_COLD_COLOURS, WARM_COLD_CONFIG

# ---- the ranking rule (pure numpy) -------------------------------------------------------------------------

def _blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three well separated blobs of 30 points in 8-D, plus one far outlier; blob id per row (-1: outlier)."""
    rng = np.random.default_rng(seed)
    centres = np.eye(8)[:3] * 10
    emb = np.concatenate([c + rng.normal(0, 0.5, (30, 8)) for c in centres] + [np.full((1, 8), -30.0)])
    return emb.astype(np.float32), np.array([0] * 30 + [1] * 30 + [2] * 30 + [-1])


def test_cold_start_picks_one_typical_image_per_uncovered_cluster() -> None:
    emb, blob = _blobs()
    labelled = np.zeros(len(emb), dtype=bool)
    labelled[0] = True  # blob 0 is covered
    picks = typical_cover(emb, labelled, budget=2)
    assert sorted(blob[[r for r, _ in picks]].tolist()) == [1, 2]  # the two uncovered blobs, not the outlier
    for row, share in picks:  # the most typical member: close to its blob's centre
        members = emb[blob == blob[row]]
        assert np.linalg.norm(emb[row] - members.mean(0)) < np.median(np.linalg.norm(members - members.mean(0), axis=1))
        assert share == pytest.approx(30 / len(emb), abs=0.02)


def test_cold_start_in_steps_covers_every_mode_before_splitting_a_large_one() -> None:
    # one wide mode of 2,000 images and two tight ones of 100 (on the unit sphere, as the embeddings are compared)
    rng = np.random.default_rng(0)
    wide = np.eye(16)[0] * 3 + rng.normal(0, 1.0, (2000, 16))
    tight = [np.eye(16)[i] * 3 + rng.normal(0, 0.1, (100, 16)) for i in (1, 2)]
    emb = np.concatenate([wide, *tight]).astype(np.float32)
    mode = np.array([0] * 2000 + [1] * 100 + [2] * 100)
    labelled = np.zeros(len(emb), dtype=bool)
    stepped = typical_cover(emb, labelled, budget=9, step=3)
    # every prefix of 3 is a cover of its own: the first 3 picks find the three modes
    assert sorted(mode[[r for r, _ in stepped[:3]]].tolist()) == [0, 1, 2]
    assert len({r for r, _ in stepped}) == 9
    # from one clustering into 9, the largest clusters are all pieces of the wide mode: its first 3 picks miss both
    # tight modes (the rule before the steps)
    flat = typical_cover(emb, labelled, budget=9, step=0)
    assert mode[[r for r, _ in flat[:3]]].tolist() == [0, 0, 0]


def test_order_covers_first_then_follows_uncertainty_and_puts_unreadable_last() -> None:
    emb, blob = _blobs()
    emb[5] = np.nan  # an unreadable image
    labelled = np.zeros(len(emb), dtype=bool)
    labelled[[0, 30]] = True
    top = np.linspace(0.2, 0.99, len(emb))
    top[5] = np.nan
    order = labeling_order(emb, labelled, top, n_leaves=3, cold_start_per_class=2.0, budget=1)
    assert [r.reason for r in order[:1]] == [Reason.COVERAGE] and blob[order[0].index] == 2
    uncertain = [r for r in order if r.reason is Reason.UNCERTAIN]
    assert [r.score for r in uncertain] == sorted((r.score for r in uncertain), reverse=True)
    assert order[-1].index == 5 and order[-1].reason is Reason.UNRANKED
    assert {r.index for r in order} == set(range(len(emb))) - {0, 30}  # every unlabelled image once
    # enough labels per class: no coverage picks, least confidence only
    labelled[:8] = True
    order = labeling_order(emb, labelled, top, n_leaves=3, cold_start_per_class=2.0, budget=5)
    assert order[0].reason is Reason.UNCERTAIN and order[0].score == pytest.approx(least_confidence(top[8:9])[0])


def test_uncertain_picks_are_spread_over_the_embedding_space() -> None:
    """Ten images of blob 0 are the most uncertain, ten of blobs 1 and 2 slightly surer ones, the rest sure: plain
    least confidence spends a round of 3 on blob 0; the diverse order takes the least confident image of each blob
    (the 10 x 3 least confident ones are clustered), least confident first."""
    emb, blob = _blobs()
    emb = emb[:90]
    labelled = np.zeros(90, dtype=bool)
    unsure = np.arange(90) % 30 < 10  # the first ten of each blob
    top = np.where(unsure, 0.30 + 0.1 * blob[:90], 0.95) + np.arange(90) * 1e-4
    plain = labeling_order(emb, labelled, top, n_leaves=1, cold_start_per_class=0.0, budget=3, diverse=False)
    assert blob[[r.index for r in plain[:3]]].tolist() == [0, 0, 0]
    diverse = labeling_order(emb, labelled, top, n_leaves=1, cold_start_per_class=0.0, budget=3)
    assert [r.index for r in diverse[:3]] == [0, 30, 60]  # each blob's least confident image
    assert all(r.reason is Reason.UNCERTAIN for r in diverse)
    assert [r.score for r in diverse[:3]] == sorted((r.score for r in diverse[:3]), reverse=True)
    assert sorted(r.index for r in diverse) == list(range(90))  # every image once


def test_cold_start_rule() -> None:
    assert is_cold_start(0, 10, has_model=False, cold_start_per_class=0)
    assert is_cold_start(19, 10, has_model=True, cold_start_per_class=2)
    assert not is_cold_start(20, 10, has_model=True, cold_start_per_class=2)


def test_clean_up_policy_keeps_the_live_version_and_the_one_before_and_never_foreign_ones() -> None:
    counts = {"20260101T000000-aaaaaa": 3, "20260102T000000-bbbbbb": 3, "20260103T000000-cccccc": 3,
              "20260104T000000-dddddd": 3, "someone-elses-model": 5, "20260105T000000-eeeeee": 1}
    live = "20260104T000000-dddddd"
    assert versions_to_delete(counts, live, keep=2) == ["20260101T000000-aaaaaa", "20260102T000000-bbbbbb"]
    assert versions_to_delete(counts, live, keep=1) == ["20260101T000000-aaaaaa", "20260102T000000-bbbbbb",
                                                        "20260103T000000-cccccc"]
    assert versions_to_delete(counts, live, keep=9) == []


def test_clean_up_policy_for_propagation_versions_and_when_the_heads_take_over() -> None:
    p1, p2, p3 = ("propagation-1-20260101T000000-aaaaaa", "propagation-2-20260101T000100-bbbbbb",
                  "propagation-3-20260101T000200-cccccc")
    counts = {p1: 5, p2: 5, p3: 5, "someone-elses-model": 1}
    assert versions_to_delete(counts, p3, keep=2) == [p1]  # the live one and the one before stay
    assert versions_to_delete(counts, p3, keep=1) == [p1, p2]
    assert versions_to_delete(counts, p2, keep=1) == [p1]  # a newer one is never touched
    heads = "20260102T000000-dddddd"
    old_heads = "20251231T000000-eeeeee"
    # once a model version is live every propagation version goes; model versions follow the keep policy
    assert versions_to_delete({**counts, heads: 5, old_heads: 1}, heads, keep=2) == [p1, p2, p3]
    assert versions_to_delete({**counts, heads: 5, old_heads: 1}, heads, keep=1) == [p1, p2, p3, old_heads]


# ---- against a real Label Studio ---------------------------------------------------------------------------

def _png(rgb: tuple[int, int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(rgb)[None, None, :] + rng.normal(0, 25, (24, 24, 3)), 0, 255).astype("uint8")
    x, y = rng.integers(0, 14, 2)
    arr[y:y + 8, x:x + 8] = 255 - arr[y:y + 8, x:x + 8]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _result(path: tuple[str, ...]) -> list[dict]:
    return [{"from_name": "taxonomy", "to_name": "image", "type": "taxonomy", "value": {"taxonomy": [list(path)]}}]


def _settings(model_dir: Path, label_studio, **overrides: object) -> Settings:
    from tests.servers import FAST_TRAINING_ENV

    env = {k: v for k, v in FAST_TRAINING_ENV.items() if k != "OMP_NUM_THREADS"}
    return Settings.from_env(env=env, model_dir=model_dir, label_studio_url=label_studio.url,
                             label_studio_api_key=label_studio.admin.token, **overrides)


@pytest.fixture(scope="module")
def trained(label_studio, tmp_path_factory: pytest.TempPathFactory):
    """A project of 21 images (9 labelled, 1 skipped), trained once: the hook pre-annotated the version."""
    import torch

    torch.set_num_threads(1)
    model_dir = tmp_path_factory.mktemp("prelabel")
    pid = label_studio.create_project(WARM_COLD_CONFIG, title="taxomoco prelabel")
    images = {f"img{i:02d}.png": _png(WARM_COLD_COLOURS[list(WARM_COLD_COLOURS)[i % 3]], seed=i) for i in range(21)}
    ids = label_studio.import_images(pid, images)
    for i, tid in enumerate(ids[:9]):
        label_studio.annotate(tid, _result(list(WARM_COLD_COLOURS)[i % 3]))
    label_studio.annotate(ids[9], [], was_cancelled=True)  # skipped: no label, still gets a prediction
    # 3 labels per leaf: past a cold start that ends at 2 (the default, 10, would keep covering)
    settings = _settings(model_dir, label_studio, prelabel_chunk=4, cold_start_per_class=2.0)
    jobs.use_settings(settings)
    try:
        result = jobs.train_project(pid, str(model_dir))
    finally:
        jobs.use_settings(None)
    assert result["status"] == "succeeded", result
    return {"pid": pid, "ids": ids, "targets": ids[9:], "version": result["version"], "settings": settings,
            "paths": ProjectPaths(model_dir, pid), "client": LabelStudioClient(label_studio.url, label_studio.admin.token)}


def _versions_per_task(client: LabelStudioClient, task_ids: list[int]) -> dict[int, list[str]]:
    return {t: ls_predictions.task_prediction_versions(client, t) for t in task_ids}


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_every_unlabelled_task_gets_one_prediction_of_the_version_and_the_project_is_pinned(trained, label_studio) -> None:
    client, pid, version = trained["client"], trained["pid"], trained["version"]
    progress = read_progress(trained["paths"])
    assert progress is not None and progress.state is PrelabelState.DONE and progress.version == version
    assert progress.total == 12 and progress.done == 12 and progress.created == 12 and progress.dropped == 0
    assert progress.pinned and ls_predictions.project_model_version(client, pid) == version
    per_task = _versions_per_task(client, trained["ids"])
    assert all(per_task[t] == [version] for t in trained["targets"]), per_task
    assert all(per_task[t] == [] for t in trained["ids"][:9])  # labelled tasks get none
    task = label_studio.task(trained["targets"][0])
    prediction = task["predictions"][0]
    path = prediction["result"][0]["value"]["taxonomy"][0]
    assert tuple(path) in WARM_COLD_COLOURS and 0 < prediction["score"] <= 1  # a valid leaf path with its score
    # the Data Manager's Prediction score column has values now (it averages the pinned version only)
    rows = label_studio.api("GET", "/api/tasks", params={"project": pid, "fields": "all", "page_size": 100}).json()
    scores = {t["id"]: t.get("predictions_score") for t in rows["tasks"]}
    assert all(scores[t] is not None for t in trained["targets"]), scores
    # a second run of the same version does nothing
    again = run_prelabel(trained["settings"], trained["paths"])
    assert again["status"] == "skipped" and _versions_per_task(client, trained["targets"][:2]) == \
        {t: [version] for t in trained["targets"][:2]}


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_label_next_tab_and_queue_follow_the_rank_and_label_studio_samples_the_same_task(trained, label_studio) -> None:
    client, pid = trained["client"], trained["pid"]
    queue = read_queue(trained["paths"])
    assert [t["task"] for t in queue["tasks"]] and {t["task"] for t in queue["tasks"]} == set(trained["targets"])
    assert queue["cold_start"] is False and all(t["reason"] == "uncertain" for t in queue["tasks"])
    scores = [t["score"] for t in queue["tasks"]]
    assert scores == sorted(scores, reverse=True)
    tabs = ls_tabs.list_tabs(client, pid)
    assert tabs[0]["data"]["title"] == "Default"  # the project's own tab stays the default one
    ours = next(t for t in tabs if t["data"]["title"] == LABEL_NEXT_TAB)
    assert "tasks:data.image" not in ours["data"]["hiddenColumns"]["explore"]  # thumbnails render
    assert "tasks:predictions_score" not in ours["data"]["hiddenColumns"]["explore"]
    assert ours["data"]["ordering"] == ["tasks:predictions_score"]
    shown = ls_tabs.tab_task_ids(client, pid, int(ours["id"]))
    assert shown == [t["task"] for t in queue["tasks"]][:len(shown)] and len(shown) == len(queue["tasks"])
    # Label Studio's own "Uncertainty sampling" (API-only in Community) streams the least certain task first
    label_studio.api("PATCH", f"/api/projects/{pid}/", json={"sampling": "Uncertainty sampling"})
    nxt = label_studio.api("GET", f"/api/projects/{pid}/next/").json()
    assert nxt["id"] == queue["tasks"][0]["task"]


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_a_crashed_run_resumes_after_its_cursor_without_writing_twice_and_cleans_up_old_versions(
        trained, label_studio, monkeypatch: pytest.MonkeyPatch) -> None:
    client, pid, version, paths = trained["client"], trained["pid"], trained["version"], trained["paths"]
    targets = sorted(trained["targets"])
    # start over for this version: its predictions gone (Label Studio then clears the pinned version too)
    ls_predictions.delete_model_version(client, pid, version)
    assert ls_predictions.project_model_version(client, pid) != version
    # older versions of this backend and another model's predictions
    old = ["20200101T000000-aaaaaa", "20200102T000000-bbbbbb"]
    ls_predictions.import_predictions(client, pid, [
        *({"task": t, "result": [], "score": 0.1, "model_version": old[0]} for t in targets[:3]),
        {"task": targets[0], "result": [], "score": 0.1, "model_version": old[1]},
        {"task": targets[1], "result": [], "score": 0.1, "model_version": "someone-elses-model"}])
    # a run that died during its third chunk: chunks 1-2 written, chunk 3 reached Label Studio, then the crash
    item = {"result": [], "score": 0.5, "model_version": version}
    ls_predictions.import_predictions(client, pid, [{"task": t, **item} for t in targets[:6]])
    write_progress(paths, Progress(version=version, state=PrelabelState.RUNNING, total=len(targets), done=4,
                                   after_task=targets[3], in_flight=targets[4:6], created=4))
    touched_at = label_studio.task(targets[0])["updated_at"]
    saved: list[dict] = []  # every record the run saves, as /job_status would show it at that moment
    monkeypatch.setattr(writer, "RECORD_EVERY_S", 0.0)
    monkeypatch.setattr(writer, "write_progress", lambda p, progress: (saved.append(progress.to_dict()),
                                                                       write_progress(p, progress)))
    out = run_prelabel(trained["settings"], paths)
    assert out["status"] == "done" and out["done"] == len(targets) and out["created"] == len(targets)
    per_task = _versions_per_task(client, targets)
    assert all(per_task[t].count(version) == 1 for t in targets), per_task  # nothing written twice
    assert ls_predictions.project_model_version(client, pid) == version  # pinned again
    counts = ls_predictions.model_version_counts(client, pid)
    assert old[0] not in counts and counts.get(old[1]) == 1  # the live version and the one before it stay
    assert counts.get("someone-elses-model") == 1  # other models' predictions are never touched
    assert out["deleted"] == {old[0]: 3}
    # the clean-up's progress was saved while it deleted, then the re-read was announced
    cleaning = [(r["cleanup_done"], r["cleanup_total"]) for r in saved
                if r["state"] == "running" and r["phase"] == "cleaning"]
    assert cleaning == [(0, 3), (1, 3), (2, 3), (3, 3)], cleaning
    assert [r["phase"] for r in saved if r["state"] == "running"][-1] == "rereading"
    assert (out["phase"], out["cleanup_done"], out["cleanup_total"]) == ("rereading", 3, 3)
    # deleting the old prediction moved its task's updated_at; the run read the task again after its clean-up, so
    # the next training's incremental pull does not
    now_at = label_studio.task(targets[0])["updated_at"]
    assert now_at != touched_at
    snapshot = {t.id: t for t in read_tasks(paths.tasks_snapshot) or []}
    assert snapshot[targets[0]].updated_at == now_at
    assert out["repulled"] >= 1 and out["repull_s"] > 0


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_old_versions_are_deleted_one_prediction_at_a_time_and_the_clean_up_can_stop_and_continue(trained) -> None:
    client, pid = trained["client"], trained["pid"]
    targets = sorted(trained["targets"])
    gone, kept = "20200103T000000-cccccc", "20200104T000000-dddddd"
    ls_predictions.import_predictions(client, pid, [
        *({"task": t, "result": [], "score": 0.1, "model_version": gone} for t in targets[:3]),
        {"task": targets[0], "result": [], "score": 0.1, "model_version": kept}])
    asked = []

    def after_one() -> bool:  # a newer version waits once one prediction is deleted
        asked.append(1)
        return len(asked) > 1

    assert ls_predictions.delete_version_predictions(client, pid, [gone], stop=after_one) == {gone: 1}
    assert ls_predictions.model_version_counts(client, pid).get(gone) == 2
    assert ls_predictions.delete_version_predictions(client, pid, [gone]) == {gone: 2}  # a later run finishes
    counts = ls_predictions.model_version_counts(client, pid)
    assert gone not in counts and counts.get(kept) == 1  # only the named version's predictions
    assert ls_predictions.delete_version_predictions(client, pid, [gone]) == {gone: 0}

    # predictions deleted by someone else between the page read and their turn are skipped, not an error
    ls_predictions.import_predictions(client, pid, [{"task": t, "result": [], "score": 0.1, "model_version": gone}
                                                    for t in targets[:2]])

    def someone_deletes_them_first() -> bool:
        ls_predictions.delete_model_version(client, pid, gone)
        return False

    assert ls_predictions.delete_version_predictions(client, pid, [gone], stop=someone_deletes_them_first) == {gone: 0}
    assert gone not in ls_predictions.model_version_counts(client, pid)


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_failure_is_recorded_and_the_next_run_resumes(trained, tmp_path: Path) -> None:
    paths = trained["paths"]
    progress = read_progress(paths)
    assert progress is not None
    write_progress(paths, Progress(version=progress.version, state=PrelabelState.FAILED, total=progress.total,
                                   done=progress.total, after_task=max(trained["targets"]), created=progress.total))
    broken = Settings.from_env(env={}, model_dir=paths.model_dir, label_studio_url="http://127.0.0.1:9",
                               label_studio_api_key="x" * 20)
    with pytest.raises(LabelStudioUnreachable):
        run_prelabel(broken, paths)
    failed = read_progress(paths)
    assert failed is not None and failed.state is PrelabelState.FAILED and "Unreachable" in (failed.error or "")
    out = run_prelabel(trained["settings"], paths)  # nothing left to write: only the pin and clean-up
    assert out["status"] == "done" and out["done"] == progress.total


# ---- the training pull never makes Label Studio call /predict -----------------------------------------------

class _RecordingBackend:
    """A minimal ML backend on 127.0.0.1 that records the paths Label Studio calls (the backend side is ours)."""

    def __init__(self) -> None:
        calls = self.calls = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _answer(self, body: object) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                calls.append(self.path)
                self._answer({"status": "UP", "model_class": "stub"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                calls.append(self.path)
                if self.path.startswith("/predict"):
                    self._answer({"results": [{"result": [], "score": 0.0, "model_version": "stub-1"}
                                              for _ in body.get("tasks", [])]})
                else:
                    self._answer({"model_version": "stub-1"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_the_training_pull_does_not_make_label_studio_predict(label_studio) -> None:
    backend = _RecordingBackend()
    try:
        pid = label_studio.create_project(WARM_COLD_CONFIG, title="taxomoco pull without predict",
                                          evaluate_predictions_automatically=True)
        ids = label_studio.import_images(pid, {f"p{i}.png": _png((200, 30, 30), i) for i in range(5)})
        label_studio.connect_backend(pid, backend.url, title="stub")
        client = LabelStudioClient(label_studio.url, label_studio.admin.token)
        pulled = list(client.iter_tasks(pid))
        assert sorted(t.id for t in pulled) == sorted(ids)
        assert not [c for c in backend.calls if c.startswith("/predict")], backend.calls
        # the Data Manager's list does ask (so the stub would have seen the pull's calls)
        label_studio.api("GET", "/api/tasks", params={"project": pid, "page_size": 10})
        assert [c for c in backend.calls if c.startswith("/predict")]
    finally:
        backend.close()
