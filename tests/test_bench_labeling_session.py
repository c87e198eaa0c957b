"""``bench/labeling_session.py simulate``: the session simulation at a tiny size, and its orders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bench.datasets import load_animal_mnist
from bench.labeling_session import ORDERS, Session, main
from ml_backend.settings import Settings
from model.heads.candidates import FeatureSource
from model.neighbors.graph import knn_graph


def test_quick_session_at_a_tiny_size_writes_the_table_the_curve_and_every_round(tmp_path: Path) -> None:
    out = tmp_path / "session.txt"
    assert main(["--quick", "--no-encoder", "--images", "200", "--rounds", "2", "--seeds", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert "Command: `python" in text and "Machine:" in text and "Load average at the end" in text
    for order in ORDERS:
        assert f"| 10 | {order} |" in text and f"| 20 | {order} |" in text
    assert "Goal 1" in text and "Goal 2" in text
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = json.loads(out.with_suffix(".json").read_text())
    for order in ORDERS:
        rounds = [r for r in records if r["order"] == order]
        assert [r["labels"] for r in rounds] == [0, 10, 20]
        # the heads' pick, and the propagation model when the propagation choice serves it instead
        served = {"pixels+linear", "pixels+linear / propagation", "pixels+linear / heads+propagation"}
        assert rounds[0]["chosen"] == "" and all(r["chosen"] in served for r in rounds[1:]), rounds
        assert all(0.0 <= r[k] <= 1.0 for r in rounds[1:] for k in ("next_accept", "all_accept", "all_hf"))


def test_orders_follow_task_ids_and_least_confidence() -> None:
    images, truth = load_animal_mnist()
    rows = np.arange(0, 10_000, 100)  # 100 images, 10 per animal
    features = {FeatureSource.PIXELS: np.random.default_rng(0).normal(size=(100, 8)).astype(np.float32)}
    settings = Settings.from_env(env={})
    paths = [tuple(truth[i]) for i in rows]
    graph = knn_graph(features[FeatureSource.PIXELS], 10)
    sequential = Session("sequential", 0, features, paths, settings, graph)
    assert list(sequential.next_order(None)) == list(sequential.import_order)
    sequential.labelled[sequential.import_order[:10]] = True
    assert list(sequential.next_order(None)) == list(sequential.import_order[10:])
    unsure = Session("uncertainty", 0, features, paths, settings, graph)
    unsure.labelled[:5] = True
    top = np.linspace(0.1, 0.9, 100)[::-1].copy()  # image 99 is the least confident
    order = unsure.next_order(("pixels+linear", np.zeros(100, dtype=np.int64), top, features[FeatureSource.PIXELS]))
    assert list(order) == list(range(99, 4, -1))
