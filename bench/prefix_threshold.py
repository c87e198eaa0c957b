"""Where should a ``leafsOnly=false`` suggestion stop? PREFIX_THRESHOLD measured on animal-mnist with few labels.

With ``leafsOnly=false`` the backend suggests the deepest prefix of the best path whose calibrated marginal reaches
``PREFIX_THRESHOLD``. With few labels the leaf marginals are low, so a high threshold stops at the group level
(``wild`` instead of ``wild / Zebra``): the labeler then picks the leaf anyway, exactly as after a wrong leaf
suggestion, and a right leaf suggestion would have saved that click. This script measures, for thresholds from
0.1 to 0.9 and for a per-project threshold chosen on the out-of-fold (cross-validated) predictions for a target
leaf precision:

* ``group-only``: share of suggestions that stop at the group level;
* ``leaf right``: share accepted unchanged (leaf-exact: the labeler does nothing);
* ``leaf wrong``: share of leaf suggestions that are wrong (the labeler changes the leaf);
* ``leaf precision``: right / (right + wrong) among leaf suggestions.

Data: animal-mnist (10 animals under 3 groups, ``bench/datasets.py``), embeddings of a given pretrained encoder
(``taxomoco pretrain`` output), ``--per-class`` labels per animal drawn at random (``--seeds`` draws), heads fit
with the product's 5-fold calibrated ``fit``; every other image is the test set.

Usage:
    python bench/prefix_threshold.py --encoder ENCODER_DIR [--per-class 2 5 10] [--seeds 3]
        [--target-precision 0.5] [--out bench/results/prefix_threshold.txt]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: run from anywhere

from bench.datasets import ANIMAL_TAXONOMY, load_animal_mnist  # noqa: E402
from ml_backend.encoder_dir import load_encoder  # noqa: E402
from model.encoder.backbone import build_backbone  # noqa: E402
from model.encoder.embedder import Embedder  # noqa: E402
from model.heads.decode import decode  # noqa: E402
from model.heads.training import fit, heads_logits  # noqa: E402

GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def embed(encoder_dir: Path, cache: Path | None) -> np.ndarray:
    """Embeddings ``(10000, D)`` of animal-mnist with the encoder (cached in ``cache`` when given)."""
    if cache is not None and cache.is_file():
        return np.load(cache)
    cfg, state, _ = load_encoder(encoder_dir)
    backbone = build_backbone(cfg)
    backbone.load_state_dict(state)
    images, _ = load_animal_mnist()
    emb = Embedder(backbone, cfg, device="cpu", batch_size=256).embed(list(images))
    if cache is not None:
        np.save(cache, emb)
    return emb


def outcome(preds: list, truth: list[tuple[str, ...]]) -> dict[str, float]:
    """Shares of group-only, right-leaf and wrong-leaf suggestions, and leaf precision."""
    group = sum(len(p.path) < 2 for p in preds)
    right = sum(len(p.path) == 2 and tuple(p.path) == t for p, t in zip(preds, truth))
    wrong = len(preds) - group - right
    n = len(preds)
    return {"group-only": group / n, "leaf right": right / n, "leaf wrong": wrong / n,
            "leaf precision": right / max(1, right + wrong)}


def oof_threshold(result, truth_paths: list[tuple[str, ...]], target: float) -> float:
    """The lowest leaf threshold whose out-of-fold leaf precision reaches ``target`` (1.0 when none does)."""
    preds = result.oof_predictions
    if not preds:
        return 1.0
    leaf_p = np.array([p.level_scores[-1] for p in preds])
    right = np.array([tuple(p.path) == truth_paths[i] for p, i in zip(preds, result.labelled_index)])
    for t in sorted(set(np.round(np.linspace(0.05, 0.95, 19), 2))):
        shown = leaf_p >= t
        if shown.any() and right[shown].mean() >= target:
            return float(t)
    return 1.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", type=Path, required=True)
    parser.add_argument("--per-class", type=int, nargs="+", default=[2, 5, 10])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--target-precision", type=float, default=0.5)
    parser.add_argument("--embeddings-cache", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench/results/prefix_threshold.txt"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    emb = embed(args.encoder, args.embeddings_cache)
    _, paths = load_animal_mnist()
    truth = [tuple(p) for p in paths]
    leaves = sorted(set(truth))
    rows: list[str] = []
    header = "| labels/class | threshold | group-only | leaf right (accepted) | leaf wrong | leaf precision |"
    rows += [header, "|---|---|---|---|---|---|"]
    summary: dict[tuple[int, str], list[dict[str, float]]] = {}
    for per_class in args.per_class:
        for seed in range(args.seeds):
            rng = np.random.default_rng(seed)
            labelled = np.concatenate([rng.choice([i for i, t in enumerate(truth) if t == leaf], per_class,
                                                  replace=False) for leaf in leaves])
            given = [None] * len(truth)
            for i in labelled:
                given[i] = truth[i]
            result = fit(emb, given, ANIMAL_TAXONOMY)
            test = np.setdiff1d(np.arange(len(truth)), labelled)
            logits = heads_logits(result.heads, torch.from_numpy(emb[test]))
            chosen = oof_threshold(result, truth, args.target_precision)
            for t in (*GRID, ("oof", chosen)):
                name, value = (f"{t:.1f}", t) if not isinstance(t, tuple) else (f"OOF ({args.target_precision:g})", t[1])
                preds = decode(logits, ANIMAL_TAXONOMY, leafs_only=False, prefix_threshold=min(value, 1.0),
                               temperature=result.temperature)
                m = outcome(preds, [truth[i] for i in test])
                if isinstance(t, tuple):
                    m["threshold"] = value
                summary.setdefault((per_class, name), []).append(m)
    for (per_class, name), ms in summary.items():
        mean = {k: float(np.mean([m[k] for m in ms])) for k in ms[0]}
        label = name if "threshold" not in mean else f"{name}: {mean['threshold']:.2f}"
        rows.append(f"| {per_class} | {label} | {mean['group-only']:.3f} | {mean['leaf right']:.3f} | "
                    f"{mean['leaf wrong']:.3f} | {mean['leaf precision']:.3f} |")
    text = "\n".join(rows)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        f"# PREFIX_THRESHOLD on animal-mnist (means over {args.seeds} label draws)\n\n"
        f"command: python bench/prefix_threshold.py {' '.join(sys.argv[1:])}\n"
        f"machine: {platform.platform()}, {platform.processor() or 'cpu'}, torch threads 1; "
        f"{time.time() - start:.0f} s\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
