"""The baselines of ``bench/ssl_vs_baseline.py``, each given its choices on the labelled validation split.

Every baseline sees the same labelled subset as ours, plus a labelled validation split that ours never sees
(ours is the product on its defaults and chooses by cross-validation on its own few labels): this favours the
baselines. Unlabelled statistics (feature standardisation, BatchNorm recalibration) come from the non-test
images, as ours pretrains on them.

- ``pixels+logreg``: multinomial logistic regression on leaf classes; representation (raw pixels at most
  32 px, or the product's pixel features, ``model.features.pixels``) and C chosen on validation.
- ``pixels+knn``: k-nearest neighbours on leaf classes; representation and k chosen on validation.
- ``random-init+heads``: the product's backbone with random weights and the same BatchNorm recalibration as
  the pretrained one (``model.encoder.batchnorm``), embedded by the product's ``Embedder``; head (the product's
  prototypes or MLP heads) chosen on validation.
- ``supervised-cnn``: the same backbone and input size trained end to end on the labelled images (random
  crops / flips / rotations, colour jitter on colour images), SGD with warm-up, the learning rate divided by
  10 once validation stops improving, stopped when it stops again (best validation weights kept) or at
  a wall-clock cap of at least MoCo's pretraining time.

Flat (leaf) classifiers predict the leaf's full path, so every prediction is a consistent path.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from torch import nn

from model.encoder.backbone import build_backbone
from model.encoder.config import EncoderConfig
from model.encoder.device import cpu_has_bf16
from model.features.pixels import PixelFeatures
from model.heads.candidates import CANDIDATES
from model.heads.decode import decode
from model.heads.training import heads_logits
from model.taxonomy import Path, Taxonomy

__all__ = ["CnnConfig", "logreg", "knn", "pixel_representations", "random_init_heads", "supervised_cnn"]

LOGREG_C = (0.01, 0.1, 1.0, 10.0)
KNN_K = (1, 3, 5, 10, 20)

Choice = dict[str, Any]
Score = Callable[[np.ndarray], float]  # validation hF of predicted leaf indices (N_val,)


def pixel_representations(images: np.ndarray, unlabelled: np.ndarray) -> dict[str, np.ndarray]:
    """``{"raw", "product"}`` pixel features ``(N, D)``, standardised with the statistics of ``unlabelled`` rows.

    ``raw``: every pixel of the image area-downscaled to at most 32 px a side, in [0, 1]; ``product``: the
    product's ``PixelFeatures`` (16 px RGB + colour statistics).
    """
    side = min(32, images.shape[1])
    raw = np.stack([np.asarray(Image.fromarray(im).resize((side, side), Image.Resampling.BOX), dtype=np.float32)
                    for im in images]).reshape(len(images), -1) / 255.0  # (N, side*side*C)
    product = PixelFeatures().embed(list(images))  # (N, 798)
    out = {}
    for name, x in (("raw", raw), ("product", product)):
        mean, std = x[unlabelled].mean(0), x[unlabelled].std(0) + 1e-6
        out[name] = ((x - mean) / std).astype(np.float32)
    return out


def logreg(reps: dict[str, np.ndarray], leaf: np.ndarray, train: np.ndarray, val: np.ndarray, test: np.ndarray,
           val_score: Score) -> tuple[np.ndarray, Choice]:
    """Leaf predictions ``(T,)`` on ``test`` of the logistic regression best on validation, and the choice."""
    best: tuple[float, Choice, Any] | None = None
    for rep, x in reps.items():
        for c in LOGREG_C:
            clf = LogisticRegression(C=c, max_iter=2000).fit(x[train], leaf[train])
            s = val_score(clf.predict(x[val]))
            if best is None or s > best[0]:
                best = (s, {"representation": rep, "C": c, "val_hF": round(s, 4)}, (clf, rep))
    assert best is not None
    clf, rep = best[2]
    return clf.predict(reps[rep][test]), best[1]


def knn(reps: dict[str, np.ndarray], leaf: np.ndarray, train: np.ndarray, val: np.ndarray, test: np.ndarray,
        val_score: Score) -> tuple[np.ndarray, Choice]:
    """Leaf predictions on ``test`` of the k-nearest-neighbour classifier best on validation, and the choice."""
    best: tuple[float, Choice, Any] | None = None
    for rep, x in reps.items():
        for k in (k for k in KNN_K if k <= len(train)):
            clf = KNeighborsClassifier(n_neighbors=k).fit(x[train], leaf[train])
            s = val_score(clf.predict(x[val]))
            if best is None or s > best[0]:
                best = (s, {"representation": rep, "k": k, "val_hF": round(s, 4)}, (clf, rep))
    assert best is not None
    clf, rep = best[2]
    return clf.predict(reps[rep][test]), best[1]


def random_init_heads(emb: np.ndarray, targets: np.ndarray, taxonomy: Taxonomy, train: np.ndarray,
                      val: np.ndarray, test: np.ndarray, path_score: Callable[[Sequence[Path]], float]
                      ) -> tuple[list[Path], Choice]:
    """Test paths of the product's head (prototypes or MLP heads) best on validation, on the embeddings ``emb``."""
    num_classes = [taxonomy.num_classes(k) for k in range(taxonomy.depth)]
    best: tuple[float, Choice, Any] | None = None
    for name in ("encoder+prototypes", "encoder+mlp"):
        heads = CANDIDATES[name].train(emb[train], targets[train], num_classes)
        val_paths = [p.path for p in decode(heads_logits(heads, torch.from_numpy(emb[val])), taxonomy)]
        s = path_score(val_paths)
        if best is None or s > best[0]:
            best = (s, {"head": name.split("+")[1], "val_hF": round(s, 4)}, heads)
    assert best is not None
    return [p.path for p in decode(heads_logits(best[2], torch.from_numpy(emb[test])), taxonomy)], best[1]


@dataclass(frozen=True)
class CnnConfig:
    """Training of the supervised CNN (fixed before any test number was seen).

    Attributes:
        lr: SGD learning rate after warm-up (momentum 0.9, Nesterov, weight decay 5e-4).
        batch_size: images per step (at most the labelled set).
        warmup_steps: linear warm-up.
        eval_every: steps between validation checks.
        patience: checks without a better validation hF before the learning rate drops (once), then stops.
        max_steps: hard cap on steps (besides the wall-clock cap).
    """

    lr: float = 0.05
    batch_size: int = 64
    warmup_steps: int = 50
    eval_every: int = 20
    patience: int = 5
    max_steps: int = 50_000


def _augment(x: torch.Tensor, gen: torch.Generator, colour: bool) -> torch.Tensor:
    """Random resized crop (scale 0.6-1), horizontal flip and rotation (±15°) as one affine warp; on colour
    images also brightness/contrast and per-channel jitter. ``x``: normalised ``(B, 3, S, S)``."""
    b = x.shape[0]

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, *shape, generator=gen)

    scale, theta = uniform(0.6, 1.0), uniform(-15, 15) * math.pi / 180
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    affine = torch.zeros(b, 2, 3)  # (B, 2, 3)
    affine[:, 0, 0], affine[:, 0, 1] = scale * flip * torch.cos(theta), -scale * torch.sin(theta)
    affine[:, 1, 0], affine[:, 1, 1] = scale * flip * torch.sin(theta), scale * torch.cos(theta)
    affine[:, 0, 2], affine[:, 1, 2] = (1 - scale) * uniform(-1, 1), (1 - scale) * uniform(-1, 1)
    grid = F.affine_grid(affine, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    if colour:
        out = out * uniform(0.6, 1.4, 1, 1, 1) + uniform(-0.4, 0.4, 1, 1, 1) + uniform(-0.3, 0.3, 3, 1, 1)
    return out


def _predict(model: nn.Module, x: torch.Tensor, bf16: bool) -> np.ndarray:
    model.eval()
    outs = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for i in range(0, len(x), 512):
            outs.append(model(x[i:i + 512].contiguous(memory_format=torch.channels_last)).float().argmax(1))
    return torch.cat(outs).numpy()


def supervised_cnn(x: torch.Tensor, leaf: np.ndarray, n_leaves: int, train: np.ndarray, val: np.ndarray,
                   test: np.ndarray, encoder: EncoderConfig, cfg: CnnConfig, cap_seconds: float, colour: bool,
                   seed: int, val_score: Score) -> tuple[np.ndarray, Choice]:
    """Leaf predictions on ``test`` of the backbone + linear layer trained on ``train`` with early stopping.

    Args:
        x: every image, eval-transformed ``(N, 3, S, S)`` (the product's ``eval_transform``).
        cap_seconds: wall-clock cap of the training (at least MoCo's pretraining time).
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    bf16 = cpu_has_bf16()
    backbone = build_backbone(encoder)
    model = nn.Sequential(backbone, nn.Linear(backbone.out_dim, n_leaves)).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    xt, yt, xv = x[train], torch.as_tensor(leaf[train]), x[val]
    batch = min(cfg.batch_size, len(train))
    best_s, best_state, best_step, stale, drops, step = -1.0, copy.deepcopy(model.state_dict()), 0, 0, 0, 0
    start, stopped = time.perf_counter(), "max_steps"
    while step < cfg.max_steps:
        model.train()
        for _ in range(cfg.eval_every):
            lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) * 0.1 ** drops
            for group in opt.param_groups:
                group["lr"] = lr
            idx = torch.randint(len(train), (batch,), generator=gen)
            xb = _augment(xt[idx], gen, colour).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(xb).float(), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        s = val_score(_predict(model, xv, bf16))
        if s > best_s:
            best_s, best_state, best_step, stale = s, copy.deepcopy(model.state_dict()), step, 0
        else:
            stale += 1
        if stale >= cfg.patience:
            if drops == 1:
                stopped = "early stopping"
                break
            drops, stale = 1, 0
            model.load_state_dict(best_state)  # continue from the best weights at the lower rate
        if time.perf_counter() - start > cap_seconds:
            stopped = "wall-clock cap"
            break
    model.load_state_dict(best_state)
    info = {"steps": step, "best_step": best_step, "val_hF": round(best_s, 4), "stopped_by": stopped,
            "seconds": round(time.perf_counter() - start, 1), "cap_seconds": round(cap_seconds, 1)}
    return _predict(model, x[test], bf16), info
