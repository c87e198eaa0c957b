"""Self-supervised pretraining of the encoder: MoCo v2 through the Lightning ``Trainer``.

``pretrain(images, encoder_cfg, cfg, out_dir)`` writes into ``out_dir``:

- ``checkpoints/last.ckpt``: resumable Lightning checkpoint (a pickle: only resume your own);
- ``loss.csv`` (``epoch,step,loss`` per optimiser step) and ``loss.png`` (the loss curve);
- ``pretrain_config.json``: the encoder and pretraining configs of the run.

Re-running with ``resume=True`` continues after the last epoch of ``last.ckpt`` (weights, optimiser and
LR-scheduler state, memory bank). A run stopped by ``max_minutes`` ends its current epoch early; that
epoch is checkpointed and counts as done (Lightning's semantics), so the next call starts a new epoch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch.utils.data import DataLoader

from model.data import ImageListDataset, collate_skipping
from model.encoder.backbone import build_backbone, encoder_version, load_backbone_weights
from model.encoder.config import EncoderConfig, eval_transform
from model.encoder.device import bf16_supported
from model.errors import ConfigError, DataError
from model.images import ImageSource
from model.ssl.augment import moco_v2_transform
from model.ssl.config import PretrainConfig
from model.ssl.loss_log import _Recorder, _truncate_loss_csv, write_loss_plot
from model.ssl.moco import MoCoV2
from model.ssl.quiet import quiet_lightning

__all__ = ["PretrainResult", "pretrain", "recalibrate_batchnorm"]


@dataclass
class PretrainResult:
    """The outcome of :func:`pretrain`.

    Attributes:
        backbone_state: The query backbone's weights (CPU tensors).
        encoder_version: Content address of ``backbone_state``.
        epoch_losses: Mean loss of each epoch trained in this call.
        step_losses: Loss of each optimiser step trained in this call.
        epochs_done: Completed epochs in total (including resumed ones).
        images_per_second: Training throughput of this call (0 when nothing was trained).
        skipped: ``(index, reason)`` of unreadable images (each listed once).
        checkpoint: Path of ``last.ckpt``.
        resumed_from_epoch: Completed epochs of the checkpoint this call resumed from, or None.
    """

    backbone_state: dict[str, torch.Tensor]
    encoder_version: str
    epoch_losses: list[float]
    step_losses: list[float]
    epochs_done: int
    images_per_second: float
    skipped: list[tuple[int, str]]
    checkpoint: Path
    resumed_from_epoch: int | None = None


def _precision(cfg: PretrainConfig) -> str:
    if cfg.precision is not None:
        return cfg.precision
    on_gpu = cfg.accelerator in ("gpu", "cuda") or (cfg.accelerator == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if on_gpu else "cpu")
    return "bf16-mixed" if bf16_supported(device) else "32-true"


def _check_resume(config_path: Path, encoder_cfg: EncoderConfig) -> None:
    if not config_path.exists():
        return
    saved = json.loads(config_path.read_text())["encoder"]
    now = encoder_cfg.to_dict()
    diff = {k for k in ("arch", "input_size", "mean", "std") if saved.get(k) != now.get(k)}
    if diff:
        raise ConfigError(
            f"the checkpoint in {config_path.parent} was trained with another encoder config ({sorted(diff)} "
            "differ); use a new out_dir or resume=False."
        )


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


class _LastCheckpoint(Callback):
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


def pretrain(
    images: Sequence[ImageSource],
    encoder_cfg: EncoderConfig,
    cfg: PretrainConfig,
    out_dir: Path,
    resume: bool = True,
    init_state: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
    callbacks: Sequence[Callback] = (),
) -> PretrainResult:
    """Pretrains an encoder with MoCo v2 on unlabelled images.

    Args:
        images: The project's images (paths, bytes, PIL images or uint8 arrays); unreadable ones are
            skipped and reported.
        encoder_cfg: Architecture, input size, normalisation (and optional ``init_weights``).
        cfg: Hyper-parameters, time budget and hardware.
        out_dir: Where checkpoints, ``loss.csv`` and ``loss.png`` go (created).
        resume: Continue from ``out_dir/checkpoints/last.ckpt`` when it exists.
        init_state: Backbone weights to start from (e.g. the live encoder); ignored when resuming.
        progress: Show a progress bar.
        callbacks: Extra Lightning callbacks (e.g. to report progress to a job queue or to cancel).

    Returns:
        The trained backbone weights, their version, losses, epochs done, throughput, skipped images.

    Raises:
        DataError: Fewer than 2 images.
        ConfigError: Bad settings, or the checkpoint was made for another encoder config.
    """
    if len(images) < 2:
        raise DataError(f"pretraining got {len(images)} image(s) but needs at least 2 (a contrastive batch); "
                        "add unlabelled images to the project (or the folder) first.")
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    config_path = out_dir / "pretrain_config.json"
    csv_path = out_dir / "loss.csv"
    resuming = resume and last.exists()
    if resuming:
        _check_resume(config_path, encoder_cfg)
    else:
        for stale in (csv_path, last):
            stale.unlink(missing_ok=True)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps({"encoder": encoder_cfg.to_dict(), "pretrain": cfg.to_dict()}, indent=2))

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    dataset = ImageListDataset(images, moco_v2_transform(encoder_cfg, cfg.augment))
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=len(dataset) >= 2 * cfg.batch_size,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        pin_memory=torch.cuda.is_available() and cfg.accelerator != "cpu",
        collate_fn=collate_skipping,
    )
    recorder = _Recorder(csv_path)
    checkpointing = _LastCheckpoint(last)
    with quiet_lightning():  # Lightning's banners, tips and internal deprecations stay out of the console
        trainer = pl.Trainer(
            max_epochs=cfg.epochs,
            max_time=timedelta(minutes=cfg.max_minutes) if cfg.max_minutes else None,
            accelerator=cfg.accelerator,
            devices=list(cfg.devices) if isinstance(cfg.devices, tuple) else cfg.devices,
            strategy=cfg.strategy,
            precision=_precision(cfg),
            sync_batchnorm="ddp" in cfg.strategy,
            callbacks=[recorder, *callbacks, checkpointing],
            logger=False,
            enable_checkpointing=False,  # no default ModelCheckpoint: _LastCheckpoint writes the one checkpoint
            enable_progress_bar=progress,
            enable_model_summary=False,
            default_root_dir=str(out_dir),
            log_every_n_steps=1,
        )
        backbone = build_backbone(encoder_cfg)
        if init_state is not None and not resuming:
            load_backbone_weights(backbone, init_state, "init_state")
        module = MoCoV2(
            backbone,
            lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
            memory_bank_size=cfg.memory_bank_size, temperature=cfg.temperature,
            proj_hidden_dim=cfg.proj_hidden_dim, proj_out_dim=cfg.proj_out_dim, max_epochs=cfg.epochs,
            ema_start=cfg.ema_start, ema_end=cfg.ema_end, channels_last=cfg.channels_last,
            gather_distributed=trainer.world_size > 1,
        )
        if cfg.channels_last:
            module = module.to(memory_format=torch.channels_last)
        resumed_from = None
        if resuming:
            saved = torch.load(last, map_location="cpu", weights_only=False)
            resumed_from = int(saved["epoch"]) + 1
            _truncate_loss_csv(csv_path, int(saved["global_step"]))
        trainer.fit(module, train_dataloaders=loader, ckpt_path=str(last) if resuming else None)

    if trainer.is_global_zero:
        write_loss_plot(csv_path, out_dir / "loss.png")
    backbone = module.backbone
    recalibrate_batchnorm(backbone, images, encoder_cfg, cfg.bn_recalibration_images, cfg.batch_size)
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in backbone.state_dict().items()}
    return PretrainResult(
        backbone_state=state,
        encoder_version=encoder_version(state),
        epoch_losses=recorder.epoch_losses,
        step_losses=recorder.step_losses,
        epochs_done=int(trainer.current_epoch),
        images_per_second=recorder.images / recorder.seconds if recorder.seconds > 0 else 0.0,
        skipped=sorted(recorder.skipped.items()),
        checkpoint=last,
        resumed_from_epoch=resumed_from,
    )
