"""MoCo v2 as a Lightning module, composed from lightly blocks.

Query path: backbone → ``MoCoProjectionHead``. Key path: momentum (EMA) copies of both, without gradients.
Loss: ``NTXentLoss`` (InfoNCE) with a memory bank of past keys as negatives. SGD whose learning rate warms up
linearly and then follows a cosine to zero over the planned steps (:mod:`model.ssl.plan`); the EMA momentum
follows a cosine schedule from ``ema_start`` to ``ema_end`` over the same steps. The same module trains on CPU,
one GPU or several (DDP: keys are gathered across processes before they enter the memory bank).
"""

from __future__ import annotations

import copy
from typing import Any

import pytorch_lightning as pl
import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import MoCoProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from torch import nn

from model.encoder.backbone import embedding_dim
from model.ssl.plan import warmup_cosine

__all__ = ["MoCoV2"]


class MoCoV2(pl.LightningModule):
    """MoCo v2: query encoder + momentum key encoder + InfoNCE over a memory bank.

    Batches are ``(views, indices, skipped)`` as made by :func:`model.images.collate_skipping` over a
    two-view transform: ``views = [x_query (B, 3, S, S), x_key (B, 3, S, S)]``.

    Args:
        backbone: Maps ``(B, 3, S, S)`` to ``(B, D)``; must have ``out_dim``.
        lr: SGD learning rate at the start of the cosine schedule.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        memory_bank_size: Number of negative keys kept.
        temperature: InfoNCE temperature.
        proj_hidden_dim: Hidden width of the projection head.
        proj_out_dim: Output width of the projection head (the contrastive space).
        total_steps: Planned optimiser steps (length of the learning-rate and momentum schedules).
        warmup_steps: Steps of linear learning-rate warm-up.
        ema_start: Key-encoder momentum at step 0.
        ema_end: Key-encoder momentum at the last planned step.
        channels_last: Feed images in channels-last memory format.
        gather_distributed: Gather keys across processes before the memory bank update (DDP).
    """

    def __init__(
        self,
        backbone: nn.Module,
        lr: float = 6e-2,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        memory_bank_size: int = 4096,
        temperature: float = 0.2,
        proj_hidden_dim: int = 512,
        proj_out_dim: int = 128,
        total_steps: int = 1000,
        warmup_steps: int = 0,
        ema_start: float = 0.99,
        ema_end: float = 1.0,
        channels_last: bool = True,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        dim = embedding_dim(backbone)
        self.backbone = backbone
        self.projection_head = MoCoProjectionHead(dim, proj_hidden_dim, proj_out_dim)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NTXentLoss(
            temperature=temperature,
            memory_bank_size=(memory_bank_size, proj_out_dim),
            gather_distributed=gather_distributed,
        )

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams["channels_last"]:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Query projections ``(B, proj_out_dim)`` of images ``(B, 3, S, S)``."""
        query: torch.Tensor = self.projection_head(self.backbone(self._prepare(x)))  # (B, P)
        return query

    @torch.no_grad()
    def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        """Key projections ``(B, proj_out_dim)`` from the momentum encoder, detached."""
        key: torch.Tensor = self.projection_head_momentum(self.backbone_momentum(self._prepare(x)))  # (B, P)
        return key.detach()

    def ema_momentum(self) -> float:
        """The key-encoder momentum for the current global step (cosine from ema_start to ema_end)."""
        if self._trainer is None:
            return float(self.hparams["ema_start"])
        total = max(1, int(self.hparams["total_steps"]))
        step = min(int(self.global_step), total - 1)
        return float(cosine_schedule(step, total, self.hparams["ema_start"], self.hparams["ema_end"]))

    def momentum_update(self, m: float) -> None:
        """``key = m * key + (1 - m) * query`` for backbone and projection head parameters."""
        update_momentum(self.backbone, self.backbone_momentum, m=m)
        update_momentum(self.projection_head, self.projection_head_momentum, m=m)

    def contrastive_loss(self, x_query: torch.Tensor, x_key: torch.Tensor) -> torch.Tensor:
        """InfoNCE of query views against their keys and the memory bank (updates the bank)."""
        query = self.forward(x_query)  # (B, P)
        key = self.forward_momentum(x_key)  # (B, P)
        loss: torch.Tensor = self.criterion(query, key)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        views, indices, _skipped = batch
        if views is None or len(indices) < 2:
            return None  # every image of the batch was unreadable, or one left: BatchNorm needs two
        self.momentum_update(self.ema_momentum())
        x_query, x_key = views
        loss = self.contrastive_loss(x_query, x_key)
        self.log("loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(indices))
        return loss

    def configure_optimizers(self) -> Any:
        params = list(self.backbone.parameters()) + list(self.projection_head.parameters())
        optimizer = torch.optim.SGD(
            params, lr=self.hparams["lr"], momentum=self.hparams["momentum"], weight_decay=self.hparams["weight_decay"]
        )
        # A closure (not a callable object) so that a resumed run uses the current plan: LambdaLR saves only
        # the step counter of a plain function.
        warmup = int(self.hparams["warmup_steps"])

        def factor(step: int) -> float:  # reads the plan each step: a run re-fitted to its budget shortens it
            return warmup_cosine(step, max(1, int(self.hparams["total_steps"])), warmup)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        # A resumed optimiser carries the learning rate of the old plan (0 at the end of a finished
        # cosine); set it from the current plan for the step we resume at.
        for config in self.trainer.lr_scheduler_configs:
            sched = config.scheduler
            assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)  # configure_optimizers made it
            for group, base, factor in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
                group["lr"] = base * factor(sched.last_epoch)

    # lightly keeps the memory bank out of the state dict; keep it in our checkpoints so resuming
    # continues with the same negatives instead of random ones.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        bank = self.criterion.memory_bank
        checkpoint["memory_bank"] = {"bank": bank.bank.detach().cpu(), "ptr": bank.bank_ptr.detach().cpu()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("memory_bank")
        if saved is not None and tuple(saved["bank"].shape) == tuple(self.criterion.memory_bank.bank.shape):
            self.criterion.memory_bank.bank = saved["bank"].to(self.criterion.memory_bank.bank.device)
            self.criterion.memory_bank.bank_ptr = saved["ptr"].to(self.criterion.memory_bank.bank_ptr.device)
