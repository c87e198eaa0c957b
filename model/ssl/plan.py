"""The pretraining plan: how many optimiser steps a run takes, fitted to its time budget and its data.

A run's learning-rate schedule (linear warm-up, then cosine to zero) and its key-encoder momentum schedule both
span ``plan.steps``, so a run that stops on its time budget has finished its schedule instead of stopping with
the learning rate barely lowered. The number of steps is the smaller of

- the epoch cap (``PretrainConfig.epochs`` whole passes over the images), and
- what the time budget allows at the measured speed: a short probe times a few real steps (data loading,
  augmentation, forward, backward) before the run, and ``SAFETY`` of the budget is planned, leaving room for
  checkpoints, the quality checks and BatchNorm recalibration.

A plan of at least ``WHOLE_EPOCHS_FROM`` epochs is rounded down to whole epochs (each epoch sees every image
equally often); shorter plans keep their step count. The memory bank is fitted to the data: a bank larger than
the project would hold several stale keys of the same image as negatives.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "MIN_STEPS",
    "PRETRAIN_MIN_IMAGES",
    "SAFETY",
    "WARMUP_FRACTION",
    "WHOLE_EPOCHS_FROM",
    "PretrainPlan",
    "bank_size",
    "plan_run",
    "steps_per_epoch",
    "warmup_cosine",
]

PRETRAIN_MIN_IMAGES = 500
"""Below this many images a project does not pretrain by default. Measured on animal-mnist (32 px, 10 CPU-min
budget, docs/design.md "Pretraining recipe"): with 160 images the MoCo encoder lost to plain pixels + logistic
regression at every label budget; with 500 it won by 5-9 points of leaf accuracy."""
SAFETY = 0.9
"""Fraction of the time budget planned for optimiser steps."""
WHOLE_EPOCHS_FROM = 4
"""Plans of at least this many epochs are rounded down to whole epochs."""
MIN_STEPS = 20
"""No plan is shorter (a smaller budget overruns rather than training a handful of steps)."""
WARMUP_FRACTION = 0.05
"""Share of the planned steps spent warming the learning rate up linearly (at most 10 epochs)."""


@dataclass(frozen=True)
class PretrainPlan:
    """A fitted run.

    Attributes:
        steps: Optimiser steps of the run (the length of the LR and momentum schedules).
        steps_per_epoch: Steps of one pass over the images.
        warmup_steps: Steps of linear learning-rate warm-up.
        memory_bank_size: Negatives kept (fitted to the number of images).
        seconds_per_step: Measured by the probe; None when no budget was given.
        limited_by: ``"epochs"`` (the epoch cap) or ``"budget"`` (the time budget).
    """

    steps: int
    steps_per_epoch: int
    warmup_steps: int
    memory_bank_size: int
    seconds_per_step: float | None
    limited_by: str

    @property
    def epochs(self) -> float:
        """Passes over the images the plan makes (may be fractional for short budgets)."""
        return self.steps / self.steps_per_epoch

    @property
    def whole_epochs(self) -> bool:
        return self.steps % self.steps_per_epoch == 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["epochs"] = round(self.epochs, 2)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PretrainPlan:
        return cls(**{k: d[k] for k in ("steps", "steps_per_epoch", "warmup_steps", "memory_bank_size",
                                        "seconds_per_step", "limited_by")})


def steps_per_epoch(n_images: int, batch_size: int) -> int:
    """Steps of one epoch, as the pretraining data loader makes them (last partial batch dropped when the data
    holds at least two batches)."""
    if n_images >= 2 * batch_size:
        return n_images // batch_size
    return max(1, math.ceil(n_images / batch_size))


def bank_size(n_images: int, batch_size: int, configured: int) -> int:
    """The memory bank for ``n_images``: at most ``configured``, at most the images not in the current batch
    (rounded down to whole batches), at least one batch."""
    fitted = (max(0, n_images - batch_size) // batch_size) * batch_size
    return max(batch_size, min(configured, fitted))


def plan_run(n_images: int, batch_size: int, max_epochs: int, max_minutes: float | None,
             seconds_per_step: float | None, configured_bank: int) -> PretrainPlan:
    """Fit a run to its budget and data.

    Args:
        n_images: Images the run trains on.
        batch_size: Images per step.
        max_epochs: Epoch cap.
        max_minutes: Time budget; None = only the epoch cap.
        seconds_per_step: Measured speed (needed when ``max_minutes`` is set).
        configured_bank: The configured memory bank size (an upper bound).
    """
    per_epoch = steps_per_epoch(n_images, batch_size)
    cap = max_epochs * per_epoch
    steps, limited_by = cap, "epochs"
    if max_minutes is not None and seconds_per_step:
        budget = int(SAFETY * max_minutes * 60.0 / seconds_per_step)
        if budget < cap:
            steps, limited_by = budget, "budget"
            if steps >= WHOLE_EPOCHS_FROM * per_epoch:
                steps = (steps // per_epoch) * per_epoch
    steps = max(MIN_STEPS, steps) if cap >= MIN_STEPS else cap
    warmup = min(10 * per_epoch, max(1, round(WARMUP_FRACTION * steps)))
    return PretrainPlan(steps=steps, steps_per_epoch=per_epoch, warmup_steps=warmup,
                        memory_bank_size=bank_size(n_images, batch_size, configured_bank),
                        seconds_per_step=seconds_per_step, limited_by=limited_by)


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor at ``step``: linear from ~0 to 1 over ``warmup`` steps, then cosine to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    done = min(step - warmup, span)
    return 0.5 * (1.0 + math.cos(math.pi * done / span))
