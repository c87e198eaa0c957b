"""Self-supervised pretraining of the encoder: MoCo v2 from lightly blocks, its augmentations and run settings, the
Lightning driver and its loss log."""

__all__ = [
    "augment",
    "checkpoint",
    "config",
    "loss_log",
    "moco",
    "pretrain",
]
