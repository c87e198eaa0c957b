"""The resumable checkpoint of a pretraining run: ``last.ckpt`` written whole at the end of every epoch, and the
check that a run may resume from it (same encoder config; the saved plan kept when the pretraining config is
unchanged)."""

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

__all__ = ["LastCheckpoint", "check_resume"]


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
    """Writes ``last.ckpt`` at the end of every training epoch, whole or not at all (written beside it, then renamed),
    and nothing else: Lightning's ``ModelCheckpoint`` writes a top-k copy beside ``last.ckpt`` (the same ~38 MB twice
    an epoch), or, with ``save_top_k=0``, only when training ends (nothing to resume from after a crash)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        partial = self.path.with_name(self.path.name + ".partial")
        trainer.save_checkpoint(partial)  # every rank calls it; the global-zero rank writes
        if trainer.is_global_zero:
            os.replace(partial, self.path)
        trainer.strategy.barrier("last-checkpoint")
