"""The training job's disagreement step, and the saved disagreement report.

After a version is published, the job computes the consensus again with the model's out-of-sample opinion
(:func:`analyse_disagreements`), adds the duplicate groups whose labels disagree, saves the report
(``ProjectPaths.disagreement_report``, served by ``GET /disagreements``) with the model's probabilities beside it
(so ``taxomoco disagreements`` can recompute later), and shows the flags and the duplicate tabs in Label Studio
(``ml_backend.labelstudio.flags``, ``ml_backend.labelstudio.duplicate_tabs``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ml_backend.labelstudio.duplicate_tabs import post_duplicate_tabs
from ml_backend.labelstudio.flags import post_flags
from ml_backend.paths import ProjectPaths
from ml_backend.settings import Settings
from ml_backend.training.fit import Fit
from ml_backend.training.images import ProjectImages
from ml_backend.training.labels import Labels
from ml_backend.training.neighbors import duplicate_conflicts
from ml_backend.training.neighbour_verdict import neighbour_verdicts
from ml_backend.training.pull import ProjectSource
from model.atomic import atomic_write, atomic_write_json
from model.crowd.consensus import consensus
from model.crowd.report import result_to_json
from model.crowd.types import ConsensusResult
from model.errors import DataError

__all__ = ["analyse_disagreements", "build_report", "load_model_probs", "load_report", "save_report"]

log = logging.getLogger(__name__)


def build_report(
    result: ConsensusResult, project_id: int, model_version: str | None = None, problems: Sequence[str] = (),
    duplicates: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The report dict: the consensus result's JSON plus project, model version, input problems and the
    duplicate groups whose labels disagree (``ml_backend.training.neighbors.duplicate_conflicts``)."""
    data = result_to_json(result)
    data["project"] = int(project_id)
    data["model_version"] = model_version
    data["problems"] = list(problems) + data.get("problems", [])
    if duplicates is not None:
        data["duplicates"] = {k: v for k, v in duplicates.items() if k != "tasks_in_groups"}
        data["summary"]["conflicting_duplicate_groups"] = len(duplicates.get("conflicting", []))
    return data


def save_report(paths: ProjectPaths, result: ConsensusResult, model_version: str | None = None,
                problems: Sequence[str] = (), duplicates: Mapping[str, Any] | None = None) -> None:
    """Save the report where :func:`load_report` finds it, with the model's probabilities beside it."""
    if result.level_probs:
        save_model_probs(paths, result.level_probs)
    atomic_write_json(paths.disagreement_report,
                      build_report(result, paths.project_id, model_version, problems, duplicates), indent=1)


def load_report(paths: ProjectPaths) -> dict[str, Any]:
    """The last saved report of a project (``GET /disagreements?project=ID``).

    Raises:
        DataError: no report yet (no training has finished), naming how to make one.
    """
    path = paths.disagreement_report
    if not path.is_file():
        raise DataError(
            f"No disagreement report for project {paths.project_id} yet: it is written after each training. Train "
            f"the project (Train button in Label Studio) or run `taxomoco disagreements --project {paths.project_id}`."
        )
    return dict(json.loads(path.read_text(encoding="utf-8")))


def save_model_probs(paths: ProjectPaths, level_probs: Mapping[int, Sequence[Any]]) -> None:
    """Store item -> per-level probability vectors as ``items`` ``(N,)`` and ``level_<k>`` ``(N, K_k)``."""
    items = sorted(int(i) for i in level_probs)
    if not items:
        return
    depth = len(level_probs[items[0]])
    arrays = {"items": np.asarray(items, dtype=np.int64)}
    for k in range(depth):
        arrays[f"level_{k}"] = np.stack([np.asarray(level_probs[i][k], dtype=np.float32) for i in items])
    atomic_write(paths.model_probs, lambda out: np.savez_compressed(out, allow_pickle=False, **arrays))


def load_model_probs(paths: ProjectPaths) -> dict[int, list[np.ndarray]] | None:
    """What :func:`save_model_probs` stored, or None when there is no file."""
    if not paths.model_probs.is_file():
        return None
    with np.load(paths.model_probs) as data:
        items = data["items"].tolist()
        levels = [data[f"level_{k}"] for k in range(len([n for n in data.files if n.startswith("level_")]))]
    return {int(item): [level[row] for level in levels] for row, item in enumerate(items)}


def analyse_disagreements(settings: Settings, paths: ProjectPaths, source: ProjectSource, labels: Labels,
                          images: ProjectImages, emb: np.ndarray, ok: np.ndarray, fit: Fit, version: str,
                          encoder_version: str | None = None) -> int:
    """Consensus again with the model's out-of-sample opinion → report saved, flags posted; returns #flags.

    The model's opinion is out-of-sample for every task: out-of-fold probabilities for the tasks trained
    on, the final heads' probabilities for tasks that were not trained on (excluded or unlabelled). With
    ``LABEL_ERROR_NEIGHBOURS`` and the published encoder's version, the neighbours' held-out verdict on each label
    joins the label-error flags (``ml_backend.training.neighbour_verdict``).
    """
    level_probs: dict[int, list[np.ndarray]] = {}
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
    verdicts = (neighbour_verdicts(paths, images, fit, source.config.taxonomy, encoder_version, annotated)
                if settings.label_error_neighbours and encoder_version else {})
    result = consensus(labels.annotations, source.config.taxonomy, labels.policy, level_probs=level_probs,
                       neighbour_probs=verdicts or None)
    duplicates = duplicate_conflicts(paths, result)
    save_report(paths, result, model_version=version, problems=labels.problems, duplicates=duplicates)
    if settings.post_flags_to_label_studio:
        summary = post_flags(paths, source.client, result)
        if duplicates is not None:
            summary["tabs"].update(post_duplicate_tabs(source.client, paths.project_id, duplicates))
        log.info("Project %s: %d flags; shown in Label Studio: %s", paths.project_id, len(result.flags), summary)
    return len(result.flags)
