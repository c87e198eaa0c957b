"""The training job's encoder steps: the live encoder, a newly pretrained one, or (for a project too small to
pretrain) the initial encoder; and embeddings of all images.

Which one (:func:`choose_encoder`) follows the pretraining policy (``ml_backend.training.policy``), the same for a
training and for the cold-start work of a project whose labels cannot train heads yet. Before the first model
version the project's encoder is kept in ``ProjectPaths.start_encoder`` (:func:`save_start_encoder`): the
cold-start runs and the first training then embed with the same weights (the embedding cache and the kNN index stay
valid, and a project pretrained at cold start is not pretrained again); once a version is published the live
version's encoder takes over.

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
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from ml_backend.configs import encoder_config, pretrain_config
from ml_backend.paths import ProjectPaths
from ml_backend.settings import Settings
from ml_backend.training.images import ProjectImages
from ml_backend.training.policy import (
    PretrainDecision,
    decide_pretrain,
    pretrain_requested,
    read_pretrain_record,
)
from ml_backend.training.records import timed_step
from model.atomic import atomic_write_bytes, atomic_write_json
from model.bundle import live_version, load_live
from model.encoder.backbone import build_backbone, encoder_version
from model.encoder.batchnorm import recalibrate_batchnorm
from model.encoder.cache import EmbeddingCache, embed_through_cache
from model.encoder.config import EncoderConfig
from model.encoder.embedder import Embedder
from model.ssl.recipe import ImageSummary, summarize_images

__all__ = ["Encoder", "EncoderChoice", "choose_encoder", "embed_all", "initial_encoder", "live_encoder", "pending_run",
           "pretrain_encoder", "save_start_encoder", "start_encoder"]

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


def start_encoder(paths: ProjectPaths) -> Encoder | None:
    """The encoder saved for a project without a model version (:func:`save_start_encoder`), or None (none saved,
    or unreadable: then a new one is made)."""
    try:
        with safe_open(str(paths.start_encoder), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        return Encoder(EncoderConfig.from_dict(json.loads(meta["config"])), state, str(meta["version"]))
    except FileNotFoundError:
        return None
    except (OSError, SafetensorError, KeyError, ValueError, TypeError) as exc:
        log.warning("Project %s: start encoder %s unreadable (%s); a new one is made.", paths.project_id,
                    paths.start_encoder, exc)
        return None


def save_start_encoder(paths: ProjectPaths, encoder: Encoder) -> None:
    """Keep ``encoder`` as the project's encoder until its first model version (one file, replaced atomically)."""
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state.items()}
    meta = {"config": json.dumps(encoder.cfg.to_dict()), "version": encoder.version}
    atomic_write_bytes(paths.start_encoder, save(state, metadata=meta))


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
    """The encoder a project starts from without pretraining: ``ENCODER_INIT_WEIGHTS`` or random weights drawn with
    ``PRETRAIN_SEED`` (the same images give the same encoder, and so the same model choice, on every run), with
    BatchNorm statistics recomputed on the project's images (random running statistics make embeddings explode)."""
    cfg = encoder_config(settings, _summary(images))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.pretrain_seed)
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


@dataclass
class EncoderChoice:
    """The encoder a run embeds with, and how it was chosen.

    Attributes:
        encoder: the encoder to use.
        decision: the pretraining policy's decision.
        pretrain_report: the pretraining run's report when this run pretrained, else None.
        live: the live model version's encoder (None before the first version).
        fresh: ``encoder`` was made by this run (pretrained, or the initial encoder) rather than loaded.
    """

    encoder: Encoder
    decision: PretrainDecision
    pretrain_report: dict[str, Any] | None
    live: Encoder | None
    fresh: bool


def choose_encoder(settings: Settings, paths: ProjectPaths, images: ProjectImages, force_pretrain: bool,
                   durations: dict[str, float]) -> EncoderChoice:
    """The pretraining policy applied: pretrain MoCo on all images (a new encoder), else the live encoder, else the
    saved start encoder, else the initial encoder (``durations`` gets the step's seconds)."""
    live = live_encoder(paths)
    current = live if live is not None else start_encoder(paths)
    decision = decide_pretrain(len(images.paths), read_pretrain_record(paths), current is not None,
                               force_pretrain or pretrain_requested(paths), settings.repretrain_fraction,
                               settings.pretrain_min_images)
    log.info("Project %s: pretrain=%s (%s)", paths.project_id, decision.pretrain, decision.reason.value)
    if decision.pretrain:
        with timed_step(durations, "pretrain"):
            encoder, report = pretrain_encoder(settings, paths, images, init=current)
        return EncoderChoice(encoder, decision, report, live, fresh=True)
    if current is not None:
        return EncoderChoice(current, decision, None, live, fresh=False)
    with timed_step(durations, "encoder"):
        encoder = initial_encoder(settings, images)
    return EncoderChoice(encoder, decision, None, live, fresh=True)


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
