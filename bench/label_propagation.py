"""Label propagation vs the taxonomy heads as the source of pre-annotations, on animal-mnist with few labels.

For ``--per-class`` labels per animal (``--seeds`` random draws), on the embeddings of a pretrained encoder:

* ``heads``: the product's heads (``model.heads.training.fit``: per-level MLPs, 5-fold out-of-fold calibration),
  best consistent leaf path;
* ``lp k=K``: label spreading over the exact kNN graph of all 10,000 embeddings (``model.neighbors.graph.knn_graph`` +
  ``model.propagation``, alpha 0.99, weights cos^3), leaf argmax (the group is the sum over its leaves);
* ``heads+lp k=K``: the mean of the heads' calibrated leaf-path probabilities and the propagated ones.

Reported per budget: leaf and group accuracy on every unlabelled image (the truth a labeler would see), and the
same leaf accuracy estimated by cross-validation on the labelled images only, with the heads' own folds (what a
training run could use to choose the model); ``CV picks`` is how often that estimate picks the method that
really is better on the unlabelled images.

With ``--choice`` it also runs the product's model choice as a training would (``model.heads.selection.select_and_fit``
on the enabled candidates' features, ``Settings.model_candidates`` and ``Settings.cv_folds``: pixels and the
encoder's embeddings) and, on the **same folds**, the propagation models of ``model.propagation_choice`` (the held-out
fold's labels removed from the seeds, k = ``model.propagation.PROPAGATION_NEIGHBOURS``); for each
``model.propagation_choice.ChoiceRule`` it reports what the choice picks and the leaf accuracy of the pick on the
unlabelled images against the heads alone (``heads`` rule: the product before this candidate). Win / loss: the
mean paired difference over the draws exceeds its standard deviation; otherwise a tie.

Usage:
    python bench/label_propagation.py --encoder ENCODER_DIR [--embeddings-cache EMB.npy] [--per-class 2 5 10]
        [--seeds 3] [--first-seed 0] [--k 10 30] [--choice] [--out bench/results/label_propagation.txt]
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

from PIL import Image  # noqa: E402

from bench.datasets import ANIMAL_TAXONOMY, load_animal_mnist  # noqa: E402
from bench.prefix_threshold import embed  # noqa: E402
from bench.provenance import load_line  # noqa: E402
from ml_backend.settings import Settings  # noqa: E402
from model.features.pixels import PixelFeatures  # noqa: E402
from model.heads.candidates import FeatureSource, parse_candidates  # noqa: E402
from model.heads.decode import decode, full_path_log_probs  # noqa: E402
from model.heads.selection import select_and_fit  # noqa: E402
from model.heads.training import fit, heads_logits  # noqa: E402
from model.neighbors.graph import knn_graph  # noqa: E402
from model.paired_gain import GainRule  # noqa: E402
from model.propagation import PROPAGATION_NEIGHBOURS, leaf_probabilities, propagate, seed_matrix, spread  # noqa: E402
from model.propagation_choice import BLEND, PROPAGATION, ChoiceRule, blend_probabilities, choose, held_out_scores  # noqa: E402


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
    parser.add_argument("--first-seed", type=int, default=0, help="label draws first-seed .. first-seed + seeds - 1")
    parser.add_argument("--choice", action="store_true", help="also run the product's model choice with the "
                        "propagation candidates (see the module)")
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
    choice_stats: dict[tuple[int, str], list[dict[str, float | str]]] = {}
    settings = Settings.from_env(env={})
    features: dict[FeatureSource, np.ndarray] = {}
    if args.choice:
        images, _ = load_animal_mnist()
        features = {FeatureSource.PIXELS: PixelFeatures().embed([Image.fromarray(im) for im in images]),
                    FeatureSource.ENCODER: emb}
        if PROPAGATION_NEIGHBOURS not in graphs:
            graphs[PROPAGATION_NEIGHBOURS] = knn_graph(emb, PROPAGATION_NEIGHBOURS)
    seeds_run = list(range(args.first_seed, args.first_seed + args.seeds))
    for per_class in args.per_class:
        for seed in seeds_run:
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
            if args.choice:
                for rule, row in product_choice(features, graphs[PROPAGATION_NEIGHBOURS], labelled, test, truth,
                                                full_paths, settings).items():
                    choice_stats.setdefault((per_class, rule), []).append(row)
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
    if args.choice:
        text += "\n\n" + choice_table(choice_stats, args.per_class, settings)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        f"# Label propagation vs heads on animal-mnist (means ± std over {args.seeds} label draws: seeds "
        f"{seeds_run[0]}-{seeds_run[-1]})\n\n"
        f"command: python bench/label_propagation.py {' '.join(sys.argv[1:])}\n"
        f"machine: {platform.platform()}, {platform.processor() or 'cpu'}, torch threads 1; "
        f"{time.time() - start:.0f} s\n{load_line('at the end')}\n\n{text}\n")
    return 0


def product_choice(features: dict[FeatureSource, np.ndarray], graph: tuple[np.ndarray, np.ndarray],
                   labelled: np.ndarray, test: np.ndarray, truth: list[tuple[str, ...]],
                   full_paths: list[tuple[str, ...]], settings: Settings) -> dict[str, dict[str, float | str]]:
    """The product's model choice on the labelled rows, with each rule: what it picks, its leaf accuracy on ``test``."""
    t0 = time.time()
    encoded = ANIMAL_TAXONOMY.encode_many([truth[i] for i in labelled])
    selection, heads = select_and_fit({s: f[labelled] for s, f in features.items()},
                                      parse_candidates(settings.model_candidates), encoded, ANIMAL_TAXONOMY,
                                      folds=settings.cv_folds, labelled_index=labelled,
                                      rule=GainRule(settings.model_choice))
    x = np.ascontiguousarray(features[selection.chosen.features][test], dtype=np.float32)
    heads_p = np.exp(full_path_log_probs(heads_logits(heads, torch.from_numpy(x)), ANIMAL_TAXONOMY,
                                         selection.cv.temperature))  # (N_test, P_full)
    y = seed_matrix(len(truth), {int(i): [truth[i]] for i in labelled}, full_paths)
    prop, reached = leaf_probabilities(spread(*graph, y))
    served = {"heads": heads_p, PROPAGATION: prop[test].astype(np.float64),
              BLEND: blend_probabilities(heads_p, prop[test].astype(np.float64), reached[test])}
    acc = {n: float(np.mean([full_paths[c] == truth[i] for c, i in zip(p.argmax(1), test)])) for n, p in served.items()}
    scores = held_out_scores(selection.cv, graph, labelled, ANIMAL_TAXONOMY)
    heads_score = selection.scores[selection.chosen.name]
    out: dict[str, dict[str, float | str]] = {}
    for rule in ChoiceRule:
        picked = choose(heads_score, scores, rule).chosen
        out[rule.value] = {"pick": picked, "leaf": acc[picked], "heads": selection.chosen.name,
                           "cv_heads": heads_score.hf_mean, "cv_prop": scores[PROPAGATION].hf_mean,
                           "cv_blend": scores[BLEND].hf_mean, "acc_prop": acc[PROPAGATION], "acc_blend": acc[BLEND],
                           "s": time.time() - t0}
    return out


def choice_table(stats: dict[tuple[int, str], list[dict[str, float | str]]], budgets: list[int],
                 settings: Settings) -> str:
    """Per budget and rule: picks, leaf accuracy of the pick on the unlabelled images, paired difference vs heads."""
    rows = [f"Model choice of a training (MODEL_CANDIDATES {','.join(settings.model_candidates)}, CV_FOLDS "
            f"{settings.cv_folds}) with the propagation candidates on the same folds, k={PROPAGATION_NEIGHBOURS}:", "",
            "| labels/class | rule | picks (heads / propagation / blend) | leaf acc of the pick (unlabelled) | "
            "vs heads only | CV hF heads / propagation / blend | heads winner |", "|---|---|---|---|---|---|---|"]
    for per_class in budgets:
        base = [float(r["leaf"]) for r in stats[(per_class, ChoiceRule.HEADS.value)]]
        for rule in ChoiceRule:
            rs = stats[(per_class, rule.value)]
            leaf = [float(r["leaf"]) for r in rs]
            diff = np.array(leaf) - np.array(base)
            sd = float(np.std(diff, ddof=1)) if len(diff) > 1 else 0.0
            mean = float(diff.mean())
            verdict = "" if rule is ChoiceRule.HEADS else (
                f"{'tie' if abs(mean) <= sd or abs(mean) < 5e-4 else ('win' if mean > 0 else 'loss')} ({mean:+.3f})")
            picks = " / ".join(str(sum(r["pick"] == n for r in rs)) for n in ("heads", PROPAGATION, BLEND))
            cv = " / ".join(f"{np.mean([float(r[k]) for r in rs]):.3f}" for k in ("cv_heads", "cv_prop", "cv_blend"))
            winners = ", ".join(sorted({str(r["heads"]) for r in rs}))
            rows.append(f"| {per_class} | {rule.value} | {picks} | {np.mean(leaf):.3f} ± {np.std(leaf):.3f} | "
                        f"{verdict} | {cv} | {winners} |")
    always = [f"| {pc} | always {n} | | {np.mean([float(r[k]) for r in stats[(pc, 'heads')]]):.3f} | | | |"
              for pc in budgets for n, k in ((PROPAGATION, "acc_prop"), (BLEND, "acc_blend"))]
    return "\n".join(rows + always)


if __name__ == "__main__":
    raise SystemExit(main())
