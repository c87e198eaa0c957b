"""BatchNorm recalibration: running statistics recomputed on plain views of the project's images."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader

from model.data import ImageListDataset, collate_skipping
from model.encoder.config import EncoderConfig, eval_transform
from model.images import ImageSource

__all__ = ["recalibrate_batchnorm"]


@torch.no_grad()
def recalibrate_batchnorm(
    backbone: torch.nn.Module, images: Sequence[ImageSource], encoder_cfg: EncoderConfig, max_images: int,
    batch_size: int,
) -> int:
    """Recompute every BatchNorm's running statistics on plain (eval-transformed) views of the images.

    Training updates the running statistics with momentum on augmented views; after a short pretraining they
    are still near their initial values and embeddings of the frozen encoder explode. A cumulative average over
    up to ``max_images`` evenly spaced images fixes both. Returns the number of images used (0 = nothing done).
    """
    bns = [m for m in backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns or max_images <= 0:
        return 0
    step = max(1, len(images) // max_images)
    subset = [images[i] for i in range(0, len(images), step)][:max_images]
    loader = DataLoader(ImageListDataset(subset, eval_transform(encoder_cfg)), batch_size=max(2, batch_size),
                        shuffle=False, collate_fn=collate_skipping)
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over all batches seen
    was_training = backbone.training
    backbone.train()
    used = 0
    device = next(backbone.parameters()).device
    for x, _, _ in loader:
        if x is not None and len(x) > 1:
            backbone(x.to(device))
            used += len(x)
    backbone.train(was_training)
    for m, (momentum, training) in zip(bns, saved):
        m.momentum = momentum
        m.train(training)
    return used
