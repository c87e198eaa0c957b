"""The training job's publish step: a new model version written whole, then made live; old versions pruned."""

from __future__ import annotations

import logging
from typing import Any

from ml_backend.paths import ProjectPaths
from ml_backend.settings import Settings
from ml_backend.training.calibration import ReuseDecision
from ml_backend.training.encoder import Encoder
from ml_backend.training.fit import Fit
from ml_backend.training.images import ProjectImages
from ml_backend.training.labels import Labels
from ml_backend.training.policy import PretrainDecision
from ml_backend.training.pull import ProjectSource
from model.bundle import data_fingerprint, prune, publish

__all__ = ["publish_version"]

log = logging.getLogger(__name__)


def publish_version(settings: Settings, paths: ProjectPaths, source: ProjectSource, labels: Labels, images: ProjectImages,
                    encoder: Encoder, fit: Fit, decision: PretrainDecision, counts: dict[str, int],
                    reuse: ReuseDecision | None = None, pretrain_run: dict[str, Any] | None = None) -> str:
    """Publish the new model version atomically, prune old ones; returns the version."""
    pid = paths.project_id
    root = paths.models
    extra = {"consensus": labels.result.policy_record(), "excluded": len(labels.result.excluded),
             "pretrained": decision.pretrain, "pretrain_decision": decision.to_dict(),
             "pretrain_run": pretrain_run, "counts": dict(counts),
             "project_id": pid, "label_config_from_name": source.config.from_name,
             "calibration": reuse.to_dict() if reuse is not None else None}
    manifest = publish(root, source.config.taxonomy, encoder.cfg, encoder.state, fit.result.heads,
                       fit.result.temperature, fit.result.metrics, data_fingerprint(fit.pairs), extra,
                       counts=dict(counts))
    prune(root, keep=settings.keep_versions)
    log.info("Project %s: published model version %s.", pid, manifest.version)
    return str(manifest.version)
