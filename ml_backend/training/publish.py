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
from model.features.extractor import ENCODER_FEATURES, pixel_features_spec
from model.heads.candidates import FeatureSource
from model.propagation_choice import PropagatedTable

__all__ = ["published_encoder", "publish_version"]

log = logging.getLogger(__name__)


def published_encoder(fit: Fit, encoder: Encoder, previous: Encoder | None) -> Encoder:
    """The encoder a version is published with: the previous one when its candidate won, else the current one
    (also under a pixel-feature model, so that later trainings continue from the project's encoder)."""
    if fit.candidate.features is FeatureSource.PREVIOUS:
        assert previous is not None
        return previous
    return encoder


def publish_version(settings: Settings, paths: ProjectPaths, source: ProjectSource, labels: Labels, images: ProjectImages,
                    encoder: Encoder, fit: Fit, decision: PretrainDecision, counts: dict[str, int],
                    reuse: ReuseDecision | None = None, pretrain_run: dict[str, Any] | None = None,
                    propagated: PropagatedTable | None = None) -> str:
    """Publish the chosen model as a new version atomically, prune old ones; returns the version.

    Args:
        encoder: the encoder to publish with (:func:`published_encoder`).
        pretrain_run: the pretraining report of this training (plan, quality), None when it did not pretrain.
        propagated: the propagated table when label propagation or its blend won
            (``ml_backend.training.propagation_model``); ``extra["served_model"]`` names what the version serves.
    """
    pid = paths.project_id
    root = paths.models
    features = pixel_features_spec() if fit.candidate.features is FeatureSource.PIXELS else ENCODER_FEATURES
    extra = {"consensus": labels.result.policy_record(), "excluded": len(labels.result.excluded),
             "pretrained": decision.pretrain, "pretrain_decision": decision.to_dict(),
             "pretrain_run": pretrain_run, "counts": dict(counts),
             "project_id": pid, "label_config_from_name": source.config.from_name,
             "calibration": reuse.to_dict() if reuse is not None else None,
             "model": fit.candidate.recipe, "model_choice": fit.choice, "pull": dict(source.pull),
             "served_model": fit.candidate.recipe if propagated is None else f"{fit.candidate.recipe} {propagated.kind}",
             "propagated_images": 0 if propagated is None else len(propagated.hashes)}
    manifest = publish(root, source.config.taxonomy, encoder.cfg, encoder.state, fit.result.heads,
                       fit.result.temperature, fit.result.metrics, data_fingerprint(fit.pairs), extra,
                       counts=dict(counts), features=features, propagated=propagated)
    prune(root, keep=settings.keep_versions)
    log.info("Project %s: published model version %s.", pid, manifest.version)
    return str(manifest.version)
