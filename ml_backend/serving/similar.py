"""Similar-image search of one project: the kNN index of the served model's encoder and the task map beside it.

:class:`ProjectNeighbors` is loaded by the model store together with the model version it belongs to (the index
of that version's encoder, written by the training job: ``ml_backend.training.neighbors``) and answers
"tasks whose images look like this task's" or "like this uploaded image's embedding". The index is keyed by image
content hash; the task map turns a hash into the tasks holding that image (byte-identical copies share a row).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ml_backend.paths import ProjectPaths
from ml_backend.training.neighbors import IndexedTask, read_task_map
from model.bundle import MANIFEST, VERSIONS, Manifest, live_version
from model.errors import DataError
from model.neighbors.index import NeighborIndex, load_index

__all__ = ["Neighbor", "ProjectNeighbors", "TaskNotIndexed", "load_project_neighbors", "similar_tasks"]

log = logging.getLogger(__name__)


class TaskNotIndexed(DataError):
    """A task the index cannot answer for; ``reason`` says whether it is unknown or has no usable image."""

    def __init__(self, message: str, unknown: bool) -> None:
        super().__init__(message)
        self.unknown = unknown


@dataclass(frozen=True)
class Neighbor:
    """A similar task."""

    task_id: int
    score: float  # cosine similarity of the embeddings (1.0 for a byte-identical image)
    image: str  # the task's image value

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task_id, "score": round(self.score, 4), "image": self.image}


@dataclass
class ProjectNeighbors:
    """The index of one model version's encoder and the project's task map.

    Args:
        project_id: the project.
        version: the model version this was loaded with.
        index: the kNN index (keys: image content hashes).
        tasks: task id -> :class:`IndexedTask` (tasks whose image is indexed).
        unusable: task id -> why its image could not be used.
    """

    project_id: int
    version: str
    index: NeighborIndex
    tasks: dict[int, IndexedTask]
    unusable: dict[int, str] = field(default_factory=dict)
    by_key: dict[str, list[int]] = field(init=False)

    def __post_init__(self) -> None:
        self.by_key = {}
        for t in sorted(self.tasks.values(), key=lambda t: t.task_id):
            if t.key in self.index:
                self.by_key.setdefault(t.key, []).append(t.task_id)

    @property
    def encoder_version(self) -> str:
        return self.index.encoder_version

    def similar_to_task(self, task_id: int, k: int) -> list[Neighbor]:
        """The ``k`` tasks most similar to ``task_id`` (itself left out; byte-identical copies first, score 1).

        Raises:
            TaskNotIndexed: the task is not in the project's last training, or its image could not be used.
        """
        task = self.tasks.get(int(task_id))
        if task is None or task.key not in self.index:
            why = self.unusable.get(int(task_id))
            if why is not None:
                raise TaskNotIndexed(f"task {task_id} has no usable image ({why}); fix the task's image in Label "
                                     "Studio and retrain.", unknown=False)
            raise TaskNotIndexed(
                f"task {task_id} is not in project {self.project_id}'s similarity index (model {self.version}): "
                "it belongs to another project, or was imported after the last training (retrain: Train button "
                "in Label Studio, or POST /train).", unknown=True)
        return self.similar_to_vector(self.index.vectors([task.key])[0], k, exclude=int(task_id))

    def similar_to_vector(self, vector: np.ndarray, k: int, exclude: int | None = None) -> list[Neighbor]:
        """The ``k`` tasks whose images' embeddings are most similar to ``vector`` ``(D,)``.

        Args:
            vector: an embedding of this index's encoder.
            k: tasks wanted.
            exclude: a task id to leave out (the query task).
        """
        if k < 1:
            raise DataError(f"k={k} must be at least 1.")
        if not len(self.index):
            return []
        want = min(len(self.index), k + 8)
        while True:
            sims, rows = self.index.search(vector[None, :], want)  # (1, want)
            out: list[Neighbor] = []
            for s, r in zip(sims[0], rows[0]):
                if r < 0:
                    continue
                for tid in self.by_key.get(self.index.key(int(r)), ()):  # an image no task holds now gives nothing
                    if tid != exclude:
                        out.append(Neighbor(tid, min(1.0, float(s)), self.tasks[tid].image))
            if len(out) >= k or want >= len(self.index):
                return out[:k]
            want = min(len(self.index), want * 4)


def load_project_neighbors(paths: ProjectPaths, version: str, encoder_version: str) -> ProjectNeighbors | None:
    """The index of ``encoder_version`` with the task map, or None when training has not built one yet.

    Raises:
        DataError: the index or the task map is damaged (the next training rebuilds them).
    """
    directory = paths.neighbor_index(encoder_version)
    if not directory.is_dir():
        return None
    index = load_index(directory)
    tasks, unusable = read_task_map(paths)
    return ProjectNeighbors(paths.project_id, version, index, tasks, unusable)


def similar_tasks(paths: ProjectPaths, task_id: int, k: int) -> dict[str, Any]:
    """``taxomoco similar --project ID --task TID``: the live version's index read from disk (no server needed).

    Raises:
        DataError: no trained model, no index for it, or a task the index cannot answer for (with the remedy).
    """
    version = live_version(paths.models)
    if version is None:
        raise DataError(f"Project {paths.project_id} has no trained model yet in {paths.models}: train it first "
                        "(Train button in Label Studio, or POST /train).")
    mpath = paths.models / VERSIONS / version / MANIFEST
    manifest = Manifest.from_json(mpath.read_text(encoding="utf-8"), str(mpath))
    neighbors = load_project_neighbors(paths, version, manifest.encoder_version)
    if neighbors is None:
        raise DataError(f"Project {paths.project_id}'s model {version} has no similarity index: it is built by "
                        "training; retrain the project.")
    found = neighbors.similar_to_task(task_id, k)
    return {"project": paths.project_id, "task": int(task_id), "model_version": version,
            "results": [n.to_dict() for n in found]}
