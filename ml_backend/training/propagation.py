"""Label propagation before the heads can train: the project's labels spread over its kNN graph, stored per version.

From the first consensus label until a training publishes heads (``MIN_LABELS_TO_TRAIN`` labels of two top-level
classes), each training run of the project (``ml_backend.training.coldstart``) spreads the labels over the kNN
graph of the encoder's embeddings (``model.propagation`` on the index that ``ml_backend.training.neighbors``
keeps) and gives every indexed task a consistent taxonomy path with its propagated probability. The result is a
*propagation version*, named ``propagation-<labels>-<UTC stamp>-<6 hex>``: the number of labels spread, when it
was made (versions sort by it), and a digest of what it was computed from (encoder, labels, task images, config),
so a run with nothing new finds the same digest and keeps the same version (nothing is written again).

Files (``ProjectPaths.propagation``): ``<version>.json`` — ``{"version", "created", "labels", "encoder_version",
"digest", "leafs_only", "paths": [path, ...], "tasks": [[task id, path index, score, top leaf probability], ...]}``,
tasks no label reached are left out — and ``LIVE``, the version served, replaced atomically after its file is
complete. ``/predict`` and ``/setup`` serve the live one while the project has no heads model
(``ml_backend.serving.propagated``); the bulk writer writes it into Label Studio (``ml_backend.prelabel``).
``knn-<encoder version>.npz`` keeps the index's kNN graph (rows, a digest of their keys, neighbours and
similarities): the index only grows, so the next run searches only the images added since
(:meth:`model.neighbors.index.NeighborIndex.knn` with ``previous``) instead of all ``N × N`` pairs again.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np

from ml_backend.paths import ProjectPaths
from ml_backend.settings import Settings
from ml_backend.training.images import ProjectImages
from ml_backend.training.labels import Labels
from ml_backend.training.pull import ProjectSource
from model.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from model.errors import DataError
from model.neighbors.index import KnnGraph, NeighborIndex, load_index
from model.propagation import PROPAGATION_NEIGHBOURS, leaf_probabilities, path_predictions, seed_matrix, spread

__all__ = ["PROPAGATION_VERSION", "Propagated", "clear_propagation", "is_propagation_version", "kept_knn_graph",
           "live_propagation", "propagate_labels", "read_propagated", "save_propagated", "version_stamp"]

log = logging.getLogger(__name__)

PROPAGATION_VERSION = re.compile(r"^propagation-(?P<labels>\d+)-(?P<stamp>\d{8}T\d{6})-(?P<digest>[0-9a-f]{6})$")
"""Names of propagation versions (see the module)."""
LIVE = "LIVE"
_STAMP = "%Y%m%dT%H%M%S"
KEEP_FILES = 3
"""Propagation version files kept on disk (the live one and the ones before it, for readers that opened them)."""


def is_propagation_version(version: str) -> bool:
    """Whether ``version`` names a propagation version."""
    return PROPAGATION_VERSION.match(version) is not None


def version_stamp(version: str) -> str | None:
    """The UTC stamp of a propagation version (what orders them), or None for another name."""
    match = PROPAGATION_VERSION.match(version)
    return match["stamp"] if match else None


@dataclass
class Propagated:
    """One propagation version: every reached task's path.

    Attributes:
        version: its name.
        labels: labels spread (labelled tasks whose image is in the graph).
        encoder_version: the encoder whose kNN graph the labels spread over.
        digest: what it was computed from (see the module).
        leafs_only: the label config's ``leafsOnly`` it was decoded for.
        created: UTC ISO-8601.
        paths: the distinct predicted paths.
        tasks: task id -> ``(path index, score, top leaf probability)``.
    """

    version: str
    labels: int
    encoder_version: str
    digest: str
    leafs_only: bool
    created: str
    paths: list[tuple[str, ...]] = field(default_factory=list)
    tasks: dict[int, tuple[int, float, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "created": self.created, "labels": self.labels,
                "encoder_version": self.encoder_version, "digest": self.digest, "leafs_only": self.leafs_only,
                "paths": [list(p) for p in self.paths],
                "tasks": [[t, p, round(s, 6), round(top, 6)] for t, (p, s, top) in sorted(self.tasks.items())]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Propagated:
        return cls(str(data["version"]), int(data["labels"]), str(data["encoder_version"]), str(data["digest"]),
                   bool(data["leafs_only"]), str(data["created"]), [tuple(p) for p in data["paths"]],
                   {int(t): (int(p), float(s), float(top)) for t, p, s, top in data["tasks"]})


def live_propagation(paths: ProjectPaths) -> str | None:
    """The propagation version served now (reads the pointer only), or None."""
    try:
        text = (paths.propagation / LIVE).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return text or None


def read_propagated(paths: ProjectPaths, version: str | None = None) -> Propagated | None:
    """A propagation version (default the live one), or None when there is none.

    Raises:
        DataError: its file is damaged (the next training run writes a new one).
    """
    version = version or live_propagation(paths)
    if version is None or not is_propagation_version(version):
        return None
    path = paths.propagation / f"{version}.json"
    try:
        return Propagated.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path} is damaged ({exc}); the next training run writes it again (POST /train).") from None


def clear_propagation(paths: ProjectPaths) -> None:
    """Serve no propagation version any more (no label left to spread); the files stay."""
    (paths.propagation / LIVE).unlink(missing_ok=True)


def _digest(encoder_version: str, labels: dict[int, tuple[str, ...]], task_hash: dict[int, str], leafs_only: bool,
            prefix_threshold: float) -> str:
    payload = json.dumps([encoder_version, sorted((t, list(p)) for t, p in labels.items()), sorted(task_hash.items()),
                          leafs_only, prefix_threshold, PROPAGATION_NEIGHBOURS])
    return hashlib.sha256(payload.encode()).hexdigest()


def _new_name(paths: ProjectPaths, n_labels: int, digest: str) -> tuple[str, str]:
    """A version name later than the live one (a second later when the clock has not moved on) and its time."""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    last = version_stamp(live_propagation(paths) or "")
    if last is not None:
        now = max(now, datetime.strptime(last, _STAMP).replace(tzinfo=timezone.utc) + timedelta(seconds=1))
    return f"propagation-{int(n_labels)}-{now.strftime(_STAMP)}-{digest[:6]}", now.isoformat()


def save_propagated(paths: ProjectPaths, propagated: Propagated) -> None:
    """Write the version's file, then point ``LIVE`` at it; older files beyond :data:`KEEP_FILES` are removed."""
    root = paths.propagation
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / f"{propagated.version}.json", propagated.to_dict())
    atomic_write_text(root / LIVE, propagated.version + "\n")
    files = sorted((p for p in root.glob("propagation-*.json") if is_propagation_version(p.stem)),
                   key=lambda p: version_stamp(p.stem) or "")
    for old in files[:-KEEP_FILES]:
        old.unlink(missing_ok=True)


def _keys_digest(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def kept_knn_graph(paths: ProjectPaths, index: NeighborIndex, encoder_version: str, k: int) -> KnnGraph:
    """The index's kNN graph, extended from the one kept by the last run (see the module) and kept again."""
    path = paths.propagation / f"knn-{encoder_version}.npz"
    previous = None
    try:
        with np.load(path) as data:
            rows = int(data["rows"])
            kept = index.keys[:rows]
            if rows <= len(index) and int(data["k"]) == k and str(data["keys_digest"]) == _keys_digest(kept):
                previous = KnnGraph(kept, data["neighbors"], data["similarities"])
    except (OSError, ValueError, KeyError) as exc:  # none yet (FileNotFoundError), or damaged: a full pass
        if not isinstance(exc, FileNotFoundError):
            log.warning("Project %s: kept kNN graph %s unreadable (%s); computed again.", paths.project_id, path, exc)
    graph = index.knn(k, previous=previous)
    if previous is None or len(previous.keys) != len(index):
        buffer = io.BytesIO()
        np.savez(buffer, rows=len(index), k=k, keys_digest=_keys_digest(graph.keys), neighbors=graph.neighbors,
                 similarities=graph.similarities)
        paths.propagation.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buffer.getvalue())
        for old in paths.propagation.glob("knn-*.npz"):  # graphs of encoders no longer used
            if old != path:
                old.unlink(missing_ok=True)
    return graph


def propagate_labels(settings: Settings, paths: ProjectPaths, source: ProjectSource, labels: Labels,
                     images: ProjectImages, encoder_version: str) -> dict[str, Any]:
    """Spread the consensus labels over the kNN graph of ``encoder_version``'s index and serve the result.

    Args:
        settings: ``prefix_threshold``.
        paths: the project's files.
        source: the pulled project (its label config decides the taxonomy and ``leafsOnly``).
        labels: the consensus labels (``labels.result.labels``: task id -> path).
        images: the project's images (task id -> content hash, the index's keys).
        encoder_version: the encoder whose index was just updated (``training.neighbors``).

    Returns:
        ``{"version", "new", "labels", "tasks", "unreached", "neighbours", "seconds"}``; ``version`` None (and
        nothing served any more) when no label's image is in the graph.

    Raises:
        DataError: the index cannot be read.
    """
    start = time.monotonic()
    index = load_index(paths.neighbor_index(encoder_version))
    task_hash = {t: h for t, h in zip(images.task_ids, images.hashes) if h in index}
    given = {t: tuple(p) for t, p in labels.result.labels.items() if t in task_hash and p}
    k = min(PROPAGATION_NEIGHBOURS, len(index) - 1)
    if not given or k < 1:
        clear_propagation(paths)
        return {"version": None, "new": False, "labels": len(given), "tasks": 0, "unreached": 0, "neighbours": k,
                "seconds": round(time.monotonic() - start, 3),
                "reason": "no labelled task's image is in the kNN graph yet" if not given else "fewer than 2 images"}
    config = source.config
    digest = _digest(encoder_version, given, task_hash, config.leafs_only, settings.prefix_threshold)
    current = read_propagated(paths)
    if current is not None and current.digest == digest:
        return {"version": current.version, "new": False, "labels": current.labels, "tasks": len(current.tasks),
                "unreached": len(task_hash) - len(current.tasks), "neighbours": k,
                "seconds": round(time.monotonic() - start, 3)}
    graph = kept_knn_graph(paths, index, encoder_version, k)  # neighbors (N, k), similarities (N, k)
    seeds: dict[int, list[tuple[str, ...]]] = {}
    for task, path in given.items():
        seeds.setdefault(index.row(task_hash[task]), []).append(path)
    leaf_paths, _ = config.taxonomy.candidate_paths(leafs_only=True)
    y = seed_matrix(len(index), seeds, leaf_paths)  # (N, C)
    probs, reached = leaf_probabilities(spread(graph.neighbors, graph.similarities, y))  # (N, C), (N,)
    predictions = path_predictions(probs, reached, leaf_paths, config.leafs_only, settings.prefix_threshold)
    top = probs.max(axis=1) if probs.shape[1] else np.zeros(len(probs))  # (N,)
    name, created = _new_name(paths, len(given), digest)
    out = Propagated(name, len(given), encoder_version, digest, config.leafs_only, created)
    path_index: dict[tuple[str, ...], int] = {}
    for task, h in task_hash.items():
        row = index.row(h)
        pred = predictions[row]
        if pred is None:
            continue
        p = path_index.setdefault(tuple(pred.path), len(path_index))
        out.tasks[task] = (p, float(pred.score), float(top[row]))
    out.paths = list(path_index)
    save_propagated(paths, out)
    log.info("Project %s: %d labels spread to %d tasks (%d unreached): %s.", paths.project_id, len(given),
             len(out.tasks), len(task_hash) - len(out.tasks), name)
    return {"version": name, "new": True, "labels": len(given), "tasks": len(out.tasks),
            "unreached": len(task_hash) - len(out.tasks), "neighbours": k, "seconds": round(time.monotonic() - start, 3)}
