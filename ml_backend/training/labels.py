"""The training job's label step: consensus paths of the annotated tasks, and whether there are enough.

Every annotator's paths go through ``model.crowd.consensus`` (per-level Dawid-Skene with a taxonomy-decoded
path); the training policy (``CONSENSUS_MIN_ANNOTATORS`` / ``CONSENSUS_MIN_AGREEMENT``) decides which tasks train.
Annotations that merely copy a prediction (``ml_backend.labelstudio.copies``) are left out first, unless
``TRAIN_ON_PREDICTION_COPIES`` is set; either way they are counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ml_backend.labelstudio.annotations import annotations_from_tasks
from ml_backend.labelstudio.copies import PredictionCopies, find_copies, read_remembered, without_copies, write_remembered
from ml_backend.paths import ProjectPaths
from ml_backend.settings import Settings
from ml_backend.training.pull import ProjectSource
from model.crowd.consensus import consensus
from model.crowd.types import Annotation, ConsensusPolicy, ConsensusResult

__all__ = ["Labels", "consensus_labels", "labels_shortfall"]

log = logging.getLogger(__name__)


def labels_shortfall(labels: dict[int, tuple[str, ...]], min_labels: int) -> str | None:
    """Why a project cannot be trained yet (a *skip* reason), or None when it can.

    Args:
        labels: consensus label path per task id.
        min_labels: ``settings.min_labels_to_train``.
    """
    missing = min_labels - len(labels)
    if missing > 0:
        return f"need {missing} more labels (have {len(labels)} labelled tasks, training starts at {min_labels})"
    top = sorted({path[0] for path in labels.values() if path})
    if len(top) < 2:
        return (f"need labels of at least 2 top-level classes (all {len(labels)} labelled tasks are "
                f"{top[0] if top else 'empty'!r}); label a task of another class")
    return None


@dataclass
class Labels:
    """Consensus labels of a project and the annotations they came from."""

    annotations: list[Annotation]
    problems: list[str]
    policy: ConsensusPolicy
    result: ConsensusResult  # labels: task id -> path
    copies: PredictionCopies  # annotations that copy a prediction (left out unless TRAIN_ON_PREDICTION_COPIES)

    def copy_counts(self, trained_on: bool) -> dict[str, int]:
        """``{"prediction_copies": n, "prediction_copies_excluded": n or 0, "<kind>": n ...}`` for the job's counts."""
        total = len(self.copies.kinds)
        kinds = {f"prediction_copies_{k}": n for k, n in self.copies.counts().items() if n}
        return {"prediction_copies": total, "prediction_copies_excluded": 0 if trained_on else total, **kinds}


def consensus_labels(settings: Settings, source: ProjectSource, paths: ProjectPaths) -> Labels:
    """Consensus paths to train on, under the policy the settings give, copies of predictions left out (unless
    ``settings.train_on_prediction_copies``); the copies seen are remembered in ``paths.prediction_copies``."""
    copies = find_copies(source.tasks, source.config, read_remembered(paths.prediction_copies))
    write_remembered(paths.prediction_copies, copies)
    tasks = source.tasks if settings.train_on_prediction_copies else without_copies(source.tasks, copies)
    if copies.kinds:
        log.info("Project %s: %d annotations copy a prediction (%s); %s.", paths.project_id, len(copies.kinds),
                 copies.counts(), "trained on (TRAIN_ON_PREDICTION_COPIES)" if settings.train_on_prediction_copies
                 else "left out of training")
    annotations, problems = annotations_from_tasks(tasks, source.config)
    policy = ConsensusPolicy(min_annotators=settings.min_annotators, min_agreement=settings.min_agreement)
    policy.validate()
    result = consensus(annotations, source.config.taxonomy, policy)
    for problem in problems[:20]:
        log.warning("annotation problem: %s", problem)
    return Labels(annotations, problems, policy, result, copies)
