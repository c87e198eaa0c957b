"""The training job's propagation choice: label propagation, or its blend with the heads, as the served model.

After the heads' model choice (``ml_backend.training.fit``) and the neighbour step (the published encoder's index and
its kept kNN graph), :func:`choose_propagation` scores ``propagation`` and ``heads+propagation`` on the chosen heads'
own cross-validation folds, the held-out fold's labels removed from the seeds (``model.propagation_choice``), and
decides by ``PROPAGATION_CHOICE``. When one of them wins, the labels are spread once more from every trained label and
the table of every indexed image's propagated leaf probabilities is published with the version
(``model.bundle.PROPAGATED``): ``/predict`` and bulk pre-annotation serve it for those images
(``model.predictor.Predictor.decode_rows``), the heads for images added later. The decision goes into the model
choice (``model_choice["propagation"]``) and the manifest (``extra["served_model"]``).

The decision is made when the candidates are compared (``ml_backend.training.fit``); a retrain that keeps the last
model choice (a reused calibration, or a recalibration of the kept candidate) keeps the last decision too, and
spreads the current labels for the table.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ml_backend.paths import ProjectPaths
from ml_backend.settings import Settings
from ml_backend.training.fit import Fit
from ml_backend.training.propagation import kept_knn_graph
from model.errors import DataError
from model.heads.training import CrossValidation
from model.neighbors.index import load_index
from model.propagation import PROPAGATION_NEIGHBOURS
from model.propagation_choice import BLEND, PROPAGATION, ChoiceRule, PropagatedTable, decide, spread_table
from model.taxonomy import Taxonomy

__all__ = ["choose_propagation"]

log = logging.getLogger(__name__)


def choose_propagation(settings: Settings, paths: ProjectPaths, fit: Fit, taxonomy: Taxonomy, encoder_version: str
                       ) -> PropagatedTable | None:
    """Decide whether the version serves propagation (see the module); records the decision in ``fit.choice``.

    Returns:
        The table to publish, or None: the heads serve.
    """
    rule = ChoiceRule(settings.propagation_choice)
    if rule is ChoiceRule.HEADS:
        return None
    try:
        index = load_index(paths.neighbor_index(encoder_version))
    except DataError as exc:
        log.warning("Project %s: no neighbour index of %s (%s); the heads serve.", paths.project_id, encoder_version, exc)
        return None
    k = min(PROPAGATION_NEIGHBOURS, len(index) - 1)
    positions = np.asarray(fit.result.labelled_index)
    digests = [fit.pairs[int(p)][0] for p in positions]
    if k < 1 or not all(d in index for d in digests):
        return None
    graph = kept_knn_graph(paths, index, encoder_version, k)
    rows = np.array([index.row(d) for d in digests], dtype=np.int64)
    decision: dict[str, Any]
    if "propagation" not in fit.choice and len(fit.result.fold_of):  # the candidates compared: score on their folds
        r = fit.result
        cv = CrossValidation(r.temperature, r.oof_level_probs, r.oof_level_logits, r.oof_predictions, r.metrics,
                             r.labelled_index, r.targets, r.fold_of)
        decision = decide(fit.candidate.name, cv, (graph.neighbors, graph.similarities), rows, taxonomy,
                          rule).to_dict()
        log.info("Project %s: served model %s (%s).", paths.project_id, decision["chosen"], decision["reason"])
    else:  # the last model choice stands (kept or reused calibration): so does its propagation decision
        decision = dict(fit.choice.get("propagation") or {"chosen": "heads", "rule": rule.value,
                                                          "reason": "no cross-validation in this run"})
    fit.choice["propagation"] = decision
    if isinstance(fit.result.metrics.get("model_choice"), dict):
        fit.result.metrics["model_choice"]["propagation"] = decision
    if decision["chosen"] not in (PROPAGATION, BLEND):
        return None
    seeds: dict[int, list[tuple[str, ...]]] = {}
    for row, p in zip(rows, positions):
        seeds.setdefault(int(row), []).append(tuple(fit.pairs[int(p)][1]))
    return spread_table(str(decision["chosen"]), (graph.neighbors, graph.similarities), seeds, index.key, taxonomy)
