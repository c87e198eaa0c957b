"""The training job's neighbour step: the project's kNN index, its task map and its duplicate groups.

One index per encoder version (``ProjectPaths.neighbor_index``), keyed by image content hash: a run with the
same encoder adds only images it has not indexed (and searches only those for new near-duplicate pairs); a
new encoder (pretraining) builds a new index from all embeddings. The task map (task id -> content hash and
image value) and the duplicate groups are rewritten by every run. Indexes of encoders no kept model version
uses are removed. The store loads the index of the live version's encoder beside the model
(``ml_backend.serving.similar``).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np

from ml_backend.paths import ProjectPaths
from ml_backend.settings import Settings
from ml_backend.training.images import ProjectImages
from ml_backend.training.pull import ProjectSource
from model.atomic import atomic_write_json
from model.bundle import MANIFEST, VERSIONS, list_versions
from model.crowd.types import ConsensusResult
from model.errors import DataError
from model.neighbors.duplicates import (
    DuplicateGroup,
    auto_threshold,
    conflicting_groups,
    duplicate_groups,
    near_pairs,
)
from model.neighbors.index import NeighborIndex, load_index

__all__ = ["IndexedTask", "duplicate_conflicts", "index_neighbors", "read_duplicates", "read_task_map",
           "update_neighbors"]

log = logging.getLogger(__name__)

RECALIBRATE_GROWTH = 0.2
"""The automatic near-duplicate threshold is calibrated again once the index has grown by this share..."""
RECALIBRATE_BELOW = 20_000
"""...while it was calibrated on fewer images than this. From there on it is kept for the encoder: its sample of
``AUTO_SAMPLE`` images is representative, and a new threshold costs a full pair search (the whole neighbour step of
a training: 5.3 s at 100k images in ``bench/results/scale.txt``, growing faster than linearly) instead of searching
only the new rows."""


@dataclass(frozen=True)
class IndexedTask:
    """A task whose image is in the index."""

    task_id: int
    key: str  # content hash of its image
    image: str  # the task's image value (as Label Studio holds it)


def index_neighbors(settings: Settings, paths: ProjectPaths, source: ProjectSource, images: ProjectImages,
                    encoder_version: str, emb: np.ndarray, ok: np.ndarray) -> dict[str, int]:
    """Update the encoder's kNN index with the embedded images, then the task map and the duplicate groups.

    Args:
        settings: ``near_duplicate_threshold`` (0: calibrated for the encoder, see :func:`_threshold`).
        paths: the project's files.
        source: the pulled project (its tasks' image values).
        images: the project's images (task ids and content hashes aligned with ``emb``).
        encoder_version: the encoder ``emb`` comes from.
        emb: ``(N, D)`` embeddings in ``images`` order.
        ok: ``(N,)`` which rows embedded.

    Returns:
        ``{"indexed", "added", "duplicate_groups", "near_pairs"}``.
    """
    rows = np.flatnonzero(ok)
    directory = paths.neighbor_index(encoder_version)
    try:
        index = load_index(directory)
        if index.dim != emb.shape[1] or index.encoder_version != encoder_version:
            raise DataError(f"{directory} holds another encoder's index")
    except DataError as exc:
        if directory.exists():
            log.warning("Project %s: rebuilding the neighbour index (%s).", paths.project_id, exc)
        index = NeighborIndex(emb.shape[1], encoder_version)
    before = len(index)
    added = index.add([images.hashes[i] for i in rows], emb[rows])
    if added or before == 0:
        index.save(directory)
    image_key = source.config.image_key
    values = {t.id: t.data.get(image_key) for t in source.tasks if isinstance(t.data, dict)}
    tasks = [IndexedTask(images.task_ids[i], images.hashes[i], str(values.get(images.task_ids[i], "")))
             for i in rows]
    atomic_write_json(paths.neighbor_tasks, {"encoder_version": encoder_version,
                                             "tasks": [[t.task_id, t.key, t.image] for t in tasks],
                                             "unusable": {str(t): why for t, why in images.failed.items()}})
    threshold, calibrated_on = _threshold(paths, index, encoder_version, settings.near_duplicate_threshold)
    pairs = _near_pairs(paths, index, encoder_version, before, threshold)
    groups = duplicate_groups([t.task_id for t in tasks], [t.key for t in tasks], pairs)
    atomic_write_json(paths.duplicates, {"encoder_version": encoder_version, "indexed": len(index),
                                         "threshold": threshold,
                                         "threshold_rule": "setting" if settings.near_duplicate_threshold else "auto",
                                         "threshold_calibrated_on": calibrated_on,
                                         "near_pairs": [[a, b, round(s, 5)] for a, b, s in pairs],
                                         "groups": [g.to_dict() for g in groups]})
    _prune_indexes(paths, keep=encoder_version)
    log.info("Project %s: %d images indexed (%d new), %d duplicate groups.", paths.project_id, len(index), added,
             len(groups))
    return {"indexed": len(index), "added": added, "duplicate_groups": len(groups), "near_pairs": len(pairs)}


def update_neighbors(settings: Settings, paths: ProjectPaths, source: ProjectSource, images: ProjectImages,
                     encoder_version: str, emb: np.ndarray, ok: np.ndarray) -> dict[str, int]:
    """:func:`index_neighbors` as a step that never fails the training: a failure is logged and counted
    (``indexed = -1``); similarity search then serves the previous index until the next run."""
    try:
        return index_neighbors(settings, paths, source, images, encoder_version, emb, ok)
    except Exception as exc:  # end of an optional step: the model is worth publishing without it
        log.error("Project %s: the neighbour index was not updated: %s", paths.project_id, exc,
                  exc_info=not isinstance(exc, DataError))
        return {"indexed": -1}


def _threshold(paths: ProjectPaths, index: NeighborIndex, encoder_version: str, setting: float
               ) -> tuple[float, int]:
    """The near-duplicate threshold and how many indexed images it was calibrated on (0: the setting's value).

    ``NEAR_DUPLICATE_THRESHOLD`` = 0: :func:`~model.neighbors.duplicates.auto_threshold` for this encoder, kept while
    the index has grown by less than :data:`RECALIBRATE_GROWTH` since, and for good once it was calibrated on
    :data:`RECALIBRATE_BELOW` images (a kept threshold keeps the saved pairs valid, so a run searches only the new
    rows)."""
    if setting > 0:
        return setting, 0
    try:
        saved = json.loads(paths.duplicates.read_text(encoding="utf-8"))
        rows = int(saved.get("threshold_calibrated_on", 0))
        if saved.get("encoder_version") == encoder_version and saved.get("threshold_rule") == "auto" and \
                0 < rows and (rows >= RECALIBRATE_BELOW or len(index) <= rows * (1 + RECALIBRATE_GROWTH)):
            return float(saved["threshold"]), rows
    except (FileNotFoundError, ValueError, TypeError, KeyError):
        pass
    return auto_threshold(index).value, len(index)


def _near_pairs(paths: ProjectPaths, index: NeighborIndex, encoder_version: str, before: int, threshold: float
                ) -> list[tuple[str, str, float]]:
    """The index's near-duplicate pairs: the saved ones plus those of the rows added since (same encoder and
    threshold), else a full pass."""
    try:
        saved = json.loads(paths.duplicates.read_text(encoding="utf-8"))
        start = int(saved.get("indexed", 0))
        reuse = saved.get("encoder_version") == encoder_version and saved.get("threshold") == threshold and \
            0 < start <= before
        old = [(str(a), str(b), float(s)) for a, b, s in saved.get("near_pairs", [])] if reuse else None
    except (FileNotFoundError, ValueError, TypeError):
        old = None
    if old is None:
        return near_pairs(index, threshold)
    return old + near_pairs(index, threshold, start=start)


def _prune_indexes(paths: ProjectPaths, keep: str) -> None:
    """Remove the indexes of encoders that no model version on disk uses (``keep`` stays)."""
    used = {keep}
    for version in list_versions(paths.models):
        try:
            manifest = json.loads((paths.models / VERSIONS / version / MANIFEST).read_text(encoding="utf-8"))
            used.add(str(manifest["encoder_version"]))
        except (OSError, ValueError, KeyError):
            continue
    for directory in paths.neighbors.iterdir():
        if directory.is_dir() and directory.name not in used:
            shutil.rmtree(directory, ignore_errors=True)


def read_task_map(paths: ProjectPaths) -> tuple[dict[int, IndexedTask], dict[int, str]]:
    """The task map of the last training: task id -> :class:`IndexedTask`, and task id -> why the task has no
    usable image. Both empty before the first training.

    Raises:
        DataError: the file is damaged.
    """
    try:
        data = json.loads(paths.neighbor_tasks.read_text(encoding="utf-8"))
        tasks = {int(t): IndexedTask(int(t), str(k), str(v)) for t, k, v in data.get("tasks", [])}
        unusable = {int(t): str(why) for t, why in dict(data.get("unusable", {})).items()}
    except FileNotFoundError:
        return {}, {}
    except (ValueError, TypeError) as exc:
        raise DataError(f"{paths.neighbor_tasks} is damaged ({exc}); the next training rewrites it.") from None
    return tasks, unusable


def read_duplicates(paths: ProjectPaths) -> dict[str, Any]:
    """The duplicate groups of the last training (``{"encoder_version", "threshold", "threshold_rule",
    "threshold_calibrated_on", "groups"}``).

    Raises:
        DataError: none yet (no training has finished since similarity search exists), naming the remedy.
    """
    try:
        data = json.loads(paths.duplicates.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"No duplicate groups for project {paths.project_id} yet: they are computed by each "
                        "training. Train the project (Train button in Label Studio, or POST /train).") from None
    except ValueError as exc:
        raise DataError(f"{paths.duplicates} is damaged ({exc}); the next training rewrites it.") from None
    data.pop("near_pairs", None)
    return dict(data)


def duplicate_conflicts(paths: ProjectPaths, result: ConsensusResult) -> dict[str, Any] | None:
    """The duplicate groups of the last neighbour step whose tasks carry different labels (consensus paths).

    Returns:
        ``{"groups": n, "threshold", "conflicting": [group dict + "labels": {task: "A / B"}]}``, or None when
        there are no duplicate groups yet.
    """
    try:
        saved = read_duplicates(paths)
    except DataError:
        return None
    groups = [DuplicateGroup.from_dict(g) for g in saved.get("groups", [])]
    # model.crowd.types annotates taxonomy paths as pathlib.Path; they are tuples of names
    labels: dict[int, tuple[str, ...]] = {item: tuple(c.path) for item, c in result.items.items()
                                          if c.path is not None}
    conflicting = []
    for group in conflicting_groups(groups, labels):
        entry = group.to_dict()
        entry["labels"] = {str(i): " / ".join(labels[i]) for i in group.items if i in labels}
        conflicting.append(entry)
    return {"groups": len(groups), "threshold": saved.get("threshold"), "conflicting": conflicting,
            "tasks_in_groups": sorted({i for g in groups for i in g.items})}
