"""Does self-supervised pretraining pay off with few labels? MoCo v2 + heads against three baselines.

The product's premise (MoCo v2 pretrained on all of a project's images, frozen, plus one head per taxonomy
level trained on the few labelled ones) reproduced offline on animal-mnist (10,000 real 28×28 silhouettes,
two-level taxonomy of :mod:`bench.datasets`), at 1 %, 5 % and 10 % of the images labelled, over several seeds.

Methods:
    moco+heads        ``model.ssl.pretrain.pretrain`` on the 8,000 non-test images (labels unused), then the frozen
                      backbone's embeddings (``model.encoder.embedder.Embedder``) and ``model.heads.heads.train_heads``.
    random-init+heads the same backbone with random weights, the same embeddings and heads (the source
                      method's baseline).
    pixels+logreg     scikit-learn logistic regression on the standardised 784 raw pixels (leaf classes).
    supervised-cnn    the same backbone family trained end to end on the labelled images only, with
                      random crops / flips / rotations, a fixed budget of optimiser steps per run.

Protocol: a fixed, stratified test split of 2,000 images (seed 0; byte-identical duplicates are kept on one
side) is never used for any choice. Per seed, a stratified labelled subset is drawn from the other 8,000 images
(nested: the 1 % subset is inside the 5 % one, which is inside the 10 % one). All hyper-parameters are fixed in
this file. Predictions are full paths (heads: best consistent path over both levels; flat methods: the leaf and
its parent). Metrics per level: macro-F1 and accuracy; hF: hierarchical F1 over the path's ancestor sets.

Usage:
    python bench/ssl_vs_baseline.py [--quick] [--minutes 10] [--seeds 0 1 2] [--retrain-encoder]

The pretrained encoder is cached in ``bench/out/`` so re-running the evaluation is cheap; results go to
``bench/results/ssl_vs_baseline.{txt,json,png}`` (``--quick`` writes ``bench/out/quick.*`` instead).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path

ROOT_DIR = Path(__file__).resolve().parents[1]
if str(ROOT_DIR) not in sys.path:  # run as `python bench/<script>.py` from anywhere
    sys.path.insert(0, str(ROOT_DIR))

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.preprocessing import StandardScaler
from torch import nn
from tqdm.auto import tqdm

from bench.datasets import ANIMAL_TAXONOMY, duplicate_ids, load_animal_mnist, test_split
from model.encoder.backbone import build_backbone
from model.encoder.config import Arch, EncoderConfig
from model.encoder.device import cpu_has_bf16
from model.encoder.embedder import Embedder
from model.heads.heads import HeadsConfig, train_heads
from model.ssl.config import AugmentConfig, PretrainConfig
from model.ssl.pretrain import pretrain
from model.taxonomy import Taxonomy

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "bench" / "out"
RESULTS_DIR = ROOT / "bench" / "results"


class Method(str, Enum):
    """The compared pipelines."""

    MOCO = "moco+heads"
    RANDOM = "random-init+heads"
    PIXELS = "pixels+logreg"
    SUPERVISED = "supervised-cnn"


SILHOUETTE_AUGMENT = AugmentConfig(
    min_scale=0.35,  # a 0.2 crop of a 28 px image keeps ~12 px: too little of the silhouette
    cj_prob=0.8,  # brightness/contrast still vary the grey levels of stripes and edges
    cj_strength=0.5,
    gray_prob=0.0,  # the images are grayscale already
    blur_prob=0.3,
    blur_sigmas=(0.1, 1.0),  # sigma 2 at 32 px erases legs, ears and tails
    hflip_prob=0.5,
    vflip_prob=0.0,  # animals stand upright
    rotation_prob=0.5,
    rotation_degrees=20.0,
)
"""MoCo v2 views for 28 px grayscale silhouettes: shape changes (crops, flips, rotations) over colour."""

SILHOUETTE_PRETRAIN = PretrainConfig(
    batch_size=128,
    lr=0.06,
    memory_bank_size=4096,
    temperature=0.2,
    ema_start=0.99,  # a run of a few hundred steps: the key encoder must follow faster than 0.996
    augment=SILHOUETTE_AUGMENT,
)
"""MoCo v2 for a budget of minutes on a CPU (the run's epochs are set from the budget)."""


@dataclass(frozen=True)
class BenchConfig:
    """Everything the result depends on (fixed before looking at any test number).

    Attributes:
        n_images: use a stratified random subset of this many images (smoke runs); None = all 10,000.
        fractions: labelled share of all 10,000 images (0.01 = 100 labelled images, 10 per animal).
        seeds: one labelled subset, head initialisation and CNN initialisation per seed.
        test_size: images in the fixed test split.
        split_seed: seed of the test split.
        pretrain_cpu_minutes: budget of MoCo pretraining in CPU-minutes of this process (all threads; 16 is
            about 8 minutes on a quiet 2-core machine).
        max_wall_minutes: wall-clock limit of pretraining whatever the budget (a very busy machine).
        encoder: backbone architecture and input size (shared by all three CNN-based methods).
        pretrain: MoCo v2 hyper-parameters (``epochs`` and ``max_minutes`` are set from the budget).
        heads: head hyper-parameters (moco+heads and random-init+heads).
        cnn_steps: optimiser steps of the supervised CNN (same for every fraction).
        cnn_batch: batch size of the supervised CNN.
        cnn_lr: peak SGD learning rate of the supervised CNN (cosine to 0).
        logreg_c: inverse L2 strength of the pixel logistic regression.
    """

    n_images: int | None = None
    fractions: tuple[float, ...] = (0.01, 0.05, 0.10)
    seeds: tuple[int, ...] = (0, 1, 2)
    test_size: int = 2000
    split_seed: int = 0
    pretrain_cpu_minutes: float = 16.0
    max_wall_minutes: float | None = 35.0
    encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig(arch=Arch.RESNET18_HALF, input_size=32))
    pretrain: PretrainConfig = field(default_factory=lambda: SILHOUETTE_PRETRAIN)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    cnn_steps: int = 200
    cnn_batch: int = 32
    cnn_lr: float = 0.05
    logreg_c: float = 0.1


# ----- data and splits -----------------------------------------------------------------------------------


def labelled_subsets(
    labels: np.ndarray, pool: np.ndarray, fractions: Sequence[float], n_total: int, seed: int
) -> dict[float, np.ndarray]:
    """Nested, stratified labelled subsets of ``pool``: ``fraction * n_total / K`` images per class.

    Args:
        labels: leaf class per image ``(N,)``.
        pool: indices the subsets are drawn from (the non-test images).
        fractions: labelled shares of the whole dataset.
        n_total: size of the whole dataset.
        seed: subset seed.

    Returns:
        fraction -> sorted int64 indices; a smaller fraction's subset is inside a larger one's.
    """
    rng = np.random.default_rng(1000 + seed)
    classes = np.unique(labels[pool])
    orders = {c: rng.permutation(pool[labels[pool] == c]) for c in classes}
    out = {}
    for fraction in fractions:
        k = max(1, int(round(fraction * n_total / len(classes))))
        out[fraction] = np.sort(np.concatenate([orders[c][:k] for c in classes]))
    return out


# ----- metrics -------------------------------------------------------------------------------------------


def path_metrics(true_paths: np.ndarray, pred_paths: np.ndarray) -> dict[str, float]:
    """Per-level macro-F1 and accuracy, and hierarchical F1.

    Args:
        true_paths: ``(N, L)`` per-level class indices of the true full paths.
        pred_paths: ``(N, L)`` the same for the predicted full paths.

    Returns:
        ``f1_l{k}``, ``acc_l{k}`` for each level k and ``hF``. With full paths of equal depth on both sides,
        hP = hR = (shared ancestors, the node itself included) / L, micro-averaged, so hF is their mean.
    """
    out: dict[str, float] = {}
    for k in range(true_paths.shape[1]):
        out[f"f1_l{k}"] = float(f1_score(true_paths[:, k], pred_paths[:, k], average="macro"))
        out[f"acc_l{k}"] = float(accuracy_score(true_paths[:, k], pred_paths[:, k]))
    prefix_ok = np.cumprod(true_paths == pred_paths, axis=1)  # (N, L): 1 while the prefix agrees
    out["hF"] = float(prefix_ok.sum() / prefix_ok.size)
    return out


def best_paths(level_logits: Sequence[np.ndarray], taxonomy: Taxonomy) -> np.ndarray:
    """The most probable full path per image, product of the level softmaxes (never a child outside its parent).

    Args:
        level_logits: L arrays ``(N, K_k)``.
        taxonomy: the label tree.

    Returns:
        ``(N, L)`` per-level class indices of the best full path.
    """
    _, index = taxonomy.candidate_paths(leafs_only=True)  # (P, L)
    score = np.zeros((level_logits[0].shape[0], len(index)))  # (N, P)
    for k, logits in enumerate(level_logits):
        logp = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1).numpy()  # (N, K_k)
        score += logp[:, index[:, k]]
    return index[score.argmax(axis=1)]


# ----- methods -------------------------------------------------------------------------------------------


def heads_predict(
    emb: np.ndarray, targets: np.ndarray, train: np.ndarray, test: np.ndarray, cfg: HeadsConfig
) -> np.ndarray:
    """Train the taxonomy heads on ``emb[train]`` and return best paths ``(T, L)`` for ``emb[test]``."""
    heads = train_heads(emb[train], targets[train], ANIMAL_TAXONOMY, cfg)
    with torch.no_grad():
        logits = [z.numpy() for z in heads(torch.as_tensor(emb[test]))]
    return best_paths(logits, ANIMAL_TAXONOMY)


def pixel_logreg_predict(
    images: np.ndarray, leaf: np.ndarray, targets: np.ndarray, train: np.ndarray, test: np.ndarray, c: float
) -> np.ndarray:
    """Logistic regression on standardised raw pixels, leaf classes; the parent follows from the leaf."""
    x = images.reshape(len(images), -1).astype(np.float32) / 255.0  # (N, 784)
    scaler = StandardScaler().fit(x[train])
    clf = LogisticRegression(C=c, max_iter=3000).fit(scaler.transform(x[train]), leaf[train])
    pred_leaf = clf.predict(scaler.transform(x[test]))
    leaf_to_path = {int(leaf[i]): targets[i] for i in range(len(leaf))}
    return np.stack([leaf_to_path[int(p)] for p in pred_leaf])


def to_tensor_images(images: np.ndarray, cfg: EncoderConfig) -> torch.Tensor:
    """uint8 ``(N, 28, 28)`` -> normalised float ``(N, 3, S, S)``, like :func:`model.ssl.augment.eval_transform`."""
    x = torch.from_numpy(images).float().div(255.0).unsqueeze(1)  # (N, 1, 28, 28)
    x = F.interpolate(x, size=cfg.input_size, mode="bilinear", align_corners=False, antialias=True)
    x = x.expand(-1, 3, -1, -1)  # (N, 3, S, S)
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def random_affine(x: torch.Tensor, gen: torch.Generator, min_scale: float = 0.6, degrees: float = 15.0) -> torch.Tensor:
    """Batched random resized crop + horizontal flip + small rotation (one affine warp per image).

    Args:
        x: ``(B, C, S, S)`` images.
        gen: random generator.
        min_scale: smallest crop side as a fraction of the image side.
        degrees: rotations drawn from ``[-degrees, degrees]``.

    Returns:
        ``(B, C, S, S)`` augmented images (zeros where the warp leaves the image).
    """
    b = x.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=gen)

    scale = uniform(min_scale, 1.0)
    theta = uniform(-degrees, degrees) * math.pi / 180
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    tx, ty = (1 - scale) * uniform(-1, 1), (1 - scale) * uniform(-1, 1)
    affine = torch.zeros(b, 2, 3)  # (B, 2, 3)
    affine[:, 0, 0] = scale * flip * torch.cos(theta)
    affine[:, 0, 1] = -scale * torch.sin(theta)
    affine[:, 1, 0] = scale * flip * torch.sin(theta)
    affine[:, 1, 1] = scale * torch.cos(theta)
    affine[:, 0, 2], affine[:, 1, 2] = tx, ty
    grid = F.affine_grid(affine, list(x.shape), align_corners=False)
    background = x.amin(dim=(0, 2, 3), keepdim=True)  # the normalised value of black
    return F.grid_sample(x - background, grid, align_corners=False) + background


def supervised_cnn_predict(
    x: torch.Tensor, leaf: np.ndarray, targets: np.ndarray, train: np.ndarray, test: np.ndarray, cfg: BenchConfig,
    seed: int,
) -> np.ndarray:
    """Train the backbone + a linear leaf classifier end to end on ``train`` only; best paths for ``test``."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    bf16 = cpu_has_bf16()
    backbone = build_backbone(cfg.encoder)
    model = nn.Sequential(backbone, nn.Linear(backbone.out_dim, int(leaf.max()) + 1)).to(
        memory_format=torch.channels_last
    )
    opt = torch.optim.SGD(model.parameters(), lr=cfg.cnn_lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    warmup = max(1, cfg.cnn_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine to 0
        opt, lambda t: min(1.0, (t + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, t / cfg.cnn_steps)))
    )
    xt, yt = x[train], torch.as_tensor(leaf[train])
    model.train()
    for _ in range(cfg.cnn_steps):
        idx = torch.randint(len(train), (min(cfg.cnn_batch, len(train)),), generator=gen)
        xb = random_affine(xt[idx], gen).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(xb).float(), yt[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = torch.cat([model(x[test[i : i + 512]].contiguous(memory_format=torch.channels_last)).float()
                            for i in range(0, len(test), 512)])
    pred_leaf = logits.argmax(1).numpy()
    leaf_to_path = {int(leaf[i]): targets[i] for i in range(len(leaf))}
    return np.stack([leaf_to_path[int(p)] for p in pred_leaf])


# ----- the SSL encoder -----------------------------------------------------------------------------------


def _cache_key(cfg: BenchConfig, n_images: int) -> str:
    blob = json.dumps(
        {"encoder": cfg.encoder.to_dict(), "pretrain": cfg.pretrain.to_dict(),
         "cpu_minutes": cfg.pretrain_cpu_minutes, "wall_cap": cfg.max_wall_minutes,
         "images": n_images, "split": [cfg.test_size, cfg.split_seed]},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def moco_step_rate(encoder: EncoderConfig, batch_size: int, steps: int = 2) -> float:
    """Images per CPU-second of one MoCo step (query forward + backward, key forward) on this machine.

    CPU time (of this process, all threads) rather than wall time, so that the estimate does not depend on
    what else the machine is running.

    Args:
        encoder: the backbone and input size.
        batch_size: the pretraining batch size.
        steps: timed steps after one warm-up step.
    """
    backbone = build_backbone(encoder).to(memory_format=torch.channels_last)
    x = torch.randn(batch_size, 3, encoder.input_size, encoder.input_size).contiguous(memory_format=torch.channels_last)
    seconds = 0.0
    for step in range(steps + 1):
        t0 = time.process_time()
        backbone(x).square().mean().backward()
        with torch.no_grad():
            backbone(x)
        if step > 0:
            seconds += time.process_time() - t0
    return steps * batch_size / seconds


PIPELINE_OVERHEAD = 1.25
"""CPU cost of a real pretraining step (augmentation, data loading, loss, optimiser) over the bare probe."""


def pretrained_backbone(images: np.ndarray, cfg: BenchConfig, out_dir: Path, retrain: bool) -> tuple[nn.Module, dict]:
    """MoCo v2 pretraining on ``images`` for a budget of ``cfg.pretrain_cpu_minutes``, cached under ``out_dir``.

    The budget is CPU time, not wall time, so that a busy machine gives the same encoder as a quiet one,
    only later. A short probe measures images per CPU-second; the planned epochs (the length of the cosine
    learning-rate schedule) are what the budget buys. ``cfg.max_wall_minutes`` stops the run regardless.

    Args:
        images: uint8 ``(N, 28, 28)`` unlabelled images.
        cfg: the benchmark configuration (encoder, pretraining, budget).
        out_dir: cache root; a finished run with the same settings is reused unless ``retrain``.
        retrain: ignore the cache.

    Returns:
        ``(backbone, info)``: the pretrained backbone and what the run did (CPU and wall time, images/s, loss).
    """
    from safetensors.torch import load_file, save_file

    run_dir = out_dir / f"moco-{_cache_key(cfg, len(images))}"
    weights, info_path = run_dir / "backbone.safetensors", run_dir / "pretrain_info.json"
    if weights.exists() and info_path.exists() and not retrain:
        backbone = build_backbone(cfg.encoder)
        backbone.load_state_dict(load_file(str(weights)))
        info = json.loads(info_path.read_text())
        info["cached"] = True
        print(f"reusing the pretrained encoder in {run_dir}", flush=True)
        return backbone, info

    sources = list(images)
    ips_cpu = moco_step_rate(cfg.encoder, cfg.pretrain.batch_size) / PIPELINE_OVERHEAD
    epochs = max(1, int(60.0 * cfg.pretrain_cpu_minutes * ips_cpu // len(sources)))
    run_cfg = replace(cfg.pretrain, epochs=epochs, max_minutes=cfg.max_wall_minutes)
    print(f"pretraining: ~{ips_cpu:.0f} img per CPU-second -> {epochs} epochs of {len(sources)} images "
          f"for {cfg.pretrain_cpu_minutes} CPU-minutes (wall limit {cfg.max_wall_minutes} min)", flush=True)
    t0, c0 = time.perf_counter(), time.process_time()
    result = pretrain(sources, cfg.encoder, run_cfg, run_dir / "run", resume=False, progress=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    backbone = build_backbone(cfg.encoder)
    backbone.load_state_dict(result.backbone_state)
    info = {
        "budget_cpu_minutes": cfg.pretrain_cpu_minutes,
        "cpu_seconds": round(cpu, 1),
        "wall_seconds": round(wall, 1),
        "images_trained": len(result.step_losses) * run_cfg.batch_size,
        "images_per_second": round(len(result.step_losses) * run_cfg.batch_size / wall, 1),
        "images_per_cpu_second": round(len(result.step_losses) * run_cfg.batch_size / cpu, 1),
        "planned_epochs": epochs,
        "epochs_done": result.epochs_done,
        "images": len(sources),
        "epoch_losses": [round(x, 4) for x in result.epoch_losses],
        "encoder_version": result.encoder_version,
        "pretrain_config": run_cfg.to_dict(),
        "encoder_config": cfg.encoder.to_dict(),
        "cached": False,
    }
    save_file(result.backbone_state, str(weights))
    info_path.write_text(json.dumps(info, indent=2))
    return backbone, info


# ----- the run -------------------------------------------------------------------------------------------


def embed_all(backbone: nn.Module, images: np.ndarray, cfg: EncoderConfig, cache: Path | None = None) -> np.ndarray:
    """Embeddings ``(N, D)`` of every image through the product's :class:`~model.encoder.embedder.Embedder`.

    Args:
        backbone: the encoder.
        images: uint8 ``(N, 28, 28)``.
        cfg: the encoder config (input size, normalisation).
        cache: ``.npy`` file reused when it holds N rows, written otherwise; None disables caching.
    """
    if cache is not None and cache.exists():
        emb = np.load(cache)
        if emb.shape[0] == len(images):
            return emb
    embedder = Embedder(backbone, cfg, device="cpu", batch_size=256)
    emb = embedder.embed(list(images), progress=True)  # (N, D)
    assert np.isfinite(emb).all(), "an animal-mnist image could not be embedded"
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, emb)
    return emb


def run(cfg: BenchConfig, out_dir: Path, retrain: bool, methods: Sequence[Method]) -> dict:
    """Runs every method at every fraction and seed; returns the JSON-able results."""
    images, paths = load_animal_mnist()
    if cfg.n_images is not None:
        keep = np.sort(np.random.default_rng(7).permutation(len(images))[: cfg.n_images])
        images, paths = images[keep], [paths[i] for i in keep]
    leaf = np.array([ANIMAL_TAXONOMY.node(p).index for p in paths])  # (N,) leaf index at level 1
    targets = ANIMAL_TAXONOMY.encode_many(paths)  # (N, 2)
    test, rest = test_split(leaf, duplicate_ids(images), cfg.test_size, cfg.split_seed)  # exact copies together
    subsets = {seed: labelled_subsets(leaf, rest, cfg.fractions, len(images), seed) for seed in cfg.seeds}
    print(f"animal-mnist: {len(images)} images, test {len(test)}, pool {len(rest)}; labelled per fraction "
          f"{ {f: len(subsets[cfg.seeds[0]][f]) for f in cfg.fractions} }", flush=True)

    info: dict = {"test_size": int(len(test)), "pool_size": int(len(rest))}
    embeddings: dict[Method, np.ndarray] = {}
    if Method.MOCO in methods:
        t0 = time.perf_counter()
        backbone, info["pretrain"] = pretrained_backbone(images[rest], cfg, out_dir, retrain)
        cache = out_dir / f"moco-{_cache_key(cfg, len(rest))}" / f"embeddings-{len(images)}.npy"
        embeddings[Method.MOCO] = embed_all(backbone, images, cfg.encoder, None if retrain else cache)
        info["pretrain"]["embed_seconds"] = round(time.perf_counter() - t0, 1)
    if Method.RANDOM in methods:
        torch.manual_seed(0)
        key = hashlib.sha256(json.dumps(cfg.encoder.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
        cache = out_dir / f"random-{key}" / f"embeddings-{len(images)}.npy"
        embeddings[Method.RANDOM] = embed_all(build_backbone(cfg.encoder), images, cfg.encoder, cache)
    x_tensor = to_tensor_images(images, cfg.encoder) if Method.SUPERVISED in methods else None

    rows: list[dict] = []
    jobs = [(m, f, s) for m in methods for f in cfg.fractions for s in cfg.seeds]
    for method, fraction, seed in tqdm(jobs, desc="evaluate", unit="run"):
        train = subsets[seed][fraction]
        t0 = time.perf_counter()
        if method in (Method.MOCO, Method.RANDOM):
            pred = heads_predict(embeddings[method], targets, train, test, replace(cfg.heads, seed=seed))
        elif method is Method.PIXELS:
            pred = pixel_logreg_predict(images, leaf, targets, train, test, cfg.logreg_c)
        else:
            assert x_tensor is not None
            pred = supervised_cnn_predict(x_tensor, leaf, targets, train, test, cfg, seed)
        row = {"method": method.value, "fraction": fraction, "seed": seed, "labelled": int(len(train)),
               "seconds": round(time.perf_counter() - t0, 2), **path_metrics(targets[test], pred)}
        rows.append(row)
        tqdm.write(f"{method.value:18s} {fraction:5.0%} seed {seed}: F1 l0 {row['f1_l0']:.3f} l1 {row['f1_l1']:.3f} "
                   f"hF {row['hF']:.3f} ({row['seconds']:.0f} s)")
    return {"config": config_json(cfg), "info": info, "rows": rows, "machine": machine()}


def config_json(cfg: BenchConfig) -> dict:
    """The configuration as JSON."""
    return {
        "fractions": list(cfg.fractions), "seeds": list(cfg.seeds), "test_size": cfg.test_size,
        "split_seed": cfg.split_seed, "pretrain_cpu_minutes": cfg.pretrain_cpu_minutes,
        "encoder": cfg.encoder.to_dict(), "pretrain": cfg.pretrain.to_dict(), "heads": cfg.heads.to_dict(),
        "cnn_steps": cfg.cnn_steps, "cnn_batch": cfg.cnn_batch, "cnn_lr": cfg.cnn_lr, "logreg_c": cfg.logreg_c,
    }


def machine() -> dict:
    """Where the run was made."""
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "cuda": torch.cuda.is_available()}


METRICS = (("f1_l0", "F1 level 1 (group)"), ("f1_l1", "F1 level 2 (animal)"), ("acc_l1", "acc level 2"), ("hF", "hF"))


def summarize(rows: Sequence[dict]) -> dict[tuple[str, float], dict[str, tuple[float, float]]]:
    """(method, fraction) -> metric -> (mean, std over seeds)."""
    out: dict[tuple[str, float], dict[str, tuple[float, float]]] = {}
    for key in sorted({(r["method"], r["fraction"]) for r in rows}, key=lambda k: (k[1], list(Method).index(Method(k[0])))):
        sel = [r for r in rows if (r["method"], r["fraction"]) == key]
        out[key] = {m: (float(np.mean([r[m] for r in sel])), float(np.std([r[m] for r in sel]))) for m, _ in METRICS}
    return out


def markdown_table(rows: Sequence[dict]) -> str:
    """The results as a markdown table, mean ± std over seeds."""
    lines = ["| labelled | method | " + " | ".join(name for _, name in METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    for (method, fraction), stats in summarize(rows).items():
        n = next(r["labelled"] for r in rows if (r["method"], r["fraction"]) == (method, fraction))
        cells = " | ".join(f"{stats[m][0]:.3f} ± {stats[m][1]:.3f}" for m, _ in METRICS)
        lines.append(f"| {fraction:.0%} ({n}) | {method} | {cells} |")
    return "\n".join(lines)


def plot(rows: Sequence[dict], png: Path) -> None:
    """F1 per level against the labelled fraction, one line per method (mean ± std band)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stats = summarize(rows)
    fig = Figure(figsize=(10, 4), dpi=110)
    FigureCanvasAgg(fig)
    for i, (metric, name) in enumerate(METRICS[:2]):
        ax = fig.add_subplot(1, 2, i + 1)
        for method in Method:
            keys = sorted(k for k in stats if k[0] == method.value)
            if not keys:
                continue
            xs = [100 * k[1] for k in keys]
            mean = np.array([stats[k][metric][0] for k in keys])
            std = np.array([stats[k][metric][1] for k in keys])
            ax.plot(xs, mean, "o-", label=method.value)
            ax.fill_between(xs, mean - std, mean + std, alpha=0.2)
        ax.set_xscale("log")
        ax.set_xticks(xs, [f"{x:g}%" for x in xs])
        ax.set_xlabel("labelled images (% of 10,000)")
        ax.set_ylabel("macro-F1 on the 2,000 test images")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png)


def report_text(results: dict) -> str:
    """The printed/saved report: setup, pretraining cost, table."""
    cfg, info = results["config"], results["info"]
    lines = [
        "# MoCo v2 + taxonomy heads vs baselines on animal-mnist (2 levels: 3 groups, 10 animals)",
        "",
        f"test split: {info['test_size']} images (stratified, seed {cfg['split_seed']}, never used for tuning); "
        f"labelled subsets drawn from the other {info['pool_size']} per seed; seeds {cfg['seeds']}.",
        f"encoder: {cfg['encoder']['arch']} at {cfg['encoder']['input_size']} px (28 px grayscale upscaled).",
    ]
    pre = info.get("pretrain")
    if pre:
        lines.append(
            f"MoCo pretraining on the {pre['images']} non-test images (labels unused), budget "
            f"{pre['budget_cpu_minutes']} CPU-min: {pre['cpu_seconds'] / 60:.1f} CPU-min, {pre['wall_seconds'] / 60:.1f} "
            f"min wall, {pre['images_per_second']:.0f} img/s wall ({pre['images_per_cpu_second']:.0f} per CPU-s), "
            f"{pre['images_trained']} images seen, {pre['epochs_done']}/{pre['planned_epochs']} epochs, final epoch loss "
            f"{pre['epoch_losses'][-1] if pre['epoch_losses'] else float('nan'):.3f}"
            + (" (cached run)" if pre.get("cached") else "") + "."
        )
    lines += [f"machine: {results['machine']}", "", markdown_table(results["rows"]), ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="MoCo v2 + heads vs baselines on animal-mnist at few labels.")
    parser.add_argument("--quick", action="store_true", help="a ~1-minute smoke run (tiny budget, one seed)")
    parser.add_argument("--cpu-minutes", type=float, default=None, help="MoCo pretraining budget in CPU-minutes")
    parser.add_argument("--max-wall-minutes", type=float, default=None, help="wall-clock limit of pretraining")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2)")
    parser.add_argument("--methods", nargs="+", default=[m.value for m in Method], choices=[m.value for m in Method])
    parser.add_argument("--retrain-encoder", action="store_true", help="ignore the cached pretrained encoder")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None,
                        help="write results to OUT.{txt,json,png} (default bench/results/ssl_vs_baseline)")
    parser.add_argument("--combine", type=Path, nargs="+", default=None,
                        help="only merge the rows of result JSONs made with the same configuration (e.g. methods "
                             "run in separate processes) into one report")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.combine:
        results = combine([json.loads(p.read_text()) for p in args.combine])
        write_results(results, args.out or RESULTS_DIR / "ssl_vs_baseline")
        return 0

    cfg = BenchConfig()
    if args.quick:
        cfg = replace(cfg, n_images=1500, test_size=500, fractions=(0.05, 0.2), seeds=(0,),
                      pretrain_cpu_minutes=0.5, max_wall_minutes=0.5,
                      cnn_steps=10,
                      heads=replace(cfg.heads, epochs=10), pretrain=replace(cfg.pretrain, batch_size=64,
                                                                              memory_bank_size=512))
    if args.cpu_minutes is not None:
        cfg = replace(cfg, pretrain_cpu_minutes=args.cpu_minutes)
    if args.max_wall_minutes is not None:
        cfg = replace(cfg, max_wall_minutes=args.max_wall_minutes)
    if args.seeds is not None:
        cfg = replace(cfg, seeds=tuple(args.seeds))
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = run(cfg, OUT_DIR, args.retrain_encoder, [Method(m) for m in args.methods])
    results["total_seconds"] = round(time.perf_counter() - t0, 1)
    write_results(results, args.out or (OUT_DIR / "quick" if args.quick else RESULTS_DIR / "ssl_vs_baseline"))
    return 0


def combine(parts: Sequence[dict]) -> dict:
    """Merges result JSONs of the same configuration (e.g. methods run in separate processes).

    Raises:
        ValueError: the configurations differ, or a (method, fraction, seed) appears twice.
    """
    first = parts[0]
    rows: list[dict] = []
    info: dict = {}
    for part in parts:
        if part["config"] != first["config"]:
            raise ValueError("the result files were made with different configurations; rerun them with the same one")
        rows += part["rows"]
        info.update(part["info"])
    keys = [(r["method"], r["fraction"], r["seed"]) for r in rows]
    if len(set(keys)) != len(keys):
        raise ValueError("a (method, fraction, seed) appears in more than one result file")
    return {"config": first["config"], "info": info, "rows": rows, "machine": first["machine"],
            "total_seconds": round(sum(p.get("total_seconds", 0.0) for p in parts), 1)}


def write_results(results: dict, dest: Path) -> None:
    """Prints the report and writes ``dest.txt``, ``dest.json`` and ``dest.png``."""
    text = report_text(results) + f"total wall time {results.get('total_seconds', 0):.0f} s (summed over processes)\n"
    print(text)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.with_suffix(".txt").write_text(text)
    dest.with_suffix(".json").write_text(json.dumps(results, indent=2))
    plot(results["rows"], dest.with_suffix(".png"))
    print(f"wrote {dest}.txt/.json/.png")


if __name__ == "__main__":
    sys.exit(main())
