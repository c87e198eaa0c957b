"""The training job's model steps: the encoder (live or newly pretrained), embeddings through the cache, the
heads fit (with or without a reused calibration), the atomic publish, and the disagreement analysis.

Used by :func:`ml_backend.training.jobs.train_project`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml_backend.training.calibration import ReuseDecision, decide_reuse, label_digests, read_calibration
from ml_backend.training.data import Labels, ProjectImages, ProjectSource, labels_shortfall, write_json
from ml_backend.settings import Settings
from model.errors import DataError

if TYPE_CHECKING:
    from ml_backend.training.jobs import PretrainDecision

log = logging.getLogger(__name__)


@dataclass
class Encoder:
    """An encoder: config, weights and version."""

    cfg: Any  # model.encoder.backbone.EncoderConfig
    state: dict[str, Any]  # backbone state_dict
    version: str


def live_encoder(settings: Settings, pid: int) -> Encoder | None:
    """The encoder of the live model version, or None before the first version."""
    from model.bundle import live_version, load_live

    root = settings.project_dir(pid) / "models"
    if live_version(root) is None:
        return None
    bundle = load_live(root)
    return Encoder(bundle.encoder_cfg, bundle.backbone_state, bundle.manifest.encoder_version)


def encoder_config(settings: Settings) -> Any:
    """The encoder config the settings ask for (``ENCODER_ARCH``, ``ENCODER_INPUT_SIZE``, ``ENCODER_INIT_WEIGHTS``)."""
    from model.encoder.backbone import EncoderConfig

    init = str(settings.init_weights) if settings.init_weights else None
    return EncoderConfig(arch=settings.arch, input_size=settings.input_size, init_weights=init)


def lightning_device(device: str) -> tuple[str, Any]:
    """Lightning ``(accelerator, devices)`` for a ``DEVICE`` setting: one device per job.

    ``auto`` → ("auto", 1); ``cpu`` → ("cpu", 1); ``cuda`` → ("gpu", 1); ``cuda:N`` → ("gpu", (N,)).
    """
    if device == "cpu":
        return "cpu", 1
    if device == "cuda":
        return "gpu", 1
    if device.startswith("cuda:"):
        return "gpu", (int(device.split(":", 1)[1]),)
    return "auto", 1


def pending_run(project_dir: Path, clear: bool = False) -> Path:
    """The pretraining run directory of this project's unfinished pretraining (resumed after a crash)."""
    marker = project_dir / "jobs" / "pretrain_pending.json"
    if clear:
        marker.unlink(missing_ok=True)
        return project_dir / "pretrain"
    try:
        return Path(json.loads(marker.read_text())["out_dir"])
    except (FileNotFoundError, ValueError, KeyError):
        run = project_dir / "pretrain" / time.strftime("run-%Y%m%dT%H%M%S", time.gmtime())
        write_json(marker, {"out_dir": str(run)})
        return run


def pretrain_encoder(settings: Settings, pid: int, images: ProjectImages, init: Encoder | None) -> Encoder:
    """MoCo v2 pretraining on all the project's images; resumes an interrupted run of this project."""
    from model.ssl.pretrain import PretrainConfig, pretrain

    cfg = encoder_config(settings)
    if init is not None and init.cfg != cfg:
        init = None  # the settings changed the architecture: start over
    accelerator, devices = lightning_device(settings.device)
    if settings.pretrain_devices != "1":  # several GPUs for one pretraining (DDP through Lightning)
        devices = -1 if settings.pretrain_devices == "all" else int(settings.pretrain_devices)
    batch = max(2, min(settings.pretrain_batch_size, len(images.paths)))
    pcfg = PretrainConfig(epochs=settings.pretrain_epochs, batch_size=batch, max_minutes=settings.pretrain_max_minutes,
                          memory_bank_size=max(2048, batch), accelerator=accelerator, devices=devices,
                          strategy=settings.pretrain_strategy)
    out_dir = pending_run(settings.project_dir(pid))
    result = pretrain([str(p) for p in images.paths], cfg, pcfg, out_dir, resume=True,
                      init_state=init.state if init is not None else None)
    log.info("Project %s: pretrained %d epochs (%.0f img/s), encoder %s.", pid, result.epochs_done,
             result.images_per_second, result.encoder_version)
    return Encoder(cfg, result.backbone_state, result.encoder_version)


def embed_all(settings: Settings, pid: int, encoder: Encoder, images: ProjectImages) -> tuple[Any, Any]:
    """Embeddings of all images through the embedding cache; only missing ones are computed.

    Returns:
        ``(emb (N, D) float32, ok (N,) bool)`` in ``images`` order; ``ok`` is False for unreadable images.
    """
    from model.encoder.cache import EmbeddingCache, embed_through_cache
    from model.encoder.embedder import Embedder
    from model.encoder.backbone import build_backbone

    backbone = build_backbone(encoder.cfg)
    backbone.load_state_dict(encoder.state)
    cache = EmbeddingCache(settings.project_dir(pid) / "cache", encoder.version, int(backbone.out_dim))
    embedder = Embedder(backbone, encoder.cfg, device=settings.device)
    emb, ok = embed_through_cache(embedder, cache, [str(p) for p in images.paths], images.hashes, progress=True)
    log.info("Project %s: %d embeddings, %d unreadable images.", pid, int(ok.sum()), int((~ok).sum()))
    return emb, ok


@dataclass
class Fit:
    """The heads fit and the tasks it was trained on (rows of ``oof_level_probs``)."""

    result: Any  # model.heads.training.FitResult
    task_ids: list[int]
    pairs: list[tuple[str, tuple[str, ...]]]  # (content hash, path) training pairs
    rows: list[int]  # rows of the embeddings (images order) trained on


def fit_heads(settings: Settings, pid: int, source: ProjectSource, labels: Labels, images: ProjectImages, emb: Any,
              ok: Any, encoder: Encoder) -> tuple[Fit, ReuseDecision]:
    """Fit the heads on the consensus labels of readable images.

    With the encoder and nearly the same labels as the last cross-validation (``ml_backend.training.calibration``),
    only the final heads train and the last temperature is reused; otherwise the out-of-fold
    cross-validation runs first.
    """
    from model.heads.heads import HeadsConfig
    from model.heads.training import fit

    rows, task_ids, paths = [], [], []
    for i, tid in enumerate(images.task_ids):
        path = labels.result.labels.get(tid)
        if path is not None and ok[i]:
            rows.append(i)
            task_ids.append(tid)
            paths.append(tuple(path))
    skip = labels_shortfall(dict(zip(task_ids, paths)), 2)
    if skip is not None:
        raise DataError(f"after dropping tasks whose image is unavailable: {skip}.")
    pairs = [(images.hashes[i], p) for i, p in zip(rows, paths)]
    record = read_calibration(settings.project_dir(pid))
    reuse = decide_reuse(record, encoder.version, label_digests(pairs), settings.calibration_reuse_fraction)
    log.info("Project %s: calibration %s (%s).", pid, "reused" if reuse.reuse else "cross-validated first",
             reuse.reason)
    if reuse.reuse:
        assert record is not None
        result = fit(emb[rows], paths, source.config.taxonomy, HeadsConfig(), temperature=record.temperature)
        result.metrics = {**record.metrics, "n_labelled": len(rows),
                          "calibration": {"from_version": record.model_version, "n_labelled": record.n_labelled,
                                          "changed_fraction": reuse.changed_fraction}}
    else:
        result = fit(emb[rows], paths, source.config.taxonomy, HeadsConfig())
    return Fit(result, task_ids, pairs, rows), reuse


def cross_validate_after_publish(fit: Fit, emb: Any, source: ProjectSource) -> Fit:
    """The cross-validation a reused calibration skipped: out-of-fold probabilities for the disagreement flags
    and the temperature and metrics the next retrain reuses. The published heads stay as they are."""
    from model.heads.heads import HeadsConfig
    from model.heads.training import cross_validate

    paths = [p for _, p in fit.pairs]
    cv = cross_validate(emb[fit.rows], paths, source.config.taxonomy, HeadsConfig())
    result = dataclasses.replace(fit.result, temperature=cv.temperature, oof_level_probs=cv.oof_level_probs,
                                 oof_level_logits=cv.oof_level_logits, oof_predictions=cv.oof_predictions,
                                 metrics=dict(cv.metrics), labelled_index=cv.labelled_index, targets=cv.targets,
                                 fold_of=cv.fold_of)
    return dataclasses.replace(fit, result=result)


def publish_version(settings: Settings, pid: int, source: ProjectSource, labels: Labels, images: ProjectImages,
                    encoder: Encoder, fit: Fit, decision: PretrainDecision, counts: dict[str, int],
                    reuse: ReuseDecision | None = None) -> str:
    """Publish the new model version atomically, prune old ones; returns the version."""
    from model.bundle import data_fingerprint, prune, publish

    root = settings.project_dir(pid) / "models"
    extra = {"consensus": labels.result.policy_record(), "excluded": len(labels.result.excluded),
             "pretrained": decision.pretrain, "pretrain_decision": decision.to_dict(), "counts": dict(counts),
             "project_id": pid, "label_config_from_name": source.config.from_name,
             "calibration": reuse.to_dict() if reuse is not None else None}
    manifest = publish(root, source.config.taxonomy, encoder.cfg, encoder.state, fit.result.heads,
                       fit.result.temperature, fit.result.metrics, data_fingerprint(fit.pairs), extra,
                       counts=dict(counts))
    prune(root, keep=settings.keep_versions)
    log.info("Project %s: published model version %s.", pid, manifest.version)
    return str(manifest.version)


def analyse_disagreements(settings: Settings, pid: int, source: ProjectSource, labels: Labels,
                          images: ProjectImages, emb: Any, ok: Any, fit: Fit, version: str) -> int:
    """Consensus again with the model's out-of-sample opinion → report saved, flags posted; returns #flags.

    The model's opinion is out-of-sample for every task: out-of-fold probabilities for the tasks trained
    on, the final heads' probabilities for tasks that were not trained on (excluded or unlabelled).
    """
    import numpy as np
    import torch

    from ml_backend.training import disagreements
    from model.crowd.consensus import consensus

    level_probs: dict[int, list[Any]] = {}
    oof = fit.result.oof_level_probs  # per level (N_lab, K_k); empty when there were too few labels for folds
    if oof:
        for row, position in enumerate(np.asarray(fit.result.labelled_index)):
            level_probs[fit.task_ids[int(position)]] = [np.asarray(level[row]) for level in oof]  # (K_k,) each
    annotated = {a.item for a in labels.annotations}
    trained = set(fit.task_ids)  # the final heads saw these: their opinion would not be out-of-sample
    others = [i for i, tid in enumerate(images.task_ids) if ok[i] and tid in annotated and tid not in trained]
    if others:
        heads = fit.result.heads.eval()
        with torch.inference_mode():
            logits = heads(torch.as_tensor(emb[others], dtype=torch.float32))  # L × (M, K_k)
        probs = [torch.softmax(z / float(fit.result.temperature), dim=1).numpy() for z in logits]
        for j, i in enumerate(others):
            level_probs[images.task_ids[i]] = [p[j] for p in probs]
    result = consensus(labels.annotations, source.config.taxonomy, labels.policy, level_probs=level_probs)
    disagreements.save_report(settings, pid, result, model_version=version, problems=labels.problems)
    if settings.post_flags_to_label_studio:
        summary = disagreements.post_flags(settings, source.client, pid, result)
        log.info("Project %s: %d flags; shown in Label Studio: %s", pid, len(result.flags), summary)
    return len(result.flags)
