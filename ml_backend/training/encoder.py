"""The training job's encoder steps: the live encoder or a newly pretrained one, and embeddings of all images.

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

import numpy as np
import torch

from ml_backend.configs import encoder_config, pretrain_config
from ml_backend.paths import ProjectPaths
from ml_backend.settings import Settings
from ml_backend.training.images import ProjectImages
from model.atomic import atomic_write_json
from model.bundle import live_version, load_live
from model.encoder.backbone import build_backbone
from model.encoder.cache import EmbeddingCache, embed_through_cache
from model.encoder.config import EncoderConfig
from model.encoder.embedder import Embedder

__all__ = ["Encoder", "embed_all", "live_encoder", "pending_run", "pretrain_encoder"]

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


def pretrain_encoder(settings: Settings, paths: ProjectPaths, images: ProjectImages, init: Encoder | None) -> Encoder:
    """MoCo v2 pretraining on all the project's images; resumes an interrupted run of this project."""
    from model.ssl.pretrain import pretrain  # Lightning: 2-3 s of imports, paid only by runs that pretrain

    cfg = encoder_config(settings)
    if init is not None and dataclasses.replace(init.cfg, init_weights=None) != dataclasses.replace(cfg, init_weights=None):
        init = None  # the settings changed the architecture: start over (from ENCODER_INIT_WEIGHTS when set)
    out_dir = pending_run(paths)
    result = pretrain([str(p) for p in images.paths], cfg, pretrain_config(settings, len(images.paths)), out_dir,
                      resume=True, init_state=init.state if init is not None else None)
    log.info("Project %s: pretrained %d epochs (%.0f img/s), encoder %s.", paths.project_id, result.epochs_done,
             result.images_per_second, result.encoder_version)
    return Encoder(cfg, result.backbone_state, result.encoder_version)


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
