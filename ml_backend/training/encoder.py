"""The training job's encoder steps: the live encoder, a newly pretrained one, or (for a project too small to
pretrain) the initial encoder; and embeddings of all images.

Pretraining resumes an interrupted run of the same project (``ProjectPaths.pretrain_pending`` names it);
embeddings go through the project's embedding cache, so only images never embedded by this encoder are computed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ml_backend.configs import encoder_config, pretrain_config
from ml_backend.paths import ProjectPaths
from ml_backend.settings import Settings
from ml_backend.training.images import ProjectImages
from model.atomic import atomic_write_json
from model.bundle import live_version, load_live
from model.encoder.backbone import build_backbone, encoder_version
from model.encoder.batchnorm import recalibrate_batchnorm
from model.encoder.cache import EmbeddingCache, embed_through_cache
from model.encoder.config import EncoderConfig
from model.encoder.embedder import Embedder
from model.ssl.recipe import ImageSummary, summarize_images

__all__ = ["Encoder", "embed_all", "initial_encoder", "live_encoder", "pending_run", "pretrain_encoder"]

log = logging.getLogger(__name__)


@dataclass
class Encoder:
    """An encoder: config, weights and version."""

    cfg: EncoderConfig
    state: dict[str, torch.Tensor]  # backbone state_dict
    version: str


def live_encoder(paths: ProjectPaths) -> Encoder | None:
    """The encoder of the live model version, or None before the first version."""
    if live_version(paths.models) is None:
        return None
    bundle = load_live(paths.models)
    return Encoder(bundle.encoder_cfg, bundle.backbone_state, bundle.manifest.encoder_version)


def pending_run(paths: ProjectPaths, clear: bool = False) -> Path:
    """The run directory of this project's unfinished pretraining (resumed after a crash); a new one when none
    is pending. ``clear=True`` forgets the pending run (it was published)."""
    marker = paths.pretrain_pending
    if clear:
        marker.unlink(missing_ok=True)
        return paths.pretrain_runs
    try:
        return Path(json.loads(marker.read_text())["out_dir"])
    except (FileNotFoundError, ValueError, KeyError):
        run = paths.pretrain_runs / time.strftime("run-%Y%m%dT%H%M%S", time.gmtime())
        atomic_write_json(marker, {"out_dir": str(run)})
        return run


def _summary(images: ProjectImages) -> ImageSummary:
    return summarize_images([str(p) for p in images.paths])


def initial_encoder(settings: Settings, images: ProjectImages) -> Encoder:
    """The encoder a project starts from without pretraining: ``ENCODER_INIT_WEIGHTS`` or random weights, with
    BatchNorm statistics recomputed on the project's images (random running statistics make embeddings explode)."""
    cfg = encoder_config(settings, _summary(images))
    backbone = build_backbone(cfg)
    recalibrate_batchnorm(backbone, [str(p) for p in images.paths], cfg, max_images=2048, batch_size=128)
    state = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    return Encoder(cfg, state, encoder_version(state))


def pretrain_encoder(settings: Settings, paths: ProjectPaths, images: ProjectImages, init: Encoder | None
                     ) -> tuple[Encoder, dict[str, Any]]:
    """MoCo v2 pretraining on all the project's images; resumes an interrupted run of this project.

    Returns:
        The new encoder and a JSON-ready report of the run (recipe, plan, quality, whether it learned).
    """
    from model.ssl.pretrain import pretrain  # Lightning: 2-3 s of imports, paid only by runs that pretrain

    summary = _summary(images)
    cfg = encoder_config(settings, summary)
    if init is not None and dataclasses.replace(init.cfg, init_weights=None) != dataclasses.replace(cfg, init_weights=None):
        init = None  # the settings changed the architecture or input size: start over (from ENCODER_INIT_WEIGHTS when set)
    out_dir = pending_run(paths)
    run_cfg = pretrain_config(settings, len(images.paths), summary)
    result = pretrain([str(p) for p in images.paths], cfg, run_cfg, out_dir, resume=True,
                      init_state=init.state if init is not None else None)
    log.info("Project %s: pretrained %d steps / %d epochs (%.0f img/s), encoder %s, learned=%s.", paths.project_id,
             result.steps_done, result.epochs_done, result.images_per_second, result.encoder_version, result.learned)
    report = {"images": summary.to_dict(), "input_size": cfg.input_size, "augment": run_cfg.augment.to_dict(),
              "run_dir": str(out_dir), **result.summary()}
    return Encoder(cfg, result.backbone_state, result.encoder_version), report


def embed_all(settings: Settings, paths: ProjectPaths, encoder: Encoder, images: ProjectImages
              ) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of all images through the embedding cache; only missing ones are computed.

    Returns:
        ``(emb (N, D) float32, ok (N,) bool)`` in ``images`` order; ``ok`` is False for unreadable images.
    """
    backbone = build_backbone(encoder.cfg)
    backbone.load_state_dict(encoder.state)
    cache = EmbeddingCache(paths.cache, encoder.version, int(backbone.out_dim))
    embedder = Embedder(backbone, encoder.cfg, device=settings.device)
    emb, ok = embed_through_cache(embedder, cache, [str(p) for p in images.paths], images.hashes, progress=True)
    log.info("Project %s: %d embeddings, %d unreadable images.", paths.project_id, int(ok.sum()), int((~ok).sum()))
    return emb, ok
