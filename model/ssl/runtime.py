"""How a pretraining run uses the machine: training processes, precision, Lightning's hard time limit, and a
console free of Lightning's advertising and harmless warnings."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch

from model.encoder.device import bf16_supported
from model.ssl.config import PretrainConfig
from model.ssl.plan import SAFETY, PretrainPlan

__all__ = ["on_gpu", "precision", "processes", "quiet_lightning", "time_limit"]


def on_gpu(cfg: PretrainConfig) -> bool:
    return cfg.accelerator in ("gpu", "cuda") or (cfg.accelerator == "auto" and torch.cuda.is_available())


def processes(cfg: PretrainConfig) -> int:
    """Training processes Lightning will start (each sees 1/N of the images per epoch under DDP)."""
    devices = cfg.devices
    if isinstance(devices, tuple):
        return max(1, len(devices))
    if isinstance(devices, int) and devices > 0:
        return devices
    every_gpu = devices in (-1, "-1") or (devices == "auto" and "ddp" in cfg.strategy)
    if every_gpu and on_gpu(cfg):
        return max(1, torch.cuda.device_count())
    return 1


def precision(cfg: PretrainConfig) -> str:
    if cfg.precision is not None:
        return cfg.precision
    device = torch.device("cuda" if on_gpu(cfg) else "cpu")
    return "bf16-mixed" if bf16_supported(device) else "32-true"


def time_limit(cfg: PretrainConfig, plan: PretrainPlan) -> timedelta | None:
    """Lightning's hard stop: the budget, or the planned steps' measured time when the plan had to take more
    (``MIN_STEPS``); a resumed run's plan may have no measured speed."""
    if not cfg.max_minutes:
        return None
    seconds = cfg.max_minutes * 60.0
    if plan.seconds_per_step:
        seconds = max(seconds, plan.steps * plan.seconds_per_step / SAFETY)
    return timedelta(seconds=seconds)


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Keeps Lightning's advertising, device summary and known-harmless warnings out of the console."""
    with warnings.catch_warnings():
        for message in (".*does not have many workers.*", ".*exceeds max_steps.*",
                        ".*Checkpoint directory .* exists and is not empty.*", ".*LitLogger.*", ".*litlogger.*",
                        ".*tensorboardX.*", ".*GPU available but not used.*", ".*LeafSpec.*",
                        ".*callbacks used to create the checkpoint.*"):
            warnings.filterwarnings("ignore", message=message)
        noisy = [logging.getLogger(n) for n in ("pytorch_lightning", "lightning", "lightning.pytorch",
                                               "pytorch_lightning.utilities.rank_zero")]
        levels = [lg.level for lg in noisy]
        for lg in noisy:
            lg.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for lg, level in zip(noisy, levels):
                lg.setLevel(level)
