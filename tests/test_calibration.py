"""When a retrain may publish with the last calibration temperature (ml_backend.training.calibration)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ml_backend.paths import ProjectPaths
from ml_backend.training.calibration import (
    decide_reuse,
    label_digests,
    read_calibration,
    write_calibration,
)

PAIRS = [(f"{i:064x}", ("wild", "bear") if i % 2 else ("pet", "cat")) for i in range(100)]


def test_record_round_trip_and_unreadable_record(tmp_path: Path) -> None:
    paths = ProjectPaths(tmp_path, 1)
    assert read_calibration(paths) is None
    written = write_calibration(paths, 1.7, {"path_accuracy": 0.9}, "enc1", "v1", label_digests(PAIRS))
    assert read_calibration(paths) == written and written.n_labelled == 100 and written.at
    paths.calibration.write_text("{not json")
    assert read_calibration(paths) is None  # logged; the next retrain cross-validates first


def test_reuse_only_for_the_same_encoder_and_small_changes(tmp_path: Path) -> None:
    record = write_calibration(ProjectPaths(tmp_path, 1), 1.2, {}, "enc1", "v1", label_digests(PAIRS))
    same = decide_reuse(record, "enc1", label_digests(PAIRS), 0.02)
    assert same.reuse and same.changed_fraction == 0.0
    one_more = label_digests([*PAIRS, (f"{999:064x}", ("pet", "cat"))])
    assert decide_reuse(record, "enc1", one_more, 0.02).changed_fraction == pytest.approx(1 / 101)
    assert decide_reuse(record, "enc1", one_more, 0.02).reuse
    relabelled = label_digests([(h, ("bird",)) for h, _ in PAIRS[:3]] + PAIRS[3:])  # 3 of 100 relabelled
    decision = decide_reuse(record, "enc1", relabelled, 0.02)
    assert not decision.reuse and decision.changed_fraction == pytest.approx(0.06)  # a relabelled pair counts twice
    assert "changed" in decision.reason
    assert not decide_reuse(record, "enc2", label_digests(PAIRS), 0.02).reuse  # a new encoder
    assert not decide_reuse(None, "enc1", label_digests(PAIRS), 0.02).reuse
    assert not decide_reuse(record, "enc1", label_digests(PAIRS), 0.0).reuse  # switched off


def test_the_model_choice_stands_until_the_labels_grow_by_half() -> None:
    from types import SimpleNamespace

    import numpy as np

    from ml_backend.training.calibration import CalibrationRecord
    from ml_backend.training.fit import RESELECT_GROWTH, _kept_candidate
    from model.heads.candidates import CANDIDATES, FeatureSource, parse_candidates

    assert RESELECT_GROWTH == 1.5
    record = CalibrationRecord(1.2, {"model_choice": {"chosen": "pixels+linear", "n_labelled": 100}}, "enc1", "v1", 120,
                               candidate="pixels+linear")
    enc = SimpleNamespace(version="enc1")
    enabled = parse_candidates(["pixels+linear", "encoder+mlp"])
    features = {FeatureSource.PIXELS: np.zeros((1, 2)), FeatureSource.ENCODER: np.zeros((1, 2))}
    assert _kept_candidate(record, enc, enabled, features, 149) is CANDIDATES["pixels+linear"]
    assert _kept_candidate(record, enc, enabled, features, 150) is None  # compare again
    assert _kept_candidate(record, SimpleNamespace(version="enc2"), enabled, features, 120) is None
    assert _kept_candidate(record, enc, parse_candidates(["encoder+mlp"]), features, 120) is None
    assert _kept_candidate(None, enc, enabled, features, 120) is None
    older = CalibrationRecord(1.2, {"model_choice": {"chosen": "pixels+linear"}}, "enc1", "v1", 120,
                              candidate="pixels+linear")  # a record from before the choice carried its size
    assert _kept_candidate(older, enc, enabled, features, 179) is not None
    assert _kept_candidate(older, enc, enabled, features, 180) is None
