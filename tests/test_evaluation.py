"""Metrics: per-level scores against scikit-learn, hierarchical P/R/F by hand, calibration against a loop."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from model.errors import DataError
from model.evaluation import calibration, evaluate, hierarchical_prf, level_metrics
from model.taxonomy import IGNORE, Taxonomy

TAX = Taxonomy.from_nested({"A": ["a1", "a2"], "B": ["b1", "b2"], "C": None})


def test_level_metrics_match_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, 200)
    y_pred = np.where(rng.random(200) < 0.7, y_true, rng.integers(0, 4, 200))
    y_pred[y_pred == 3] = 2  # class 3 never predicted: its precision is 0 by convention
    y_true_ign = y_true.copy()
    y_true_ign[:20] = IGNORE
    m = level_metrics(y_true_ign, y_pred, ["w", "x", "y", "z"])
    t, p = y_true[20:], y_pred[20:]
    prec, rec, f1, sup = precision_recall_fscore_support(t, p, labels=[0, 1, 2, 3], zero_division=0)
    assert m["n"] == 180 and m["accuracy"] == pytest.approx(accuracy_score(t, p))
    assert m["macro"]["f1"] == pytest.approx(f1.mean()) and m["macro"]["precision"] == pytest.approx(prec.mean())
    assert m["per_class"]["z"]["recall"] == pytest.approx(rec[3]) and m["per_class"]["z"]["support"] == sup[3]
    assert m["confusion"] == confusion_matrix(t, p, labels=[0, 1, 2, 3]).tolist()


def test_hierarchical_prf_by_hand() -> None:
    true = [("A", "a1"), ("A",), ("C",), ("B", "b1")]
    pred = [("A", "a2"), ("A", "a1"), ("B", "b2"), ("B", "b1")]
    partial = [False, True, False, False]
    # inter: {A}=1, {A} (pred cut to depth 1)=1, 0, 2 -> 4; |pred| 2+1+2+2 = 7; |true| 2+1+1+2 = 6
    h = hierarchical_prf(true, pred, partial)
    assert h["hP"] == pytest.approx(4 / 7) and h["hR"] == pytest.approx(4 / 6)
    assert h["hF"] == pytest.approx(2 * (4 / 7) * (4 / 6) / (4 / 7 + 4 / 6))


def reference_ece(conf: np.ndarray, correct: np.ndarray, bins: int) -> float:
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        m = [(lo < c <= hi) or (b == 0 and c == 0) for c in conf]
        m = np.array(m)
        if m.any():
            total += m.sum() / len(conf) * abs(conf[m].mean() - correct[m].mean())
    return total


def test_calibration_matches_loop_and_is_small_when_calibrated() -> None:
    rng = np.random.default_rng(1)
    conf = rng.random(5000)
    correct = (rng.random(5000) < conf).astype(float)  # calibrated by construction
    cal = calibration(conf, correct, 10)
    assert cal["ece"] == pytest.approx(reference_ece(conf, correct, 10))
    assert cal["ece"] < 0.03
    assert sum(b["count"] for b in cal["bins"]) == 5000
    over = calibration(np.clip(conf + 0.3, 0, 1), correct, 10)
    assert over["ece"] > 0.2


def perfect_logits(targets: np.ndarray, taxonomy: Taxonomy) -> list[np.ndarray]:
    out = []
    for k in range(taxonomy.depth):
        a = np.full((len(targets), taxonomy.num_classes(k)), -4.0)
        for i, t in enumerate(targets[:, k]):
            if t != IGNORE:
                a[i, t] = 4.0
        out.append(a)
    return out


def test_evaluate_end_to_end_is_json_and_skips_unlabelled() -> None:
    paths = [("A", "a1"), ("A", "a2"), ("B", "b1"), ("C",), ("B",), ("B", "b2")]
    targets = TAX.encode_many(paths)
    logits = perfect_logits(targets, TAX)
    logits[1][4, TAX.node(("B", "b2")).index] = 4.0  # the prefix row: any B child is fine
    m = evaluate(logits, targets, TAX)
    json.dumps(m)
    assert m["n"] == 6 and m["path_accuracy"] == 1.0
    assert m["hierarchical"] == {"hP": 1.0, "hR": 1.0, "hF": 1.0}
    assert m["levels"][1]["n"] == 5  # the prefix row is IGNORE at level 1
    assert m["levels"][1]["classes"][-1] == "<end>"
    # One wrong leaf: path accuracy drops, hierarchical precision keeps the right parent.
    wrong = [a.copy() for a in logits]
    wrong[1][0] = -4.0
    wrong[1][0, TAX.node(("A", "a2")).index] = 4.0
    targets_unl = np.vstack([targets, np.full((1, 2), IGNORE)])
    wrong = [np.vstack([a, np.zeros((1, a.shape[1]))]) for a in wrong]
    m2 = evaluate(wrong, targets_unl, TAX)
    assert m2["n"] == 6 and m2["path_accuracy"] == pytest.approx(5 / 6)
    assert m2["hierarchical"]["hP"] == pytest.approx(9 / 10)
    assert m2["levels"][0]["accuracy"] == 1.0 and m2["levels"][1]["accuracy"] == pytest.approx(4 / 5)
    with pytest.raises(DataError, match="No labelled"):
        evaluate([a[-1:] for a in wrong], targets_unl[-1:], TAX)
    with pytest.raises(DataError, match="aligned"):
        evaluate(wrong, targets, TAX)


def test_write_report_files(tmp_path) -> None:
    from PIL import Image

    from model.report import write_report

    rng = np.random.default_rng(3)
    paths = [leaf.path for leaf in TAX.leaves()] * 8
    targets = TAX.encode_many(paths)
    logits = [a + rng.normal(size=a.shape) * 3 for a in perfect_logits(targets, TAX)]
    metrics = evaluate(logits, targets, TAX)
    loss_csv = tmp_path / "loss.csv"
    loss_csv.write_text("epoch,step,loss\n" + "".join(f"{s // 10},{s},{6 - s / 20}\n" for s in range(40)))
    curve = [(n, evaluate([a[:n] for a in logits], targets[:n], TAX)) for n in (10, 20, 40)]
    page = write_report(tmp_path / "rep", metrics, TAX, loss_csv=loss_csv, label_curve=curve)
    names = sorted(p.name for p in page.parent.iterdir())
    assert names == ["confusion_level0.png", "confusion_level1.png", "label_curve.png", "pretrain_loss.png",
                     "reliability.png", "report.html", "report.json"]
    for png in page.parent.glob("*.png"):
        with Image.open(png) as im:
            assert im.size[0] > 100
    text = page.read_text()
    assert text.count("data:image/png;base64,") == 5 and "a1" in text and "path accuracy" in text
    data = json.loads((page.parent / "report.json").read_text())
    assert data["metrics"]["n"] == 40 and [p["n_labels"] for p in data["label_curve"]] == [10, 20, 40]
    # Without optional inputs only the metric plots are written.
    bare = write_report(tmp_path / "bare", metrics, TAX)
    assert sorted(p.name for p in bare.parent.glob("*.png")) == ["confusion_level0.png", "confusion_level1.png",
                                                                "reliability.png"]
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="epoch,step,loss"):
        write_report(tmp_path / "x", metrics, TAX, loss_csv=bad)
