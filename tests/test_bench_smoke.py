"""bench/ssl_vs_baseline.py: its protocol (splits, budgets, metrics, verdicts), the rendered shapes dataset, and
a --quick run of the whole script on both datasets, so the benchmark cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.datasets import ANIMAL_TAXONOMY
from bench.shapes import SHAPES_TAXONOMY, load_shapes
from bench.ssl_protocol import Budget, labelled_subset, scores, split, verdict

ROOT = Path(__file__).resolve().parents[1]


def test_split_keeps_duplicates_on_one_side_and_is_stratified() -> None:
    leaf = np.repeat(np.arange(4), 50)  # 4 classes x 50
    groups = np.arange(200)
    groups[1] = groups[0]  # a duplicate pair in class 0
    groups[51] = groups[50]  # and in class 1
    s = split(leaf, groups, 0.2, 0.1, seed=0)
    parts = [set(s.test), set(s.validation), set(s.pool)]
    assert sum(map(len, parts)) == 200 and not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    for a, b in ((0, 1), (50, 51)):
        assert [a in p for p in parts] == [b in p for p in parts]
    for c in range(4):
        assert 9 <= int((leaf[s.test] == c).sum()) <= 11 and 4 <= int((leaf[s.validation] == c).sum()) <= 6
    again = split(leaf, groups, 0.2, 0.1, seed=0)
    assert np.array_equal(s.test, again.test) and np.array_equal(s.pool, again.pool)


def test_budgets_are_nested_stratified_and_drawn_from_the_pool() -> None:
    leaf = np.repeat(np.arange(5), 40)
    s = split(leaf, np.arange(200), 0.2, 0.1)
    assert Budget(2).counts(5, 200, seed=0).tolist() == [2] * 5 and Budget(2).name == "2/class"
    share = Budget(share=0.06).counts(5, 200, seed=0)  # 12 labels over 5 classes
    assert share.sum() == 12 and set(share.tolist()) == {2, 3} and Budget(share=0.05).name == "5 %"
    small = labelled_subset(leaf, s.pool, np.full(5, 2), seed=3)
    large = labelled_subset(leaf, s.pool, np.full(5, 10), seed=3)
    assert set(small) <= set(large) <= set(s.pool)
    assert np.bincount(leaf[small]).tolist() == [2] * 5 and np.bincount(leaf[large]).tolist() == [10] * 5
    assert not np.array_equal(labelled_subset(leaf, s.pool, np.full(5, 2), seed=4), small)


def test_scores_and_verdicts() -> None:
    cow, horse, bear = ("farm", "Cow"), ("farm", "Horse"), ("wild", "Bear")
    assert scores([cow, horse], [cow, horse], ANIMAL_TAXONOMY) == {"hF": 1.0, "leaf_f1": 1.0}
    s = scores([cow, horse, bear, bear], [cow, cow, bear, cow], ANIMAL_TAXONOMY)
    assert s["hF"] == pytest.approx(5 / 8)  # prefixes shared: 2 + 1 + 2 + 0 of 8
    assert s["leaf_f1"] == pytest.approx((1 / 2 + 0 + 2 / 3) / 3)  # Cow P 1/3 R 1, Horse 0, Bear P 1 R 1/2
    assert verdict([0.80, 0.82, 0.81], [0.70, 0.71, 0.72])[0] == "win"
    assert verdict([0.70, 0.71, 0.72], [0.80, 0.82, 0.81])[0] == "miss"
    assert verdict([0.80, 0.70, 0.90], [0.79, 0.72, 0.86])[0] == "tie"  # +0.007 within a spread of 0.03
    assert verdict([0.802], [0.800])[0] == "tie"


def test_rendered_shapes_have_three_levels_colour_and_vary() -> None:
    images, paths = load_shapes(per_leaf=3, size=64, seed=1)
    assert images.shape == (54, 64, 64, 3) and images.dtype == np.uint8
    assert [SHAPES_TAXONOMY.num_classes(k) for k in range(3)] == [3, 6, 18]
    assert SHAPES_TAXONOMY.encode_many(paths).shape == (54, 3)
    assert np.abs(images[..., 0].astype(int) - images[..., 1]).mean() > 10  # colour, not grey
    assert len({im.tobytes() for im in images}) == 54
    again, _ = load_shapes(per_leaf=3, size=64, seed=1)
    assert np.array_equal(images, again)


@pytest.mark.timeout(900)
def test_quick_run_writes_every_method_budget_and_the_settings(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PRETRAIN_", "ENCODER_", "MODEL_", "CV_"))}
    env.update(PYTHONPATH=str(ROOT), TORCH_THREADS="1")
    out = tmp_path / "quick"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "ssl_vs_baseline.py"), "--quick", "--out", str(out),
                           "--work", str(tmp_path / "work")], env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.with_suffix(".json").read_text())
    assert results["settings_changed"]["PRETRAIN_MAX_MINUTES"] == "0.1"
    assert [d["dataset"] for d in results["datasets"]] == ["animal-mnist", "shapes"]
    for d in results["datasets"]:
        assert d["pretraining"]["0"]["pretrained"] is True and d["pretraining"]["0"]["steps_done"] > 0
        got = {(r["method"], r["budget"]) for r in d["rows"]}
        assert got == {(m, b) for m in ("ours", "pixels+logreg", "pixels+knn", "random-init+heads", "supervised-cnn")
                       for b in ("2/class", "5 %")}
        for r in d["rows"]:
            assert 0.0 < r["hF"] <= 1.0 and 0.0 <= r["leaf_f1"] <= 1.0
        chosen = {r["choice"]["chosen"] for r in d["rows"] if r["method"] == "ours"}
        assert chosen <= {"pixels+linear", "encoder+prototypes", "encoder+mlp"}
        cnn = [r["choice"] for r in d["rows"] if r["method"] == "supervised-cnn"]
        assert all(c["stopped_by"] in {"early stopping", "wall-clock cap", "max_steps"} for c in cnn)
    text = out.with_suffix(".txt").read_text()
    assert "public settings changed from their defaults" in text and "PRETRAIN_MAX_MINUTES" in text
    assert "| budget | labels | ours |" in text and "Goal 1" in text and "Goal 2" in text
    assert out.with_suffix(".png").stat().st_size > 10_000
