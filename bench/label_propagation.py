"""Label propagation vs the taxonomy heads as the source of pre-annotations, on animal-mnist with few labels.

For ``--per-class`` labels per animal (``--seeds`` random draws), on the embeddings of a pretrained encoder:

* ``heads``: the product's heads (``model.heads.training.fit``: per-level MLPs, 5-fold out-of-fold calibration),
  best consistent leaf path;
* ``lp k=K``: label spreading over the exact kNN graph of all 10,000 embeddings (``model.neighbors.index.knn_graph`` +
  ``model.propagation``, alpha 0.99, weights cos^3), leaf argmax (the group is the sum over its leaves);
* ``heads+lp k=K``: the mean of the heads' calibrated leaf-path probabilities and the propagated ones.

Reported per budget: leaf and group accuracy on every unlabelled image (the truth a labeler would see), and the
same leaf accuracy estimated by cross-validation on the labelled images only, with the heads' own folds (what a
training run could use to choose the model); ``CV picks`` is how often that estimate picks the method that
really is better on the unlabelled images.

Usage:
    python bench/label_propagation.py --encoder ENCODER_DIR [--embeddings-cache EMB.npy] [--per-class 2 5 10]
        [--seeds 3] [--k 10 30] [--out bench/results/label_propagation.txt]
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
from bench.prefix_threshold import embed  # noqa: E402
from model.heads.decode import decode, full_path_log_probs  # noqa: E402
from model.heads.training import fit, heads_logits  # noqa: E402
from model.neighbors.index import knn_graph  # noqa: E402
from model.propagation import propagate  # noqa: E402


def accuracy(pred: list[tuple[str, ...]], truth: list[tuple[str, ...]]) -> tuple[float, float]:
    """Leaf-exact and group (first level) accuracy."""
    leaf = float(np.mean([p == t for p, t in zip(pred, truth)]))
    group = float(np.mean([p[:1] == t[:1] for p, t in zip(pred, truth)]))
    return leaf, group


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", type=Path, required=True)
    parser.add_argument("--embeddings-cache", type=Path, default=None)
    parser.add_argument("--per-class", type=int, nargs="+", default=[2, 5, 10])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--k", type=int, nargs="+", default=[10, 30])
    parser.add_argument("--out", type=Path, default=Path("bench/results/label_propagation.txt"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    emb = embed(args.encoder, args.embeddings_cache)  # (10000, D)
    _, paths = load_animal_mnist()
    truth = [tuple(p) for p in paths]
    leaves = sorted(set(truth))
    leaf_of = np.array([leaves.index(t) for t in truth])
    graphs = {}
    for k in args.k:
        t0 = time.time()
        graphs[k] = knn_graph(emb, k)
        print(f"kNN graph k={k}: {time.time() - t0:.1f} s", flush=True)
    methods = ["heads"] + [f"lp k={k}" for k in args.k] + [f"heads+lp k={k}" for k in args.k]
    full_paths, _ = ANIMAL_TAXONOMY.candidate_paths(leafs_only=True)
    to_leaf = np.array([full_paths.index(leaf) for leaf in leaves])  # our leaf order -> the heads' path order
    stats: dict[tuple[int, str], list[dict[str, float]]] = {}
    for per_class in args.per_class:
        for seed in range(args.seeds):
            rng = np.random.default_rng(seed)
            labelled = np.concatenate([rng.choice(np.flatnonzero(leaf_of == c), per_class, replace=False)
                                       for c in range(len(leaves))])
            test = np.setdiff1d(np.arange(len(truth)), labelled)
            given: list[tuple[str, ...] | None] = [None] * len(truth)
            for i in labelled:
                given[i] = truth[i]
            t0 = time.time()
            result = fit(emb, given, ANIMAL_TAXONOMY)
            test_logits = heads_logits(result.heads, torch.from_numpy(emb[test]))
            preds = decode(test_logits, ANIMAL_TAXONOMY, temperature=result.temperature)
            heads_p = np.exp(full_path_log_probs(test_logits, ANIMAL_TAXONOMY, result.temperature))[:, to_leaf]
            oof_p = np.exp(full_path_log_probs(result.oof_level_logits, ANIMAL_TAXONOMY, result.temperature))[:, to_leaf]
            oof_row = {int(i): r for r, i in enumerate(result.labelled_index)}
            leaf, group = accuracy([tuple(p.path) for p in preds], [truth[i] for i in test])
            cv = float(np.mean([tuple(p.path) == truth[i]
                                for p, i in zip(result.oof_predictions, result.labelled_index)]))
            stats.setdefault((per_class, "heads"), []).append(
                {"leaf": leaf, "group": group, "cv": cv, "s": time.time() - t0})
            folds = np.full(len(truth), -1)
            folds[result.labelled_index] = result.fold_of
            for k in args.k:
                t0 = time.time()
                seeds = np.full(len(truth), -1)
                seeds[labelled] = leaf_of[labelled]
                probs = propagate(*graphs[k], seeds, len(leaves))
                seconds = time.time() - t0
                leaf, group = accuracy([leaves[c] for c in probs[test].argmax(1)], [truth[i] for i in test])
                mixed = (probs[test] + heads_p) / 2
                mixed_leaf, mixed_group = accuracy([leaves[c] for c in mixed.argmax(1)], [truth[i] for i in test])
                hits, mixed_hits = [], []
                for f in np.unique(result.fold_of):
                    held = np.flatnonzero(folds == f)
                    fold_seeds = seeds.copy()
                    fold_seeds[held] = -1
                    fold_probs = propagate(*graphs[k], fold_seeds, len(leaves))
                    hits += list(fold_probs[held].argmax(1) == leaf_of[held])
                    oof = oof_p[[oof_row[int(i)] for i in held]]
                    mixed_hits += list(((fold_probs[held] + oof) / 2).argmax(1) == leaf_of[held])
                stats.setdefault((per_class, f"lp k={k}"), []).append(
                    {"leaf": leaf, "group": group, "cv": float(np.mean(hits)), "s": seconds})
                stats.setdefault((per_class, f"heads+lp k={k}"), []).append(
                    {"leaf": mixed_leaf, "group": mixed_group, "cv": float(np.mean(mixed_hits)), "s": seconds})
            print(f"{per_class}/class seed {seed}: " + ", ".join(
                f"{m} {stats[(per_class, m)][-1]['leaf']:.3f} (cv {stats[(per_class, m)][-1]['cv']:.3f})"
                for m in methods), flush=True)
    rows = ["| labels/class | method | leaf acc (unlabelled) | group acc | leaf acc by CV on labelled | "
            "CV picks the better | seconds |", "|---|---|---|---|---|---|---|"]
    for per_class in args.per_class:
        heads = stats[(per_class, "heads")]
        for m in methods:
            ms = stats[(per_class, m)]
            picks = "" if m == "heads" else str(sum(
                (a["cv"] > h["cv"]) == (a["leaf"] > h["leaf"]) for a, h in zip(ms, heads))) + f"/{len(ms)}"
            mean = {key: float(np.mean([x[key] for x in ms])) for key in ms[0]}
            spread = float(np.std([x["leaf"] for x in ms]))
            rows.append(f"| {per_class} | {m} | {mean['leaf']:.3f} ± {spread:.3f} | {mean['group']:.3f} | "
                        f"{mean['cv']:.3f} | {picks} | {mean['s']:.1f} |")
    text = "\n".join(rows)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        f"# Label propagation vs heads on animal-mnist (means ± std over {args.seeds} label draws)\n\n"
        f"command: python bench/label_propagation.py {' '.join(sys.argv[1:])}\n"
        f"machine: {platform.platform()}, {platform.processor() or 'cpu'}, torch threads 1; "
        f"{time.time() - start:.0f} s\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
