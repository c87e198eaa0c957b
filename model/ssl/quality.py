"""A label-free quality signal of pretraining: can the encoder tell which two augmented views show the same image?

On a fixed sample of the project's images (``QUALITY_IMAGES``), two augmented views of each image are embedded by
the backbone being trained; **view retrieval** is the fraction of views whose nearest neighbour (cosine) among all
other views is the other view of the same image. Next to it: **alignment** (mean squared distance of the two
views' normalised embeddings; lower is better) and **uniformity** (log of the mean Gaussian potential between
embeddings of different images, Wang & Isola 2020; lower is better).

A random network already retrieves some views (identical colours and shapes survive weak crops), so a run is
said to have *learned* when view retrieval at least doubled from its value before the first step and rose by at
least ``LEARNED_GAIN``. (On animal-mnist a 5-minute CPU run with the small-images recipe went from 0.014 to 0.043;
an earlier 64 px run whose loss collapsed to ln(bank) measured 0.012.)
The backbone is evaluated with batch statistics (BatchNorm in training mode with momentum 0: running statistics
are neither used nor changed), so the signal does not depend on how far the running statistics have caught up.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback
from torch import nn

from model.data import ImageListDataset, collate_skipping
from model.images import ImageSource
from model.ssl.plan import PretrainPlan

__all__ = ["LEARNED_GAIN", "QUALITY_CHECKS", "QUALITY_IMAGES", "QualityCallback", "ViewQuality", "learned",
           "measure_view_quality", "read_quality_csv", "write_quality_row"]

QUALITY_IMAGES = 256
QUALITY_CHECKS = 8
"""Measurements spread over a run (plus one before the first step and one at the end)."""
LEARNED_GAIN = 0.02


@dataclass(frozen=True)
class ViewQuality:
    """Quality of the embeddings at one optimiser step."""

    step: int
    view_retrieval: float
    alignment: float
    uniformity: float

    def to_dict(self) -> dict[str, Any]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def _batch_statistics(backbone: nn.Module) -> list[tuple[nn.Module, Any, bool]]:
    saved: list[tuple[nn.Module, Any, bool]] = []
    for m in backbone.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            saved.append((m, m.momentum, m.training))
            m.momentum = 0.0  # running = 1 * running + 0 * batch: unchanged
            m.train()
    return saved


@torch.no_grad()
def measure_view_quality(backbone: nn.Module, images: Sequence[ImageSource], two_views: Callable[[Any], Any],
                         step: int, seed: int = 0, batch_size: int = 128) -> ViewQuality | None:
    """View retrieval, alignment and uniformity of ``backbone`` on up to ``QUALITY_IMAGES`` evenly spaced images.

    Args:
        backbone: Maps ``(B, 3, S, S)`` to ``(B, D)``.
        images: The run's images.
        two_views: The pretraining transform (PIL image → ``[view_a (3, S, S), view_b (3, S, S)]``).
        step: The optimiser step this measurement belongs to.
        seed: Seeds the augmentations, so every measurement of a run sees the same views.

    Returns:
        The measurement, or None when fewer than 4 images could be read.
    """
    stride = max(1, len(images) // QUALITY_IMAGES)
    sample = [images[i] for i in range(0, len(images), stride)][:QUALITY_IMAGES]
    states = torch.random.get_rng_state(), random.getstate(), np.random.get_state()
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    try:
        loader = torch.utils.data.DataLoader(ImageListDataset(sample, two_views), batch_size=batch_size,
                                             shuffle=False, collate_fn=collate_skipping)
        was_training = backbone.training
        saved = _batch_statistics(backbone)
        device = next(backbone.parameters()).device
        za, zb = [], []
        for views, _, _ in loader:
            if views is None or len(views[0]) < 2:
                continue
            za.append(F.normalize(backbone(views[0].to(device)).float(), dim=1).cpu())  # (B, D)
            zb.append(F.normalize(backbone(views[1].to(device)).float(), dim=1).cpu())  # (B, D)
        for m, momentum, training in saved:
            m.momentum = momentum
            m.train(training)
        backbone.train(was_training)
    finally:
        torch.random.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])
    if not za or sum(len(a) for a in za) < 4:
        return None
    a, b = torch.cat(za), torch.cat(zb)  # (M, D) each
    n = len(a)
    z = torch.cat([a, b])  # (2M, D)
    sim = z @ z.T  # (2M, 2M)
    sim.fill_diagonal_(-2.0)
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])  # (2M,)
    retrieval = float((sim.argmax(dim=1) == partner).float().mean())
    alignment = float((a - b).pow(2).sum(dim=1).mean())
    sq = torch.cdist(a, a).pow(2)  # (M, M)
    off = sq[~torch.eye(n, dtype=torch.bool)]
    uniformity = float(torch.log(torch.exp(-2.0 * off).mean()))
    return ViewQuality(step=step, view_retrieval=retrieval, alignment=alignment, uniformity=uniformity)


def learned(history: Sequence[ViewQuality]) -> bool | None:
    """Whether view retrieval at least doubled and rose by at least ``LEARNED_GAIN`` from the first to the last
    measurement (None when fewer than two measurements exist)."""
    if len(history) < 2:
        return None
    first, last = history[0].view_retrieval, history[-1].view_retrieval
    return last >= 2 * first and last - first >= LEARNED_GAIN


def write_quality_row(csv_path: Path, q: ViewQuality) -> None:
    """Append one measurement to ``quality.csv`` (header on first write)."""
    new_file = not csv_path.exists()
    with csv_path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new_file:
            writer.writerow(["step", "view_retrieval", "alignment", "uniformity"])
        writer.writerow([q.step, f"{q.view_retrieval:.4f}", f"{q.alignment:.4f}", f"{q.uniformity:.4f}"])


def read_quality_csv(csv_path: Path) -> list[ViewQuality]:
    """All measurements of ``quality.csv`` (empty when there is none)."""
    if not csv_path.exists():
        return []
    with csv_path.open(newline="") as f:
        return [ViewQuality(int(r["step"]), float(r["view_retrieval"]), float(r["alignment"]), float(r["uniformity"]))
                for r in csv.DictReader(f)]


class QualityCallback(Callback):
    """Measures view retrieval before the first step, at ``QUALITY_CHECKS`` evenly spaced steps and at the end."""

    def __init__(self, images: Sequence[ImageSource], two_views: object, plan: PretrainPlan, csv_path: Path,
                 seed: int) -> None:
        self.images, self.two_views, self.csv_path, self.seed = images, two_views, csv_path, seed
        every = max(1, plan.steps // QUALITY_CHECKS)
        self.at = set(range(every, plan.steps, every))
        self.history: list[ViewQuality] = read_quality_csv(csv_path)

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or (self.history and self.history[-1].step == trainer.global_step):
            return
        q = measure_view_quality(pl_module.backbone, self.images, self.two_views, trainer.global_step,  # type: ignore[arg-type]
                                 seed=self.seed)
        if q is not None:
            self.history.append(q)
            write_quality_row(self.csv_path, q)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == 0:
            self._measure(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        if trainer.global_step in self.at:
            self._measure(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._measure(trainer, pl_module)
