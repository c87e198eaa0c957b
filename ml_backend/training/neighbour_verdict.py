"""The neighbours' verdict on the trained labels, for the label-error flags (``model.crowd.neighbours``).

After a version is published, the consensus labels it was trained on are spread over the kNN graph of the published
encoder's embeddings (the index ``ml_backend.training.neighbors`` keeps, its graph kept by
``ml_backend.training.propagation``), fold by fold on the folds of the model choice (``model.propagation.held_out``):
each trained task gets the leaf distribution its neighbours' labels give it, its own label and its fold's (its
duplicates too) removed. An annotated task that was not trained on (excluded by the policy) gets the distribution
spread from every trained label. The cost is ``(folds + 1) x leaves`` conjugate-gradient solves over the graph.
"""

from __future__ import annotations

import logging

import numpy as np

from ml_backend.paths import ProjectPaths
from ml_backend.training.fit import Fit
from ml_backend.training.images import ProjectImages
from ml_backend.training.propagation import kept_knn_graph
from model.arrays import FloatArray
from model.errors import DataError
from model.neighbors.index import load_index
from model.propagation import PROPAGATION_NEIGHBOURS, held_out, leaf_probabilities, seed_matrix, spread
from model.taxonomy import Taxonomy

__all__ = ["neighbour_verdicts"]

log = logging.getLogger(__name__)


def neighbour_verdicts(paths: ProjectPaths, images: ProjectImages, fit: Fit, taxonomy: Taxonomy, encoder_version: str,
                       annotated: set[int]) -> dict[int, FloatArray]:
    """Task id -> ``(C,)`` held-out propagated leaf probabilities (``taxonomy.candidate_paths(True)`` order).

    Empty when the fit has no folds (a reused calibration before its cross-validation ran) or the index of
    ``encoder_version`` cannot be read (logged; the flags then go without the signal).
    """
    fold_of = np.asarray(fit.result.fold_of)
    if len(fold_of) == 0:
        return {}
    try:
        index = load_index(paths.neighbor_index(encoder_version))
    except DataError as exc:
        log.warning("Project %s: no neighbour index of %s (%s); label-error flags without the neighbours' verdict.",
                    paths.project_id, encoder_version, exc)
        return {}
    k = min(PROPAGATION_NEIGHBOURS, len(index) - 1)
    if k < 1:
        return {}
    graph = kept_knn_graph(paths, index, encoder_version, k)
    leaf_paths = taxonomy.candidate_paths(leafs_only=True)[0]
    seeds: dict[int, list[tuple[str, ...]]] = {}
    rows = np.full(len(index), -1, dtype=np.int64)  # fold of each graph row (-1: not trained on)
    trained: dict[int, int] = {}  # task id -> graph row
    for position, fold in zip(np.asarray(fit.result.labelled_index), fold_of):
        task, (digest, path) = fit.task_ids[int(position)], fit.pairs[int(position)]
        if digest not in index:
            continue
        row = index.row(digest)
        seeds.setdefault(row, []).append(tuple(path))
        rows[row] = int(fold)  # duplicates share a fold (the model choice's grouped folds)
        trained[task] = row
    if not seeds:
        return {}
    y = seed_matrix(len(index), seeds, leaf_paths)  # (N, C)
    probs, reached = held_out(graph.neighbors, graph.similarities, y, rows)
    out = {task: probs[row] for task, row in trained.items() if reached[row]}
    task_hash = dict(zip(images.task_ids, images.hashes))
    others = {t: index.row(task_hash[t]) for t in annotated - set(trained) if task_hash.get(t) in index}
    if others:
        every, every_reached = leaf_probabilities(spread(graph.neighbors, graph.similarities, y))
        out.update({t: every[row] for t, row in others.items() if every_reached[row] and rows[row] < 0})
    return out
