"""Is the product, on its defaults, better than simple baselines with few labels? Two datasets, three seeds.

**Ours** is what the product serves, built through its public API from ``Settings.from_env()`` (only public
settings changed, each printed with the results): the encoder pretrained by ``model.ssl.pretrain.pretrain`` with
the configs of ``ml_backend.configs`` (recipe chosen from the images, run fitted to ``PRETRAIN_MAX_MINUTES``;
a dataset under ``PRETRAIN_MIN_IMAGES`` starts from the initial encoder, as the product does), embeddings from
the product's ``Embedder``, and the product's model choice (``model.heads.selection.select_and_fit``, the call
``ml_backend/training/fit.py`` makes: the ``MODEL_CANDIDATES`` cross-validated with ``CV_FOLDS`` folds on the
labelled images only, the best fitted on all of them), decoded with its calibrated temperature.
The pretraining seed is the public ``PRETRAIN_SEED``; each seed also draws its own labelled subsets.

**Baselines** (``bench/ssl_baselines.py``): pixels + logistic regression, kNN on pixels, the random-init encoder
with the same BatchNorm recalibration + heads, and a supervised CNN with early stopping and a wall-clock cap
of at least MoCo's pretraining time. Each makes its choices (C, k, representation, head, stopping step) on a
labelled validation split that ours never sees (this favours the baselines).

**Protocol** (``bench/ssl_protocol.py``): duplicates grouped, then per leaf class 20 % test, 10 % validation,
70 % train pool; label budgets 1, 2, 5, 10 per leaf class and 1 %, 5 %, 10 % of the dataset, drawn from the
pool (nested per seed; a budget that gives the same subset as another is computed once and listed as such).
Pretraining sees the non-test images without labels. The test split is read once per method, budget and
seed, after every choice is made. Metrics: hierarchical F1 of full paths and leaf macro-F1, mean ± std over
seeds; ours vs the best baseline is a win / miss only beyond the spread of the per-seed differences.

**Datasets**:

- ``animal-mnist`` (``bench/datasets.py``): 10,000 real 28×28 grayscale silhouettes, 3 groups / 10 animals.
- ``shapes`` (``bench/shapes.py``): 4,500 procedurally rendered 64×64 colour images, 3 families / 6 shapes /
  18 shape-and-fill leaves, random colours, backgrounds, positions, sizes and rotations (made offline from a
  seed: colour, larger images and three levels, unlike animal-mnist).

Usage::

    PRETRAIN_MAX_MINUTES=4 TORCH_THREADS=1 nice python bench/ssl_vs_baseline.py [--datasets animal-mnist shapes]
        [--seeds 0 1 2] [--out bench/results/ssl_vs_baseline]
    python bench/ssl_vs_baseline.py --quick            # a smoke run: tiny data and budget, one seed
    python bench/ssl_vs_baseline.py --combine A.json B.json --out bench/results/ssl_vs_baseline

Results go to ``OUT.{txt,json,png}`` (rewritten after every seed); ``--quick`` writes ``bench/out/quick.*``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path as FsPath

ROOT = FsPath(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/<script>.py` from anywhere
    sys.path.insert(0, str(ROOT))

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from bench.datasets import ANIMAL_TAXONOMY, content_groups, load_animal_mnist
from bench.shapes import SHAPES_TAXONOMY, load_shapes
from bench.ssl_baselines import CnnConfig, knn, logreg, pixel_representations, random_init_heads, supervised_cnn
from bench.ssl_protocol import Budget, labelled_subset, scores, split
from bench.ssl_report import METHODS, changed_settings, combine, machine, write_results
from ml_backend.configs import encoder_config, pretrain_config
from ml_backend.settings import Settings
from model.encoder.backbone import build_backbone
from model.encoder.batchnorm import recalibrate_batchnorm
from model.encoder.config import EncoderConfig, eval_transform
from model.encoder.embedder import Embedder
from model.features.pixels import PixelFeatures
from model.heads.candidates import FeatureSource, parse_candidates
from model.heads.decode import decode
from model.heads.heads import HeadsConfig
from model.heads.selection import select_and_fit
from model.heads.training import heads_logits
from model.images import to_rgb_image
from model.paired_gain import GainRule
from model.ssl.pretrain import pretrain
from model.ssl.recipe import summarize_images
from model.taxonomy import Path, Taxonomy

OUT_DIR = ROOT / "bench" / "out"
RESULTS = ROOT / "bench" / "results" / "ssl_vs_baseline"
BUDGETS = (Budget(1), Budget(2), Budget(5), Budget(10), Budget(share=0.01), Budget(share=0.05), Budget(share=0.10))
QUICK_BUDGETS = (Budget(2), Budget(share=0.05))
QUICK_SETTINGS = {"PRETRAIN_MAX_MINUTES": "0.1", "PRETRAIN_MIN_IMAGES": "0"}
"""Public settings ``--quick`` sets (unless set in the environment): a few seconds of pretraining on tiny data."""


@dataclass
class Dataset:
    """Images, their full paths and what every method needs about them."""

    name: str
    images: np.ndarray  # uint8 (N, H, W) or (N, H, W, 3)
    paths: list[Path]
    taxonomy: Taxonomy
    test_share: float = 0.2
    val_share: float = 0.1

    def __post_init__(self) -> None:
        leaves = [n.path for n in self.taxonomy.leaves()]
        self.leaf_paths = leaves
        pos = {p: i for i, p in enumerate(leaves)}
        self.leaf = np.array([pos[tuple(p)] for p in self.paths])  # (N,) leaf class
        self.targets = self.taxonomy.encode_many(self.paths)  # (N, L)
        self.split = split(self.leaf, content_groups(self.images), self.test_share, self.val_share)
        self.non_test = np.sort(np.concatenate([self.split.pool, self.split.validation]))

    def path_score(self, rows: np.ndarray) -> Callable[[Sequence[Path]], float]:
        """hF of predicted paths for ``rows`` (the validation split when choosing)."""
        truth = [self.paths[i] for i in rows]
        return lambda pred: scores(truth, pred, self.taxonomy)["hF"]

    def leaf_score(self, rows: np.ndarray) -> Callable[[np.ndarray], float]:
        score = self.path_score(rows)
        return lambda pred_leaf: score([self.leaf_paths[int(i)] for i in pred_leaf])


def load_dataset(name: str, quick: bool, work: FsPath) -> Dataset:
    """``animal-mnist`` (all 10,000, or 60 per animal with ``quick``) or ``shapes`` (250 per leaf, 30 quick)."""
    if name == "animal-mnist":
        images, paths = load_animal_mnist()
        if quick:
            keep = np.sort(np.concatenate([np.flatnonzero(np.array([p[1] for p in paths]) == a)[:60]
                                           for a in sorted({p[1] for p in paths})]))
            images, paths = images[keep], [paths[i] for i in keep]
        return Dataset(name, images, paths, ANIMAL_TAXONOMY)
    if name == "shapes":
        per_leaf = 30 if quick else 250
        cache = work / f"shapes-{per_leaf}x64-seed0.npz"
        if cache.exists():
            images = np.load(cache)["images"]
            paths = [leaf.path for leaf in SHAPES_TAXONOMY.leaves() for _ in range(per_leaf)]
        else:
            images, paths = load_shapes(per_leaf, 64, seed=0)
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(cache, images=images)
        return Dataset(name, images, paths, SHAPES_TAXONOMY)
    raise SystemExit(f"unknown dataset {name!r}; use animal-mnist or shapes")


# ----- ours: the product on its defaults ---------------------------------------------------------------------


def product_encoder(settings: Settings, data: Dataset, out_dir: FsPath) -> tuple[torch.nn.Module, EncoderConfig, dict]:
    """The encoder the product builds for these images (pretrained, or initial under PRETRAIN_MIN_IMAGES)."""
    unlabelled = list(data.images[data.non_test])
    summary = summarize_images(unlabelled)
    cfg = encoder_config(settings, summary)
    run_cfg = pretrain_config(settings, len(unlabelled), summary)
    start = time.perf_counter()
    backbone = build_backbone(cfg)
    info: dict = {"images": len(unlabelled), "summary": summary.to_dict(), "input_size": cfg.input_size,
                  "augment": run_cfg.augment.to_dict()}
    if len(unlabelled) < settings.pretrain_min_images:  # ml_backend.training.encoder.initial_encoder
        recalibrate_batchnorm(backbone, unlabelled, cfg, max_images=2048, batch_size=128)
        info["pretrained"] = False
    else:
        result = pretrain(unlabelled, cfg, run_cfg, out_dir, resume=False, progress=False)
        backbone.load_state_dict(result.backbone_state)
        q = result.quality
        info.update(pretrained=True, plan=result.plan.to_dict(), steps_done=result.steps_done,
                    finished_plan=result.finished_plan, learned=result.learned,
                    view_retrieval=[round(q[0].view_retrieval, 4), round(q[-1].view_retrieval, 4)] if q else None,
                    final_epoch_loss=round(result.epoch_losses[-1], 4) if result.epoch_losses else None,
                    images_per_second=round(result.images_per_second, 1))
    info["wall_seconds"] = round(time.perf_counter() - start, 1)
    return backbone, cfg, info


def ours(settings: Settings, features: dict[FeatureSource, np.ndarray], data: Dataset, train: np.ndarray,
         test: np.ndarray) -> tuple[list[Path], dict]:
    """What the product serves for ``test`` after training on ``train``'s labels: the model choice of
    ``ml_backend/training/fit.py`` (cross-validated candidates, the best fitted on all labels), decoded with
    its calibrated temperature as the predictor does."""
    selection, heads = select_and_fit({s: f[train] for s, f in features.items()},
                                      parse_candidates(settings.model_candidates), data.targets[train], data.taxonomy,
                                      folds=settings.cv_folds, heads_cfg=HeadsConfig(),
                                      rule=GainRule(settings.model_choice))
    x = torch.from_numpy(np.ascontiguousarray(features[selection.chosen.features][test]))
    preds = decode(heads_logits(heads, x), data.taxonomy, leafs_only=True, temperature=selection.cv.temperature)
    return [p.path for p in preds], {"chosen": selection.chosen.name,
                                     "cv_hF": {n: round(s.hf_mean, 4) for n, s in selection.scores.items()}}


# ----- the run -----------------------------------------------------------------------------------------------


def embed(backbone: torch.nn.Module, cfg: EncoderConfig, images: np.ndarray, device: str) -> np.ndarray:
    """Embeddings ``(N, D)`` through the product's Embedder."""
    emb = Embedder(backbone, cfg, device=device).embed(list(images))
    assert np.isfinite(emb).all(), "an image could not be embedded"
    return emb


def seed_settings(base: Settings, seed: int) -> Settings:
    return replace(base, pretrain_seed=seed)


def run_dataset(data: Dataset, base: Settings, seeds: Sequence[int], budgets: Sequence[Budget], cnn: CnnConfig,
                methods: Sequence[str], on_seed: Callable[[dict], None], work: FsPath) -> dict:
    """Every method at every budget for each seed; ``on_seed`` gets the results so far after each seed;
    pretraining runs go to ``work/<dataset>/seed<k>``."""
    s = data.split
    print(f"{data.name}: {len(data.images)} images, test {len(s.test)}, validation {len(s.validation)}, "
          f"pool {len(s.pool)}", flush=True)
    reps = pixel_representations(data.images, data.non_test)
    product_pixels = PixelFeatures().embed(list(data.images))  # (N, 798) the product's pixel candidate
    summary = summarize_images(list(data.images[data.non_test]))
    colour = not summary.grayscale
    result: dict = {"dataset": data.name, "n_images": len(data.images), "split": {
        "test": len(s.test), "validation": len(s.validation), "pool": len(s.pool)},
        "levels": [data.taxonomy.num_classes(k) for k in range(data.taxonomy.depth)], "pretraining": {}, "rows": []}
    for seed in seeds:
        settings = seed_settings(base, seed)
        backbone, cfg, pre = product_encoder(settings, data, work / data.name / f"seed{seed}")
        result["pretraining"][str(seed)] = pre
        print(f"[{data.name} seed {seed}] encoder: {json.dumps(pre)}", flush=True)
        features = {FeatureSource.ENCODER: embed(backbone, cfg, data.images, settings.device),
                    FeatureSource.PIXELS: product_pixels}
        rand_emb = None
        if "random-init+heads" in methods:
            torch.manual_seed(seed)
            rand = build_backbone(replace(cfg, init_weights=None))
            run_cfg = pretrain_config(settings, len(data.non_test), summary)
            recalibrate_batchnorm(rand, list(data.images[data.non_test]), cfg, run_cfg.bn_recalibration_images,
                                  run_cfg.batch_size)  # what pretrain() does after training
            rand_emb = embed(rand, cfg, data.images, settings.device)
        x_cnn = None
        if "supervised-cnn" in methods:
            tf = eval_transform(cfg)
            x_cnn = torch.stack([tf(to_rgb_image(im)) for im in data.images])  # (N, 3, S, S)
        cap = max(pre["wall_seconds"], 60.0 * settings.pretrain_max_minutes)
        done: dict[tuple[int, ...], str] = {}
        for budget in budgets:
            counts = budget.counts(len(data.leaf_paths), len(data.images), seed)
            same = done.get(tuple(counts))
            if same is not None:  # the same labelled subset as an earlier budget: the same numbers
                for row in [r for r in result["rows"] if r["seed"] == seed and r["budget"] == same]:
                    result["rows"].append({**row, "budget": budget.name, "same_subset_as": same})
                continue
            done[tuple(counts)] = budget.name
            train = labelled_subset(data.leaf, s.pool, counts, seed)
            for method in methods:
                t0 = time.perf_counter()
                choice: dict = {}
                if method == "ours":
                    pred, choice = ours(settings, features, data, train, s.test)
                elif method == "random-init+heads":
                    assert rand_emb is not None
                    pred, choice = random_init_heads(rand_emb, data.targets, data.taxonomy, train, s.validation,
                                                     s.test, data.path_score(s.validation))
                else:
                    val = data.leaf_score(s.validation)
                    if method == "pixels+logreg":
                        leaf, choice = logreg(reps, data.leaf, train, s.validation, s.test, val)
                    elif method == "pixels+knn":
                        leaf, choice = knn(reps, data.leaf, train, s.validation, s.test, val)
                    else:
                        assert x_cnn is not None
                        leaf, choice = supervised_cnn(x_cnn, data.leaf, len(data.leaf_paths), train, s.validation,
                                                      s.test, replace(cfg, init_weights=None), cnn, cap, colour,
                                                      seed, val)
                    pred = [data.leaf_paths[int(i)] for i in leaf]
                row = {"method": method, "budget": budget.name, "seed": seed, "labelled": int(len(train)),
                       "seconds": round(time.perf_counter() - t0, 1), "choice": choice,
                       **scores([data.paths[i] for i in s.test], pred, data.taxonomy)}
                result["rows"].append(row)
                print(f"[{data.name} seed {seed}] {budget.name:8s} {method:18s} hF {row['hF']:.3f} leaf F1 "
                      f"{row['leaf_f1']:.3f} ({row['seconds']:.0f} s) {json.dumps(choice)}", flush=True)
        on_seed(result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny data and pretraining, one seed")
    parser.add_argument("--datasets", nargs="+", default=["animal-mnist", "shapes"], choices=["animal-mnist", "shapes"])
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2; --quick: 0)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", type=FsPath, default=None, help="write OUT.{txt,json,png}")
    parser.add_argument("--work", type=FsPath, default=None,
                        help="pretraining runs and the rendered dataset (default bench/out/<OUT name>)")
    parser.add_argument("--combine", type=FsPath, nargs="+", default=None, help="merge result JSONs into one report")
    args = parser.parse_args(argv)
    if args.combine:
        write_results(combine([json.loads(p.read_text()) for p in args.combine]), args.out or RESULTS)
        return 0
    env = dict(os.environ)
    if args.quick:
        env = {**QUICK_SETTINGS, **{k: v for k, v in env.items() if v != ""}}
    base = Settings.from_env(env)
    torch.set_num_threads(base.torch_threads or torch.get_num_threads())
    # BLAS threads as many as torch's: on a loaded 2-core machine OpenBLAS's default oversubscribes and a
    # logistic regression of a few dozen rows took 8 s instead of 0.07 s (measured)
    threadpool_limits(torch.get_num_threads())
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    budgets = QUICK_BUDGETS if args.quick else BUDGETS
    cnn = CnnConfig(eval_every=5, patience=2, warmup_steps=5) if args.quick else CnnConfig()
    dest = args.out or (OUT_DIR / "quick" if args.quick else RESULTS)
    work = args.work or OUT_DIR / dest.name
    results = {"settings_changed": changed_settings(base), "seeds": seeds, "quick": args.quick,
               "cnn": dataclasses.asdict(cnn), "machine": machine(), "datasets": []}
    print(f"public settings changed from their defaults: {results['settings_changed']}", flush=True)
    for name in args.datasets:
        data = load_dataset(name, args.quick, work)
        results["datasets"].append({})

        def on_seed(res: dict) -> None:
            results["datasets"][-1] = res
            results["machine"] = {**machine(), "commit": results["machine"]["commit"]}  # the code that ran
            write_results(results, dest)

        run_dataset(data, base, seeds, budgets, cnn, args.methods, on_seed, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
