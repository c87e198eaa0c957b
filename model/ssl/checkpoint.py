"""The resumable checkpoint of a pretraining run: ``last.ckpt`` written whole at an epoch's end about once a minute
(:data:`CHECKPOINT_EVERY_S`) and at the run's last epoch, and the check that a run may resume from it (same encoder
config; the saved plan kept when the pretraining config is unchanged).

A checkpoint holds the encoder, its momentum copy, the optimiser state and the memory bank (~38 MB for the default
encoder; 0.1-0.3 s to write on a CPU machine). On a small project an epoch takes a few seconds, so one checkpoint
per epoch cost 5-15 % of the run (``bench/pretrain_throughput.py``); a crash now loses at most about a minute."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from model.encoder.config import EncoderConfig
from model.errors import ConfigError
from model.ssl.config import PretrainConfig
from model.ssl.plan import PretrainPlan

__all__ = ["CHECKPOINT_EVERY_S", "LastCheckpoint", "check_resume", "checkpoint_every"]

CHECKPOINT_EVERY_S = 60.0
"""Seconds of training between two resumable checkpoints, at least (whole epochs: an epoch longer than this is
checkpointed at each end)."""


def checkpoint_every(plan: PretrainPlan) -> int:
    """Epochs between checkpoints: the whole epochs that fit into :data:`CHECKPOINT_EVERY_S` at the plan's measured
    speed, at least 1 (and 1 when the speed was not measured)."""
    if not plan.seconds_per_step:
        return 1
    return max(1, int(CHECKPOINT_EVERY_S // (plan.seconds_per_step * plan.steps_per_epoch)))


def check_resume(config_path: Path, encoder_cfg: EncoderConfig, cfg: PretrainConfig) -> PretrainPlan | None:
    """The plan of the run being resumed when it was made for the same pretraining config (a changed config, e.g.
    a larger epoch cap, is planned again and the schedule continues on the new plan); refuses another encoder
    config."""
    if not config_path.exists():
        return None
    run = json.loads(config_path.read_text())
    saved = run["encoder"]
    now = encoder_cfg.to_dict()
    diff = {k for k in ("arch", "input_size", "mean", "std") if saved.get(k) != now.get(k)}
    if diff:
        raise ConfigError(
            f"the checkpoint in {config_path.parent} was trained with another encoder config ({sorted(diff)} "
            "differ); use a new out_dir or resume=False."
        )
    if run.get("plan") and run.get("pretrain") == json.loads(json.dumps(cfg.to_dict())):
        return PretrainPlan.from_dict(run["plan"])
    return None


class LastCheckpoint(Callback):
    """Writes ``last.ckpt`` at the end of every ``every``-th training epoch and of the run's last one (its plan done,
    or a stop asked for), whole or not at all (written beside it, then renamed), and nothing else: Lightning's
    ``ModelCheckpoint`` writes a top-k copy beside ``last.ckpt`` (the same ~38 MB twice an epoch), or, with
    ``save_top_k=0``, only when training ends (nothing to resume from after a crash).

    The decision reads only the epoch, the step and the stop flag, so every process of a distributed run decides the
    same (the write ends in a barrier)."""

    def __init__(self, path: Path, every: int = 1) -> None:
        self.path = path
        self.every = max(1, int(every))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        planned = int(pl_module.hparams.get("total_steps", 0))
        last = (trainer.should_stop or (planned > 0 and trainer.global_step >= planned)
                or (trainer.max_epochs is not None and 0 < trainer.max_epochs <= trainer.current_epoch + 1))
        if not last and (trainer.current_epoch + 1) % self.every:
            return
        partial = self.path.with_name(self.path.name + ".partial")
        trainer.save_checkpoint(partial)  # every rank calls it; the global-zero rank writes
        if trainer.is_global_zero:
            os.replace(partial, self.path)
        trainer.strategy.barrier("last-checkpoint")
