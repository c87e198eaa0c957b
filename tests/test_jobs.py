"""The training job: pretraining policy, skip reasons, settings hand-over, failures recorded.

The whole job against a real Label Studio server is ``test_train_project_end_to_end`` (marked e2e).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ml_backend import jobs
from ml_backend.job_records import JobRecords, read_pretrain_record, write_pretrain_record
from ml_backend.jobs import PretrainReason, decide_pretrain, labels_shortfall, lightning_device
from ml_backend.settings import Settings
from model.errors import ConfigError


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


def test_missing_live_encoder_pretrains_again() -> None:
    d = decide_pretrain(10, {"n_images": 10}, has_live_encoder=False, force=False, repretrain_fraction=0.5)
    assert d.pretrain and d.reason is PretrainReason.NO_ENCODER


def test_pretrain_record_round_trip(tmp_path: Path) -> None:
    assert read_pretrain_record(tmp_path) is None
    write_pretrain_record(tmp_path, 42, "abc123")
    record = read_pretrain_record(tmp_path)
    assert record["n_images"] == 42 and record["encoder_version"] == "abc123"
    d = decide_pretrain(62, record, has_live_encoder=True, force=False, repretrain_fraction=0.5)
    assert not d.pretrain and decide_pretrain(63, record, True, False, 0.5).pretrain


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


def test_data_fingerprint_ignores_order_and_sees_changes() -> None:
    a = [("h1", ("A", "B")), ("h2", ("C",))]
    assert jobs.data_fingerprint(a) == jobs.data_fingerprint(list(reversed(a)))
    assert jobs.data_fingerprint(a) != jobs.data_fingerprint([("h1", ("A", "B")), ("h2", ("D",))])


def test_worker_settings_reach_the_job(tmp_path: Path) -> None:
    jobs.use_settings(Settings.from_env(env={}, device="cpu", min_labels_to_train=9))
    s = jobs.job_settings(str(tmp_path))
    assert s.device == "cpu" and s.min_labels_to_train == 9 and s.model_dir == tmp_path


def test_job_without_label_studio_connection_fails_with_reason_recorded(tmp_path: Path) -> None:
    jobs.use_settings(Settings.from_env(env={}))  # no LABEL_STUDIO_URL, nothing remembered from /setup
    with pytest.raises(ConfigError) as err:
        jobs.train_project(3, str(tmp_path))
    record = JobRecords(tmp_path / "project-3", 3).read()
    assert record["last_outcome"] == "failed" and record["last_failure"]["reason"] == str(err.value)
    assert "LABEL_STUDIO_URL" in record["last_failure"]["reason"]
    assert record["running_job_id"] is None and record["counts"]["failed"] == 1
    assert record["last_failure"]["job_id"].startswith("local-3-")


def test_job_against_unreachable_label_studio_is_recorded(tmp_path: Path) -> None:
    from tests.servers import free_port

    url = f"http://127.0.0.1:{free_port()}"
    jobs.use_settings(Settings.from_env(env={}, label_studio_url=url, label_studio_api_key="0123456789abcdef"))
    with pytest.raises(Exception):
        jobs.train_project(4, str(tmp_path))
    record = JobRecords(tmp_path / "project-4", 4).read()
    assert record["last_outcome"] == "failed" and "127.0.0.1" in record["last_failure"]["reason"]
