"""The training job: pretraining policy, skip reasons, settings hand-over, failures recorded.

The whole job against a real Label Studio server is ``test_train_project_end_to_end`` (marked e2e).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ml_backend.labelstudio.errors import LabelStudioUnreachable
from ml_backend.paths import ProjectPaths
from ml_backend.settings import Settings
from ml_backend.training import jobs
from ml_backend.training.calibration import read_calibration
from ml_backend.training.encoder import pending_run
from ml_backend.training.labels import labels_shortfall
from ml_backend.training.policy import PretrainReason, decide_pretrain, read_pretrain_record, write_pretrain_record
from ml_backend.training.records import JobRecords
from model.encoder.device import lightning_device
from model.errors import ConfigError
from tests.servers import WARM_COLD_COLOURS, WARM_COLD_CONFIG


@pytest.fixture(autouse=True)
def _reset_settings():
    yield
    jobs.use_settings(None)


def test_first_training_pretrains() -> None:
    d = decide_pretrain(100, None, has_live_encoder=False, force=False, repretrain_fraction=0.5)
    assert d.pretrain and d.reason is PretrainReason.FIRST and d.n_images_at_last_pretrain is None


def test_forced_pretraining_wins() -> None:
    d = decide_pretrain(100, {"n_images": 100}, has_live_encoder=True, force=True, repretrain_fraction=0.5)
    assert d.pretrain and d.reason is PretrainReason.FORCED


@pytest.mark.parametrize(
    ("now", "last", "fraction", "expected"),
    [(149, 100, 0.5, False), (150, 100, 0.5, True), (100, 100, 0.0, True), (101, 100, 0.01, True),
     (100, 100, 0.5, False), (60, 100, 0.5, False)],
)
def test_pretrain_again_when_the_project_grew_enough(now: int, last: int, fraction: float, expected: bool) -> None:
    d = decide_pretrain(now, {"n_images": last}, has_live_encoder=True, force=False, repretrain_fraction=fraction)
    assert d.pretrain is expected
    assert d.reason is (PretrainReason.GREW if expected else PretrainReason.HEADS_ONLY)
    assert d.to_dict()["n_images_at_last_pretrain"] == last


def test_a_project_too_small_for_self_supervision_does_not_pretrain_unless_forced() -> None:
    d = decide_pretrain(120, None, has_live_encoder=False, force=False, repretrain_fraction=0.5, min_images=500)
    assert not d.pretrain and d.reason is PretrainReason.TOO_FEW_IMAGES
    assert "PRETRAIN_MIN_IMAGES" in d.to_dict()["reason"]
    forced = decide_pretrain(120, None, has_live_encoder=False, force=True, repretrain_fraction=0.5, min_images=500)
    assert forced.pretrain and forced.reason is PretrainReason.FORCED
    assert decide_pretrain(500, None, False, False, 0.5, min_images=500).reason is PretrainReason.FIRST


def test_missing_live_encoder_pretrains_again() -> None:
    d = decide_pretrain(10, {"n_images": 10}, has_live_encoder=False, force=False, repretrain_fraction=0.5)
    assert d.pretrain and d.reason is PretrainReason.NO_ENCODER


def test_pretrain_record_round_trip(tmp_path: Path) -> None:
    paths = ProjectPaths(tmp_path, 1)
    assert read_pretrain_record(paths) is None
    write_pretrain_record(paths, 42, "abc123")
    record = read_pretrain_record(paths)
    assert record["n_images"] == 42 and record["encoder_version"] == "abc123"
    d = decide_pretrain(62, record, has_live_encoder=True, force=False, repretrain_fraction=0.5)
    assert not d.pretrain and decide_pretrain(63, record, True, False, 0.5).pretrain


def test_cross_validation_units_join_identical_images_and_the_last_near_duplicate_groups(tmp_path: Path) -> None:
    import json

    from ml_backend.training.fit import duplicate_units

    paths = Settings(model_dir=tmp_path).project(3)
    tasks, keys = [1, 2, 3, 4, 5], ["a", "a", "b", "c", "d"]
    assert duplicate_units(paths, tasks, keys).tolist()[:2] == [5, 5]  # no neighbour step yet: identical only
    units = duplicate_units(paths, tasks, keys)
    assert len(set(units.tolist())) == 4
    paths.duplicates.parent.mkdir(parents=True, exist_ok=True)
    paths.duplicates.write_text(json.dumps({"groups": [{"items": [3, 9], "kind": "near", "similarity": 0.9997,
                                                        "keys": ["b", "c"]}]}))
    units = duplicate_units(paths, tasks, keys).tolist()
    assert units[0] == units[1] and units[2] == units[3] and len(set(units)) == 3


def test_labels_shortfall_names_what_is_missing() -> None:
    labels = {1: ("Animal", "Cat"), 2: ("Animal", "Dog"), 3: ("Plant",)}
    assert labels_shortfall(labels, 4) == "need 1 more labels (have 3 labelled tasks, training starts at 4)"
    one_class = {i: ("Animal", "Cat") for i in range(5)}
    reason = labels_shortfall(one_class, 4)
    assert reason is not None and "at least 2 top-level classes" in reason and "'Animal'" in reason
    assert labels_shortfall({**labels, 4: ("Plant",)}, 4) is None


def test_lightning_device_mapping() -> None:
    assert lightning_device("auto") == ("auto", 1)
    assert lightning_device("cpu") == ("cpu", 1)
    assert lightning_device("cuda") == ("gpu", 1)
    assert lightning_device("cuda:3") == ("gpu", (3,))


def test_worker_settings_reach_the_job(tmp_path: Path) -> None:
    jobs.use_settings(Settings.from_env(env={}, device="cpu", min_labels_to_train=9))
    s = jobs.job_settings(str(tmp_path))
    assert s.device == "cpu" and s.min_labels_to_train == 9 and s.model_dir == tmp_path


def test_job_without_label_studio_connection_fails_with_reason_recorded(tmp_path: Path) -> None:
    jobs.use_settings(Settings.from_env(env={}))  # no LABEL_STUDIO_URL, nothing remembered from /setup
    with pytest.raises(ConfigError) as err:
        jobs.train_project(3, str(tmp_path))
    record = JobRecords(ProjectPaths(tmp_path, 3)).read()
    assert record["last_outcome"] == "failed" and record["last_failure"]["reason"] == str(err.value)
    assert "LABEL_STUDIO_URL" in record["last_failure"]["reason"]
    assert record["running_job_id"] is None and record["counts"]["failed"] == 1
    assert record["last_failure"]["job_id"].startswith("local-3-")


def test_job_against_unreachable_label_studio_is_recorded(tmp_path: Path) -> None:
    from tests.servers import free_port

    url = f"http://127.0.0.1:{free_port()}"
    jobs.use_settings(Settings.from_env(env={}, label_studio_url=url, label_studio_api_key="0123456789abcdef"))
    with pytest.raises(LabelStudioUnreachable):
        jobs.train_project(4, str(tmp_path))
    record = JobRecords(ProjectPaths(tmp_path, 4)).read()
    assert record["last_outcome"] == "failed" and "127.0.0.1" in record["last_failure"]["reason"]


# --------------------------------------------------------------------------------------------------------
# The whole job against a real Label Studio (and through a real RQ worker)
# --------------------------------------------------------------------------------------------------------




def _png(rgb: tuple[int, int, int], seed: int) -> bytes:
    """A 24 px synthetic image: a noisy colour field with a square (labels follow the colour)."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(rgb)[None, None, :] + rng.normal(0, 25, (24, 24, 3)), 0, 255).astype("uint8")
    x, y = rng.integers(0, 14, 2)
    arr[y:y + 8, x:x + 8] = 255 - arr[y:y + 8, x:x + 8]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _fast_settings(model_dir: Path, label_studio, **overrides: object) -> Settings:
    from tests.servers import FAST_TRAINING_ENV

    env = {k: v for k, v in FAST_TRAINING_ENV.items() if k not in ("OMP_NUM_THREADS",)}
    return Settings.from_env(env=env, model_dir=model_dir, label_studio_url=label_studio.url,
                             label_studio_api_key=label_studio.admin.token, **overrides)


@pytest.fixture
def labelled_project(label_studio) -> tuple[int, dict[int, tuple[str, str]]]:
    """A Label Studio project with 18 uploaded images, 9 of them annotated (3 per leaf)."""
    pid = label_studio.create_project(WARM_COLD_CONFIG, title="taxomoco job e2e")
    images, truth = {}, []
    for i in range(18):
        path = list(WARM_COLD_COLOURS)[i % 3]
        images[f"img{i:02d}.png"] = _png(WARM_COLD_COLOURS[path], seed=i)
        truth.append(path)
    task_ids = label_studio.import_images(pid, images)
    labels = {}
    for tid, path in list(zip(task_ids, truth))[:9]:
        label_studio.annotate(tid, [{"from_name": "taxonomy", "to_name": "image", "type": "taxonomy",
                                      "value": {"taxonomy": [list(path)]}}])
        labels[tid] = path
    return pid, labels


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_train_project_end_to_end(label_studio, labelled_project, tmp_path: Path) -> None:
    import torch

    from model.bundle import live_version, load_live

    torch.set_num_threads(1)
    pid, labels = labelled_project
    jobs.use_settings(_fast_settings(tmp_path, label_studio, calibration_reuse_fraction=0.05))
    first = jobs.train_project(pid, str(tmp_path))
    assert first["status"] == "succeeded", first
    assert first["pretrain"]["pretrain"] is True and first["pretrain"]["reason"] == PretrainReason.FIRST.value
    assert first["counts"]["tasks"] == 18 and first["counts"]["labelled"] == 9 and first["counts"]["images"] == 18
    assert first["counts"]["trained_on"] == 9 and first["counts"]["embedded"] == 18
    choice = first["model_choice"]  # every candidate cross-validated; the previous encoder did not exist yet
    assert set(choice["candidates"]) == {"pixels+linear", "encoder+prototypes", "encoder+mlp"}
    assert "previous-encoder+mlp" in choice["skipped"] and choice["chosen"] in choice["candidates"]
    assert choice["folds"] == 3 and choice["reason"].startswith(choice["chosen"]) and choice["n_labelled"] == 9
    root = ProjectPaths(tmp_path, pid).models
    assert live_version(root) == first["version"]
    bundle = load_live(root)
    assert bundle.manifest.extra["pretrained"] is True and bundle.manifest.extra["excluded"] == 0
    assert bundle.manifest.metrics["model_choice"] == choice and bundle.manifest.extra["model"] == choice["chosen"]
    assert bundle.manifest.features["kind"] == ("pixels" if choice["chosen"] == "pixels+linear" else "encoder")
    assert read_pretrain_record(ProjectPaths(tmp_path, pid))["n_images"] == 18
    record = JobRecords(ProjectPaths(tmp_path, pid)).read()
    assert record["last_success"]["version"] == first["version"] and record["counts"]["succeeded"] == 1
    assert record["last_success"]["result"]["model_choice"] == choice  # what /job_status shows
    assert (ProjectPaths(tmp_path, pid).disagreement_report).exists()
    report = json.loads(ProjectPaths(tmp_path, pid).disagreement_report.read_text())
    given = [g for item in report["items"] for g in item["given"]]  # the neighbours' held-out verdict on each label
    assert len(given) == 9 and all(0.0 <= g["neighbour_prob"] <= 1.0 for g in given), given
    served = choice["propagation"]  # propagation scored on the same folds; what the version serves is named
    assert served["rule"] == "one-se" and served["chosen"] in {"heads", "propagation", "heads+propagation"}
    assert set(served["candidates"]) == {choice["chosen"], "propagation", "heads+propagation"}
    named = bundle.manifest.extra["served_model"]
    assert named == choice["chosen"] if served["chosen"] == "heads" else named == f"{choice['chosen']} {served['chosen']}"
    assert (bundle.propagated is None) == (served["chosen"] == "heads")

    # a second run: heads only on the live encoder, every embedding from the cache, no image downloaded again
    second = jobs.train_project(pid, str(tmp_path))
    assert second["status"] == "succeeded" and second["pretrain"]["pretrain"] is False
    assert second["version"] != first["version"] and live_version(root) == second["version"]
    assert load_live(root).manifest.encoder_version == bundle.manifest.encoder_version
    assert "pretrain" not in second["durations_s"]
    assert first["pull"]["kind"] == "full" and first["pull"]["read"] == 18
    assert second["pull"]["kind"] == "incremental"  # only the tasks Label Studio changed since the first pull

    # calibration: the first run cross-validated before publishing; the second (same labels) reused that
    # temperature, published, then cross-validated; a third with 1 of 10 labels new (over the 5 % allowed here)
    # cross-validates first: the chosen candidate only (10 labels < 1.5 x the 9 the choice was made on)
    assert first["calibration"]["reuse"] is False and "fit" in first["durations_s"]
    assert second["calibration"]["reuse"] is True and second["calibration"]["changed_fraction"] == 0.0
    assert load_live(root).temperature == pytest.approx(bundle.temperature)
    assert "cross_validation" in second["durations_s"] and "cross_validation" not in first["durations_s"]
    assert second["model_choice"] == choice  # the reused calibration keeps the choice it was made with
    record = read_calibration(ProjectPaths(tmp_path, pid))
    assert record is not None and record.model_version == second["version"] and record.n_labelled == 9
    unlabelled = next(t for t in range(min(labels), min(labels) + 18) if t not in labels)
    label_studio.annotate(unlabelled, [{"from_name": "taxonomy", "to_name": "image", "type": "taxonomy",
                                        "value": {"taxonomy": [["Cold", "Blue"]]}}])
    third = jobs.train_project(pid, str(tmp_path))
    assert third["status"] == "succeeded" and third["calibration"]["reuse"] is False, third["calibration"]
    assert third["calibration"]["changed_fraction"] == pytest.approx(0.1)
    assert third["model_choice"] == choice and "cross_validation" not in third["durations_s"]
    assert read_calibration(ProjectPaths(tmp_path, pid)).n_labelled == 10


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_too_few_labels_is_a_recorded_skip(label_studio, tmp_path: Path) -> None:
    pid = label_studio.create_project(WARM_COLD_CONFIG, title="taxomoco skip e2e")
    task_ids = label_studio.import_images(pid, {"a.png": _png((200, 0, 0), 1), "b.png": _png((0, 0, 200), 2)})
    label_studio.annotate(task_ids[0], [{"from_name": "taxonomy", "to_name": "image", "type": "taxonomy",
                                         "value": {"taxonomy": [["Warm", "Red"]]}}])
    jobs.use_settings(_fast_settings(tmp_path, label_studio, min_labels_to_train=4))
    out = jobs.train_project(pid, str(tmp_path))
    assert out["status"] == "skipped" and out["reason"].startswith("need 3 more labels")
    record = JobRecords(ProjectPaths(tmp_path, pid)).read()
    assert record["last_outcome"] == "skipped" and record["last_skip"]["reason"] == out["reason"]
    assert not (ProjectPaths(tmp_path, pid).models).exists()


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_a_cold_start_pretraining_is_kept_and_never_repeated(label_studio, tmp_path: Path) -> None:
    """Pretraining from 0 images on (the policy of a large project): the connected project pretrains with no label,
    the next run and the first training use that encoder (the pretraining record says it is done)."""
    import torch

    from ml_backend.training.encoder import start_encoder
    from model.bundle import load_live

    torch.set_num_threads(1)
    pid = label_studio.create_project(WARM_COLD_CONFIG, title="taxomoco cold pretraining")
    leaves = list(WARM_COLD_COLOURS)
    ids = label_studio.import_images(pid, {f"p{i:02d}.png": _png(WARM_COLD_COLOURS[leaves[i % 3]], seed=i)
                                           for i in range(18)})
    jobs.use_settings(_fast_settings(tmp_path, label_studio, pretrain_min_images=0, min_labels_to_train=4))
    paths = ProjectPaths(tmp_path, pid)
    first = jobs.train_project(pid, str(tmp_path))
    cold = first["cold_start"]
    assert first["status"] == "skipped" and cold["pretrain"]["pretrain"] and "pretrain" in first["durations_s"]
    kept = start_encoder(paths)
    assert kept is not None and kept.version == cold["encoder"] == read_pretrain_record(paths)["encoder_version"]
    again = jobs.train_project(pid, str(tmp_path))
    assert again["cold_start"]["pretrain"]["pretrain"] is False and "pretrain" not in again["durations_s"]
    assert again["cold_start"]["pretrain"]["reason"] == PretrainReason.HEADS_ONLY.value
    assert again["cold_start"]["encoder"] == kept.version and again["cold_start"]["neighbors"]["added"] == 0
    for i, tid in enumerate(ids[:4]):  # 2 top-level classes: the heads train
        label_studio.annotate(tid, [{"from_name": "taxonomy", "to_name": "image", "type": "taxonomy",
                                     "value": {"taxonomy": [list(leaves[i % 3])]}}])
    trained = jobs.train_project(pid, str(tmp_path))
    assert trained["status"] == "succeeded" and trained["pretrain"]["pretrain"] is False, trained["pretrain"]
    assert load_live(paths.models).manifest.encoder_version == kept.version  # the cold start's encoder, published
    assert start_encoder(paths) is None  # the live version's encoder is the project's now


@pytest.mark.e2e
@pytest.mark.redis
@pytest.mark.timeout(600)
def test_real_job_through_rq_worker_is_picked_up_by_the_store(label_studio, labelled_project, redis_url: str,
                                                              tmp_path: Path) -> None:
    import torch

    from ml_backend.queue.rq_queue import RQScheduler
    from ml_backend.queue.worker import build_worker
    from ml_backend.serving.store import ModelStore
    from tests.servers import wait_until

    torch.set_num_threads(1)
    pid, _ = labelled_project
    settings = _fast_settings(tmp_path, label_studio, redis_url=redis_url)
    jobs.use_settings(settings)
    scheduler = RQScheduler(settings)
    store = ModelStore(settings)
    try:
        assert store.version(pid) == "untrained"
        out = scheduler.schedule(pid, "ANNOTATION_CREATED")
        assert out["action"] == "queued" and out["queue"] == settings.pretrain_queue
        build_worker(settings).work(burst=True, logging_level="WARNING")
        status = scheduler.status(pid)
        assert status["last_outcome"] == "succeeded", status
        version = status["last_success"]["version"]
        assert wait_until(lambda: store.version(pid) == version, 30), store.version(pid)
        served = store.get(pid, wait_s=120)  # version() already names a version that is still loading
        assert served is not None and served.version == version
    finally:
        store.close()
        scheduler.close()


def test_pretrain_request_survives_until_cleared(tmp_path: Path) -> None:
    from ml_backend.training.policy import clear_pretrain_request, pretrain_requested, request_pretrain

    paths = ProjectPaths(tmp_path, 1)
    assert not pretrain_requested(paths)
    request_pretrain(paths)
    request_pretrain(paths)
    assert pretrain_requested(paths)
    clear_pretrain_request(paths)
    assert not pretrain_requested(paths)


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_real_job_in_the_embedded_scheduler_with_the_setup_connection(label_studio, labelled_project,
                                                                     tmp_path: Path) -> None:
    """The default deployment: no REDIS_URL, no LABEL_STUDIO_URL; the token comes from /setup's connection file,
    and the server's settings reach the spawned training child."""
    from ml_backend.labelstudio import connections
    from ml_backend.queue.factory import make_scheduler
    from tests.servers import FAST_TRAINING_ENV

    pid, _ = labelled_project
    settings = Settings.from_env(env=FAST_TRAINING_ENV, model_dir=tmp_path)
    assert settings.label_studio_url is None and settings.redis_url is None
    connections.accept_setup(settings, connections.SetupRequest(pid, label_studio.url, label_studio.admin.token, None,
                                                                False))  # what /setup does: verify and pin
    scheduler = make_scheduler(settings)
    try:
        assert scheduler.kind == "embedded"
        assert scheduler.schedule(pid, "START_TRAINING")["action"] == "queued"
        assert scheduler.wait_idle(500)
        status = scheduler.status(pid)
        assert status["last_outcome"] == "succeeded", status
        result = status["last_success"]["result"]
        assert result["counts"]["trained_on"] == 9 and result["pretrain"]["pretrain"] is True
        from model.bundle import load_live

        bundle = load_live(ProjectPaths(tmp_path, pid).models)
        assert bundle.encoder_cfg.input_size == 32  # FAST_TRAINING_ENV's size, not the environment's default
    finally:
        scheduler.close()
        connections.forget_all()


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_a_job_leaves_its_after_publish_work_to_a_follow_up_that_already_waits(label_studio, labelled_project,
                                                                              tmp_path: Path) -> None:
    """A labeling stream: an event arrives while a training runs. Its follow-up is in the job record at once, so the
    running job publishes and leaves the cross-validation, the disagreement analysis and the pre-annotation to the
    follow-up, which, with nothing waiting behind it, does them all. A pre-annotation run stops the same way."""
    from datetime import datetime

    from ml_backend.labelstudio.client import LabelStudioClient
    from ml_backend.labelstudio.predictions import model_version_counts
    from ml_backend.prelabel.writer import run_prelabel
    from ml_backend.queue.embedded import EmbeddedScheduler
    from model.bundle import list_versions, load_live
    from tests.servers import wait_until

    pid, labels = labelled_project
    paths = ProjectPaths(tmp_path, pid)
    records = JobRecords(paths)
    settings = _fast_settings(tmp_path, label_studio)
    scheduler = EmbeddedScheduler(settings)
    try:
        assert scheduler.schedule(pid, "START_TRAINING")["action"] == "queued"  # the first model (not part of it)
        assert scheduler.wait_idle(500) and scheduler.status(pid)["last_outcome"] == "succeeded"
        first = scheduler.status(pid)["last_success"]["version"]
        assert scheduler.schedule(pid, "ANNOTATION_CREATED")["action"] == "queued"
        assert wait_until(lambda: records.read()["running_job_id"] is not None, 60, 0.01)  # the job started
        assert scheduler.schedule(pid, "ANNOTATION_CREATED")["action"] == "follow-up"
        assert records.read()["queued_since"] is not None  # written when the event arrived, not when it runs
        assert scheduler.wait_idle(500)
        status = scheduler.status(pid)
    finally:
        scheduler.close()
    assert status["counts"]["succeeded"] == 3, status
    superseded, last = [v for v in list_versions(paths.models) if v > first]
    result = status["last_success"]["result"]
    assert status["last_success"]["version"] == last and result["tail"]["deferred"] is False
    assert "cross_validation" in result["durations_s"] and "disagreements" in result["durations_s"]
    client = LabelStudioClient(label_studio.url, label_studio.admin.token)
    counts = model_version_counts(client, pid)
    assert counts.get(superseded, 0) == 0 and counts[last] == 18 - len(labels), counts  # never pre-annotated
    assert read_calibration(paths).model_version == last  # the deferred job recorded no calibration
    manifest = load_live(paths.models).manifest
    pulled = datetime.fromisoformat(manifest.extra["pull"]["started_at"])
    assert pulled <= datetime.fromisoformat(manifest.created.replace("Z", "+00:00"))  # what "includes" rests on

    # a pre-annotation run stops at its next chunk when a training waits: that training's version replaces it
    jobs.use_settings(_fast_settings(tmp_path, label_studio, prelabel=False))
    newest = jobs.train_project(pid, str(tmp_path))["version"]
    records.mark_queued("ANNOTATION_CREATED")
    stopped = run_prelabel(settings, paths)
    assert stopped["status"] == "superseded" and stopped["created"] == 0
    assert model_version_counts(client, pid).get(newest, 0) == 0
    records.clear_queued()
    assert run_prelabel(settings, paths)["status"] == "done"
    assert model_version_counts(client, pid)[newest] == 18 - len(labels)


def test_interrupted_pretraining_resumes_in_the_same_run_directory(tmp_path: Path) -> None:
    paths = ProjectPaths(tmp_path, 1)
    first = pending_run(paths)
    assert first.parent == paths.pretrain_runs and first.name.startswith("run-")
    assert pending_run(paths) == first  # a crashed pretraining is resumed where it stopped
    pending_run(paths, clear=True)
    assert not paths.pretrain_pending.exists()
