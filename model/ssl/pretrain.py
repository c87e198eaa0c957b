"""Self-supervised pretraining of the encoder: MoCo v2 through the Lightning ``Trainer``.

``pretrain(images, encoder_cfg, cfg, out_dir)`` writes into ``out_dir``:

- ``checkpoints/last.ckpt``: resumable Lightning checkpoint (a pickle: only resume your own);
- ``loss.csv`` (``epoch,step,loss`` per optimiser step), ``quality.csv`` (the label-free quality signal of
  :mod:`model.ssl.quality`) and ``loss.png`` (both curves, with the step where the memory bank is full);
- ``pretrain_config.json``: the encoder and pretraining configs and the fitted plan of the run.

The run is first fitted to its budget and data (:mod:`model.ssl.plan`): a probe times a few real steps, and the
learning-rate and momentum schedules span the planned steps, so a run that stops on time has finished them.
Re-running with ``resume=True`` continues ``last.ckpt`` (weights, optimiser and scheduler state, memory bank)
with the plan it was started with.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch.utils.data import DataLoader

from model.data import ImageListDataset, collate_skipping
from model.encoder.backbone import build_backbone, encoder_version, load_backbone_weights
from model.encoder.batchnorm import recalibrate_batchnorm
from model.encoder.config import EncoderConfig
from model.errors import DataError
from model.images import ImageSource
from model.ssl.augment import moco_v2_transform
from model.ssl.checkpoint import LastCheckpoint, check_resume, checkpoint_every
from model.ssl.config import PretrainConfig
from model.ssl.loss_log import _Recorder, _truncate_loss_csv, write_loss_plot
from model.ssl.moco import MoCoV2
from model.ssl.plan import PretrainPlan, plan_run
from model.ssl.probe import probe_seconds_per_step
from model.ssl.quality import QualityCallback, ViewQuality, learned
from model.ssl.runtime import BudgetKeeper, on_gpu, precision, processes, quiet_lightning, time_limit

__all__ = ["PretrainResult", "pretrain"]

log = logging.getLogger(__name__)


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
        plan: The fitted plan of the run.
        steps_done: Optimiser steps done in total (including resumed ones).
        quality: Label-free quality measurements (:mod:`model.ssl.quality`), oldest first.
        learned: Whether view retrieval rose enough (None when it could not be measured twice).
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
    plan: PretrainPlan | None = None
    steps_done: int = 0
    quality: list[ViewQuality] = field(default_factory=list)
    learned: bool | None = None

    @property
    def finished_plan(self) -> bool:
        """Whether the run did every planned step (False: stopped by the time limit or interrupted)."""
        return self.plan is not None and self.steps_done >= self.plan.steps

    def summary(self) -> dict[str, object]:
        """A JSON-ready summary for job results and reports."""
        last = self.quality[-1].to_dict() if self.quality else None
        first = self.quality[0].to_dict() if self.quality else None
        return {"plan": self.plan.to_dict() if self.plan else None, "steps_done": self.steps_done,
                "finished_plan": self.finished_plan, "epochs_done": self.epochs_done,
                "images_per_second": round(self.images_per_second, 1), "quality_first": first,
                "quality_last": last, "learned": self.learned, "skipped_images": len(self.skipped)}


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
    quality_path = out_dir / "quality.csv"
    resuming = resume and last.exists()
    saved_plan = check_resume(config_path, encoder_cfg, cfg) if resuming else None
    if not resuming:
        for stale in (csv_path, quality_path, last):
            stale.unlink(missing_ok=True)
    ckpt_dir.mkdir(parents=True, exist_ok=True)

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    two_views = moco_v2_transform(encoder_cfg, cfg.augment)
    dataset = ImageListDataset(images, two_views)
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
    backbone = build_backbone(encoder_cfg)
    if init_state is not None and not resuming:
        load_backbone_weights(backbone, init_state, "init_state")

    def build_module(plan: PretrainPlan, world_size: int) -> MoCoV2:
        module = MoCoV2(
            backbone,
            lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
            memory_bank_size=plan.memory_bank_size, temperature=cfg.temperature,
            proj_hidden_dim=cfg.proj_hidden_dim, proj_out_dim=cfg.proj_out_dim,
            total_steps=plan.steps, warmup_steps=plan.warmup_steps,
            ema_start=cfg.ema_start, ema_end=cfg.ema_end, channels_last=cfg.channels_last,
            gather_distributed=world_size > 1,
        )
        return module.to(memory_format=torch.channels_last) if cfg.channels_last else module

    plan = saved_plan
    per_process = -(-len(images) // processes(cfg))  # images one process sees per epoch
    if plan is None:
        seconds = None
        if cfg.max_minutes is not None:
            unplanned = plan_run(per_process, cfg.batch_size, cfg.epochs, None, None, cfg.memory_bank_size)
            seconds = probe_seconds_per_step(build_module(unplanned, 1), loader, precision(cfg), cfg.accelerator)
        plan = plan_run(per_process, cfg.batch_size, cfg.epochs, cfg.max_minutes, seconds, cfg.memory_bank_size)
    def write_run_config(fitted: PretrainPlan) -> None:
        config_path.write_text(json.dumps({"encoder": encoder_cfg.to_dict(), "pretrain": cfg.to_dict(),
                                           "plan": fitted.to_dict()}, indent=2))

    log.info("Pretraining plan: %d steps (%.1f epochs, limited by %s), warm-up %d, memory bank %d, %s s/step.",
             plan.steps, plan.epochs, plan.limited_by, plan.warmup_steps, plan.memory_bank_size,
             f"{plan.seconds_per_step:.2f}" if plan.seconds_per_step else "unmeasured")
    write_run_config(plan)

    recorder = _Recorder(csv_path)
    quality = QualityCallback(images, two_views, plan, quality_path, cfg.seed)
    checkpointing = LastCheckpoint(last, checkpoint_every(plan))
    limit = time_limit(cfg, plan)
    # a plan the budget limited may grow to the epoch cap if the steps run faster than the probe measured
    keeper = BudgetKeeper(limit, ceiling=cfg.epochs * plan.steps_per_epoch if plan.limited_by.startswith("budget")
                          else None, grow_by=plan.steps_per_epoch if plan.whole_epochs else 1)
    result_planned = plan.steps
    with quiet_lightning():
        trainer = pl.Trainer(
            # whole-epoch plans stop on the epoch count (a finished epoch is complete on resume); others on steps
            max_steps=-1 if plan.whole_epochs else plan.steps,
            max_epochs=plan.steps // plan.steps_per_epoch if plan.whole_epochs else -1,
            max_time=limit,
            accelerator=cfg.accelerator,
            devices=list(cfg.devices) if isinstance(cfg.devices, tuple) else cfg.devices,
            strategy=cfg.strategy,
            precision=precision(cfg),  # type: ignore[arg-type]  # Lightning types it as a Literal of its names
            # SyncBatchNorm exists on CUDA only; DDP across CPU processes (gloo) keeps per-process statistics
            sync_batchnorm="ddp" in cfg.strategy and on_gpu(cfg),
            callbacks=[recorder, quality, keeper, *callbacks, checkpointing],
            logger=False,
            enable_checkpointing=False,  # no default ModelCheckpoint: LastCheckpoint writes the one checkpoint
            enable_progress_bar=progress,
            enable_model_summary=False,
            default_root_dir=str(out_dir),
            log_every_n_steps=1,
        )
    module = build_module(plan, trainer.world_size)
    resumed_from = None
    if resuming:
        saved = torch.load(last, map_location="cpu", weights_only=False)
        resumed_from = int(saved["epoch"]) + 1
        _truncate_loss_csv(csv_path, int(saved["global_step"]))
    with quiet_lightning():
        trainer.fit(module, train_dataloaders=loader, ckpt_path=str(last) if resuming else None)

    if trainer.is_global_zero:
        write_loss_plot(csv_path, out_dir / "loss.png", quality_csv=quality_path,
                        bank_full_step=plan.memory_bank_size // cfg.batch_size)
    trained = module.backbone
    recalibrate_batchnorm(trained, images, encoder_cfg, cfg.bn_recalibration_images, cfg.batch_size)
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in trained.state_dict().items()}
    if keeper.refitted_to is not None:  # the steps ran slower or faster than the probe measured
        plan = replace(plan, steps=keeper.refitted_to, limited_by="budget (re-fitted during the run)")
        log.info("Pretraining re-fitted to its time limit: %d steps instead of the probe's %d (the steps ran %s than "
                 "the probe measured).", plan.steps, result_planned,
                 "slower" if plan.steps < result_planned else "faster")
        write_run_config(plan)
    result = PretrainResult(
        backbone_state=state,
        encoder_version=encoder_version(state),
        epoch_losses=recorder.epoch_losses,
        step_losses=recorder.step_losses,
        epochs_done=int(trainer.current_epoch),
        images_per_second=recorder.images / recorder.seconds if recorder.seconds > 0 else 0.0,
        skipped=sorted(recorder.skipped.items()),
        checkpoint=last,
        resumed_from_epoch=resumed_from,
        plan=plan,
        steps_done=int(trainer.global_step),
        quality=quality.history,
        learned=learned(quality.history),
    )
    if not result.finished_plan:
        log.warning("Pretraining stopped at step %d of %d planned (time limit or interruption); the schedule did "
                    "not finish. Raise PRETRAIN_MAX_MINUTES or resume the run.", result.steps_done, plan.steps)
    if result.learned is False:
        log.warning("Pretraining did not visibly learn: view retrieval %.3f -> %.3f (needs to double). The encoder may "
                    "be no better than a random one; see %s.", result.quality[0].view_retrieval,
                    result.quality[-1].view_retrieval, out_dir / "loss.png")
    return result
