"""How a pretraining run uses the machine: training processes, precision, Lightning's hard time limit, and a
console free of Lightning's advertising and harmless warnings."""

from __future__ import annotations

import logging
import time
import warnings
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from model.encoder.device import bf16_supported
from model.ssl.config import PretrainConfig
from model.ssl.plan import SAFETY, PretrainPlan

__all__ = ["BudgetKeeper", "on_gpu", "precision", "processes", "quiet_lightning", "time_limit"]

CHECK_EVERY = 5
"""Steps between two projections of a run's end (:class:`BudgetKeeper`)."""


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


class BudgetKeeper(Callback):
    """Keeps a run's schedule finishing within its time limit when the machine's speed differs from the probe's.

    Every ``CHECK_EVERY`` steps it projects the run's end at the slower of the run's average speed and that of its
    last ``CHECK_EVERY`` steps, so a slowdown late in the run counts at once. When the planned steps no longer fit
    into ``SAFETY`` of the limit, the plan is shortened to what fits (the learning-rate and key-momentum schedules
    read ``total_steps`` each step, so they finish with it) and the run stops there, instead of being cut by
    Lightning's hard stop with its learning rate still high. When the machine speeds up again, the plan grows back,
    up to the steps first planned: a minute of contention early in a 30-minute run costs that minute's steps, not
    the rest of the run.

    A plan limited by the budget may also grow past the probe's plan, up to ``ceiling`` steps (the epoch cap), when
    the steps run faster than the probe measured (a probe taken while another process had the cores): in whole
    ``grow_by`` steps (an epoch, for whole-epoch plans) and only in the first half of the
    first plan, so the cosine is stretched while the learning rate is still high, not raised again near its end.
    Lightning's own stop (``max_epochs`` / ``max_steps``) moves with the plan. ``refitted_to`` records the plan's
    end when it differs from the first plan.

    Under DDP the projection of rank 0 is broadcast, so that every process stops at the same step.
    """

    def __init__(self, limit: timedelta | None, ceiling: int | None = None, grow_by: int = 1) -> None:
        self.limit_s = limit.total_seconds() if limit is not None else None
        self.ceiling = ceiling
        self.grow_by = max(1, int(grow_by))
        self.refitted_to: int | None = None
        self._planned = 0
        self._t0 = 0.0
        self._step0 = 0
        self._recent: deque[float] = deque(maxlen=CHECK_EVERY + 1)  # clock at the last steps' ends

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0, self._step0 = time.monotonic(), trainer.global_step
        self._planned = int(pl_module.hparams["total_steps"])
        self._recent.clear()
        self._recent.append(self._t0)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        step, total = trainer.global_step, int(pl_module.hparams["total_steps"])
        if step >= total:
            trainer.should_stop = True  # a shortened plan ends here
            return
        now = time.monotonic()
        self._recent.append(now)
        done = step - self._step0
        if self.limit_s is None or done < CHECK_EVERY or done % CHECK_EVERY:
            return
        elapsed = now - self._t0
        recent = (now - self._recent[0]) / (len(self._recent) - 1)
        seconds_per_step = max(elapsed / done, recent)
        fits = step + int((SAFETY * self.limit_s - elapsed) / seconds_per_step)
        wanted = max(step + 1, min(self._planned, fits))
        if self.ceiling is not None and fits > self._planned and step < self._planned // 2:
            grown = self._planned + (min(self.ceiling, fits) - self._planned) // self.grow_by * self.grow_by
            wanted = max(wanted, grown)
        elif total > self._planned:
            wanted = max(wanted, min(total, fits))  # a grown plan is kept (shortened only if it no longer fits)
        if getattr(trainer, "world_size", 1) > 1:
            wanted = int(trainer.strategy.broadcast(wanted, src=0))
        if wanted != total:
            pl_module.hparams["total_steps"] = wanted
            self.refitted_to = wanted if wanted != self._planned else None
            if wanted > total:
                _extend_lightning_stop(trainer, wanted, self.grow_by)


def _extend_lightning_stop(trainer: pl.Trainer, steps: int, steps_per_epoch: int) -> None:
    """Moves Lightning's stop to a grown plan's end: ``max_epochs`` of a run that stops on whole epochs, else
    ``max_steps``."""
    loop = getattr(trainer, "fit_loop", None)
    if loop is None:
        return
    if loop.max_epochs is not None and loop.max_epochs > 0:
        loop.max_epochs = max(loop.max_epochs, -(-steps // steps_per_epoch))
    if loop.epoch_loop.max_steps is not None and loop.epoch_loop.max_steps > 0:
        loop.epoch_loop.max_steps = max(loop.epoch_loop.max_steps, steps)
