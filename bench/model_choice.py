"""The heads' model choice on few labels: which rule picks the candidate that serves best, on animal-mnist.

A training compares its candidates (``Settings.model_candidates``: pixels+linear, encoder+prototypes, encoder+mlp;
no "previous" encoder here) by cross-validated hierarchical F1 and publishes the winner
(:func:`model.heads.selection.select_and_fit`, ``Settings.cv_folds`` folds). This bench draws ``--per-class`` labels
per animal from a fixed pool of ``--pool`` animal-mnist images (10 animals in 3 groups), runs that choice, and scores
on the rest of the pool (held out: what a labeler would see pre-annotated):

* each fixed candidate (trained on all the draw's labels, decoded as served with its own CV temperature);
* the **oracle**: the candidate with the best held-out leaf accuracy on this draw;
* each rule (``model.heads.selection.pick`` on the same fold scores): ``mean`` (highest mean hF, a simpler one
  within ``TIE_MARGIN`` wins; the product before this bench), ``one-se`` (a simpler one wins unless the best one's
  paired per-fold gain over it exceeds one standard error, ``model.paired_gain``), and each of them on
  ``--repeats`` x ``cv_folds`` folds (the folds dealt again with other seeds: more cost, less noise).

Per budget and method: held-out leaf accuracy and hF (mean ± std over draws), regret (oracle leaf accuracy minus
the method's, mean), and how often the pick is worse than pixels+linear by more than 5 points of leaf accuracy.
The encoder is the product's initial encoder (``ml_backend.training.encoder.initial_encoder``: what a training
embeds with below ``PRETRAIN_MIN_IMAGES``, random weights with BatchNorm statistics recomputed on the images).
``--encoder DIR`` uses a pretrained encoder instead (``taxomoco pretrain --out DIR``, e.g. 8 CPU minutes on the 10,000
images). Choose a rule on validation draws (seeds 100-119), read test draws (200-219) once.

Usage:
    python bench/model_choice.py [--per-class 2 5 8 10] [--first-seed 100] [--seeds 20] [--pool 2000]
        [--repeats 2] [--encoder DIR] [--out bench/results/model_choice_validation.txt]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: run from anywhere

from PIL import Image  # noqa: E402

from bench.datasets import ANIMAL_TAXONOMY, animal_path, load_animal_mnist_arrays  # noqa: E402
from bench.provenance import header, load_line, write_result  # noqa: E402
from ml_backend.encoder_dir import load_encoder  # noqa: E402
from ml_backend.settings import Settings  # noqa: E402
from ml_backend.training.encoder import Encoder, initial_encoder  # noqa: E402
from ml_backend.training.images import ProjectImages  # noqa: E402
from model.encoder.backbone import build_backbone  # noqa: E402
from model.encoder.embedder import Embedder  # noqa: E402
from model.evaluation import hierarchical_prf, true_paths  # noqa: E402
from model.features.pixels import PixelFeatures  # noqa: E402
from model.heads.candidates import FeatureSource, parse_candidates  # noqa: E402
from model.heads.decode import decode  # noqa: E402
from model.heads.selection import CandidateScore, pick, select, select_and_fit  # noqa: E402
from model.heads.training import heads_logits  # noqa: E402
from model.paired_gain import GainRule  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"


def pool_features(pool: np.ndarray, images: np.ndarray, settings: Settings, encoder_dir: Path | None
                  ) -> dict[FeatureSource, np.ndarray]:
    """Pixels and the encoder's embeddings ``(P, D)`` of the pool's images (PNG files written once): the initial
    encoder, or the one saved in ``encoder_dir`` (``taxomoco pretrain --out``)."""
    folder = OUT / "animal-mnist-pool"
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in pool:
        target = folder / f"animal-{i:05d}.png"
        if not target.exists():
            Image.fromarray(images[i]).save(target)
        files.append(target)
    t0 = time.time()
    if encoder_dir is None:
        encoder = initial_encoder(settings, ProjectImages([int(i) for i in pool], [str(i) for i in pool], files, {}))
    else:
        encoder = Encoder(*load_encoder(encoder_dir))
    backbone = build_backbone(encoder.cfg)
    backbone.load_state_dict(encoder.state)
    emb = Embedder(backbone, encoder.cfg, device="cpu", batch_size=256).embed([str(f) for f in files])  # (P, D)
    print(f"encoder {encoder_dir or 'initial'} {encoder.cfg.arch.value} input {encoder.cfg.input_size}: "
          f"{time.time() - t0:.0f} s", flush=True)
    pixels = PixelFeatures().embed([Image.fromarray(images[i]) for i in pool])  # (P, D_pix)
    return {FeatureSource.PIXELS: pixels, FeatureSource.ENCODER: emb}


def merged(scores: list[dict[str, CandidateScore]]) -> dict[str, CandidateScore]:
    """Each candidate's fold scores over several fold deals, concatenated (paired across candidates)."""
    out = {}
    for name in scores[0]:
        folds = [x for s in scores for x in s[name].fold_hf]
        out[name] = CandidateScore(name, float(np.mean(folds)), float(np.std(folds)), folds, 0.0, 0.0)
    return out


def one_draw(features: dict[FeatureSource, np.ndarray], labels: np.ndarray, per_class: int, seed: int,
             settings: Settings, repeats: int) -> dict[str, dict[str, float | str]]:
    """Held-out leaf accuracy and hF of every fixed candidate, the oracle, and each rule's pick on one draw."""
    rng = np.random.default_rng(seed)
    labelled = np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
                               for c in range(int(labels.max()) + 1)])
    test = np.setdiff1d(np.arange(len(labels)), labelled)
    tax = ANIMAL_TAXONOMY
    encoded = tax.encode_many([animal_path(int(labels[i])) for i in labelled])
    test_truth = true_paths(tax.encode_many([animal_path(int(labels[i])) for i in test]), tax)
    candidates = [c for c in parse_candidates(settings.model_candidates) if c.features in features]
    feats = {s: f[labelled] for s, f in features.items()}
    t0 = time.perf_counter()
    selection, _ = select_and_fit(feats, candidates, encoded, tax, folds=settings.cv_folds, labelled_index=labelled,
                                  rule=GainRule(settings.model_choice))
    seconds = time.perf_counter() - t0
    deals = [selection.scores] + [select(feats, candidates, encoded, tax, folds=settings.cv_folds, seed=r).scores
                                  for r in range(1, repeats)]
    out: dict[str, dict[str, float | str]] = {}
    num_classes = [tax.num_classes(k) for k in range(tax.depth)]
    for c in candidates:
        heads = c.train(feats[c.features], encoded, num_classes)
        logits = heads_logits(heads, torch.from_numpy(np.ascontiguousarray(features[c.features][test])))
        preds = [tuple(p.path) for p in decode(logits, tax, temperature=selection.cvs[c.name].temperature)]
        leaf = float(np.mean([p == t for p, (t, _) in zip(preds, test_truth)]))
        hf = float(hierarchical_prf([t for t, _ in test_truth], preds, [x for _, x in test_truth])["hF"])
        out[c.name] = {"leaf": leaf, "hF": hf, "pick": c.name}
    oracle = max(candidates, key=lambda c: (float(out[c.name]["leaf"]), -c.rank)).name
    out["oracle"] = {**out[oracle], "pick": oracle}
    for reps, scores in ((1, deals[0]), (repeats, merged(deals))):
        for rule in GainRule:
            name = f"{rule.value} {reps}x{settings.cv_folds} folds"
            chosen, _ = pick(candidates, scores, rule)
            out[name] = {**out[chosen.name], "pick": chosen.name}
    product = f"{settings.model_choice} 1x{settings.cv_folds} folds"  # the product's pick on its defaults
    assert out[product]["pick"] == selection.chosen.name, (out[product], selection.reason)
    out["_seconds"] = {"select_and_fit": seconds, "leaf": 0.0, "hF": 0.0, "pick": ""}
    return out


def table(results: dict[int, list[dict[str, dict[str, float | str]]]], methods: list[str]) -> list[str]:
    rows = ["| labels/class | method | leaf acc (held out) | hF | regret vs oracle | worse than pixels+linear "
            "by > 5 pts | picks |", "|---|---|---|---|---|---|---|"]
    for per_class, draws in results.items():
        for m in methods:
            leaf = np.array([float(d[m]["leaf"]) for d in draws])
            hf = np.array([float(d[m]["hF"]) for d in draws])
            regret = np.array([float(d["oracle"]["leaf"]) - float(d[m]["leaf"]) for d in draws])
            worse = sum(float(d["pixels+linear"]["leaf"]) - float(d[m]["leaf"]) > 0.05 for d in draws)
            picks: dict[str, int] = {}
            for d in draws:
                picks[str(d[m]["pick"])] = picks.get(str(d[m]["pick"]), 0) + 1
            pick_text = ", ".join(f"{k} {v}" for k, v in sorted(picks.items(), key=lambda kv: -kv[1]))
            rows.append(f"| {per_class} | {m} | {leaf.mean():.3f} ± {leaf.std():.3f} | {hf.mean():.3f} ± {hf.std():.3f} "
                        f"| {regret.mean():.3f} ± {regret.std():.3f} | {worse}/{len(draws)} | {pick_text} |")
        secs = [float(d["_seconds"]["select_and_fit"]) for d in draws]
        rows.append(f"| {per_class} | (select_and_fit seconds, 1x folds) | {np.mean(secs):.2f} ± {np.std(secs):.2f} "
                    "| | | | |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, nargs="+", default=[2, 5, 8, 10])
    parser.add_argument("--first-seed", type=int, default=100, help="draws first-seed .. first-seed + seeds - 1")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--pool", type=int, default=2000, help="images drawn from and scored on (seed 0 subset)")
    parser.add_argument("--repeats", type=int, default=2, help="fold deals of the repeated-folds rules")
    parser.add_argument("--encoder", type=Path, default=None, help="a pretrained encoder directory (taxomoco "
                        "pretrain --out) instead of the initial encoder")
    parser.add_argument("--out", type=Path, default=Path("bench/results/model_choice_validation.txt"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    lines = header("Heads' model choice on few labels: rules vs fixed candidates vs oracle (animal-mnist, "
                   f"{'encoder ' + str(args.encoder) if args.encoder else 'initial encoder'})")
    settings = Settings.from_env(env={})
    images, labels = load_animal_mnist_arrays()
    pool = np.sort(np.random.default_rng(0).choice(len(labels), args.pool, replace=False))
    features = pool_features(pool, images, settings, args.encoder)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    results: dict[int, list[dict[str, dict[str, float | str]]]] = {}
    for per_class in args.per_class:
        for seed in seeds:
            draw = one_draw(features, labels[pool], per_class, seed, settings, args.repeats)
            results.setdefault(per_class, []).append(draw)
            print(f"{per_class}/class seed {seed}: " + ", ".join(
                f"{m} {float(v['leaf']):.3f} ({v['pick']})" for m, v in draw.items() if not m.startswith("_")),
                flush=True)
    methods = [m for m in results[args.per_class[0]][0] if not m.startswith("_")]
    lines += [f"Product defaults: MODEL_CANDIDATES={','.join(settings.model_candidates)}, CV_FOLDS={settings.cv_folds}, "
              f"MODEL_CHOICE={settings.model_choice} (its pick is the row '{settings.model_choice} 1x{settings.cv_folds} "
              "folds'), "
              f"HeadsConfig(); pool {args.pool} images (seed 0), draws: seeds {seeds[0]}-{seeds[-1]}, labels/class "
              f"{args.per_class}; held out = the rest of the pool. torch threads 1; {time.time() - start:.0f} s.", ""]
    lines += table(results, methods)
    lines += ["", load_line("at the end"), ""]
    write_result(args.out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
