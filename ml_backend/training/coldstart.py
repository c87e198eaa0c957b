"""The labeling loop before the first model: what a training run does when the labels cannot train heads yet.

A project is connected (its first ``/setup``), or labelled, before ``MIN_LABELS_TO_TRAIN`` labels of two top-level
classes exist. The training job then records a *skip* (the reason says what is missing) but still prepares
everything the first model needs and gives the labelers something to work with:

1. every task's image, stored once by content hash (``training.images``);
2. the encoder a training would choose (``training.encoder.choose_encoder``: MoCo v2 pretraining on all images
   from ``PRETRAIN_MIN_IMAGES`` images on, else the initial encoder), kept as the project's start encoder so that
   later runs and the first training embed with the same weights; a pretraining is recorded like a published one
   (``jobs/pretrain.json``), so it is not repeated;
3. embeddings of every image through the embedding cache, and the kNN index (``training.neighbors``);
4. from the first label on, with ``PROPAGATION``: the labels spread over the kNN graph
   (``training.propagation``), a propagation version that ``/predict`` serves and the bulk writer writes into
   Label Studio after the job (``prelabel.schedule.after_publish``), with the labeling order and the "label next"
   tab ranked by its uncertainty;
5. otherwise (no label yet), with ``PRELABEL``: the labeling order (typical coverage of the embeddings,
   ``model.ranking``) in ``ProjectPaths.labeling_queue`` and the "label next" tab.

A second run with nothing new costs the pull, a look at the image index, cache reads, no pretraining, an index
that adds nothing, the same propagation version (not written again) and the order.
Once a model version is live this is not done: its predictions and order stay until the next training.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ml_backend.labelstudio.copies import read_remembered
from ml_backend.paths import ProjectPaths
from ml_backend.prelabel.live import TaskPredictions
from ml_backend.prelabel.order import update_label_next_tab, write_queue
from ml_backend.prelabel.writer import has_human_label
from ml_backend.settings import Settings
from ml_backend.training.encoder import choose_encoder, embed_all, pending_run, save_start_encoder
from ml_backend.training.images import ProjectImages, require_images, sync_images
from ml_backend.training.labels import Labels
from ml_backend.training.neighbors import update_neighbors
from ml_backend.training.policy import clear_pretrain_request, write_pretrain_record
from ml_backend.training.propagation import propagate_labels
from ml_backend.training.pull import ProjectSource
from ml_backend.training.records import timed_step
from model.bundle import live_version
from model.errors import TaxomocoError
from model.ranking import Reason

__all__ = ["cold_start"]

log = logging.getLogger(__name__)


def cold_start(settings: Settings, paths: ProjectPaths, source: ProjectSource, labels: Labels, force_pretrain: bool,
               counts: dict[str, int], durations: dict[str, float]) -> dict[str, Any]:
    """The cold-start work of a run whose labels cannot train heads (see the module).

    Args:
        settings: the job's settings.
        paths: the project's files.
        source: the pulled project.
        labels: its consensus labels (fewer than a training needs).
        force_pretrain: pretrain whatever the policy says (``POST /train`` with ``force_pretrain``).
        counts: the job's counts (images, unreadable images, embedded and the index's are added).
        durations: the job's step durations (images, pretrain or encoder, embed, neighbors, propagation, order).

    Returns:
        What was done: ``{"done", "encoder", "pretrain", "neighbors", "propagation", "order"}`` (``done`` False with a
        ``reason`` when there was nothing to do).

    Raises:
        DataError: the project has tasks but none of their images could be read (the message says what to check).
    """
    if live_version(paths.models) is not None:
        return {"done": False, "reason": "a model version is live: its predictions and labeling order stay until "
                                         "the next training"}
    if not source.tasks:
        return {"done": False, "reason": "the project has no tasks yet"}
    with timed_step(durations, "images"):
        images = sync_images(settings, paths, source)
    counts.update(images=len(images.paths), unreadable_images=len(images.failed))
    require_images(images, len(source.tasks))
    choice = choose_encoder(settings, paths, images, force_pretrain, durations)
    encoder = choice.encoder
    if choice.fresh:
        save_start_encoder(paths, encoder)
    if choice.decision.pretrain:  # the new encoder is the project's now: the policy will not pretrain it again
        write_pretrain_record(paths, len(images.paths), encoder.version)
        pending_run(paths, clear=True)
        clear_pretrain_request(paths)
    with timed_step(durations, "embed"):
        emb, ok = embed_all(settings, paths, encoder, images)  # (N, D), (N,)
    counts["embedded"] = int(ok.sum())
    with timed_step(durations, "neighbors"):
        neighbors = update_neighbors(settings, paths, source, images, encoder.version, emb, ok)
    counts.update(neighbors)
    propagation: dict[str, Any] | None = None
    if settings.propagation:
        with timed_step(durations, "propagation"):
            try:
                propagation = propagate_labels(settings, paths, source, labels, images, encoder.version)
            except Exception as exc:  # an optional step: the coverage order below still helps; the reason is shown
                log.error("Project %s: label propagation failed: %s", paths.project_id, exc,
                          exc_info=not isinstance(exc, TaxomocoError))
                propagation = {"version": None, "error": f"{type(exc).__name__}: {exc}"}
    order: dict[str, Any] | None = None
    if settings.prelabel and not (propagation or {}).get("version"):  # a propagation version's run ranks by it
        with timed_step(durations, "order"):
            order = write_coverage_order(settings, paths, source, images, emb, ok)
    return {"done": True, "encoder": encoder.version,
            "pretrain": {**choice.decision.to_dict(), "run": choice.pretrain_report}, "neighbors": neighbors,
            "propagation": propagation, "order": order}


def write_coverage_order(settings: Settings, paths: ProjectPaths, source: ProjectSource, images: ProjectImages,
                         emb: np.ndarray, ok: np.ndarray) -> dict[str, Any]:
    """The labeling order without any prediction (typical coverage of the embeddings first, then the rest) and the
    "label next" tab.

    Args:
        emb: ``(N, D)`` embeddings in ``images`` order; ``ok (N,)`` the rows that embedded.

    Returns:
        ``{"tasks": ranked tasks, "coverage": coverage picks, "tab": the tab's id or None}``.
    """
    tasks = sorted(source.tasks, key=lambda t: t.id)
    row_of = {t: i for i, t in enumerate(images.task_ids)}
    task_emb = np.full((len(tasks), emb.shape[1]), np.nan, dtype=np.float32)  # (T, D), NaN: no usable image
    for i, task in enumerate(tasks):
        row = row_of.get(task.id)
        if row is not None and ok[row]:
            task_emb[i] = emb[row]
    copies = set() if settings.train_on_prediction_copies else set(read_remembered(paths.prediction_copies))
    labelled = np.array([has_human_label(t, copies) for t in tasks], dtype=bool)
    queue = write_queue(paths, TaskPredictions([t.id for t in tasks], [], task_emb, None), labelled,
                        len(source.config.taxonomy.leaves()), settings.cold_start_per_class)
    tab = None
    if settings.label_next_tab_tasks > 0 and settings.post_flags_to_label_studio:
        tab = update_label_next_tab(source.client, paths.project_id, queue, settings.label_next_tab_tasks)
    coverage = sum(t["reason"] == Reason.COVERAGE.value for t in queue["tasks"])
    log.info("Project %s: labeling order of %d tasks (%d coverage picks) written before the first label's model.",
             paths.project_id, len(queue["tasks"]), coverage)
    return {"tasks": len(queue["tasks"]), "coverage": coverage, "tab": tab}
