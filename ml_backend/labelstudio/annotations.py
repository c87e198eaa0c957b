"""Annotations as Label Studio stores them -> taxonomy paths per annotator (``model.crowd.types.Annotation``).

Which annotations count:
    * cancelled (``was_cancelled``) annotations give no label;
    * ``ground_truth: true`` annotations, then reviewed ones (an accepted review in ``review_result`` /
      ``reviews`` / ``reviewed``, as Label Studio Enterprise reports them) take precedence;
    * the annotator is ``completed_by`` (an id, or a dict with ``id`` / ``email``);
    * labels no longer in the label config are reported as problems and left out; a prefix path given beside a
      deeper one (``[["A"], ["A", "B"]]``) is read as the deeper path.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ml_backend.labelstudio.label_config import ConfigKind, LabelConfig
from model.crowd.types import Annotation
from model.errors import TaxonomyError
from model.taxonomy import Path  # a taxonomy path: one class name per level

__all__ = ["AnnotationPaths", "annotation_paths", "annotations_from_tasks", "parse_annotation"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnnotationPaths:
    """Paths of one annotation.

    Attributes:
        paths: the deepest consistent paths, canonical names, in the order first given. A path that is a
            prefix of another path in the same annotation is dropped (``[["A"], ["A", "B"]]`` keeps
            ``("A", "B")``): Label Studio stores the parent when a child is ticked.
        unknown: paths not in the config's taxonomy (a label renamed or removed since), with the reason.
    """

    paths: list[Path] = field(default_factory=list)
    unknown: list[tuple[Path, str]] = field(default_factory=list)


def parse_annotation(result: Sequence[Mapping[str, Any]] | None, config: LabelConfig) -> AnnotationPaths:
    """The taxonomy paths of one annotation's ``result`` list (items of other controls are skipped).

    Args:
        result: the annotation's ``result`` as Label Studio stores it (None or [] for an empty one).
        config: the project's parsed label config.
    """
    raw: list[Path] = []
    for item in result or []:
        if not isinstance(item, Mapping) or item.get("from_name") != config.from_name:
            continue
        value = item.get("value") or {}
        if not isinstance(value, Mapping):
            continue
        if config.kind is ConfigKind.TAXONOMY:
            for path in value.get("taxonomy") or []:
                if isinstance(path, Sequence) and not isinstance(path, str):
                    raw.append(tuple(str(p) for p in path))
                elif isinstance(path, str):
                    raw.append((path,))
        else:
            for choice in value.get("choices") or []:
                raw.append((str(choice),))
    resolved: list[Path] = []
    unknown: list[tuple[Path, str]] = []
    for path in raw:
        try:
            canonical = config.taxonomy.resolve(path)
        except TaxonomyError as exc:
            unknown.append((path, str(exc)))
            continue
        if canonical not in resolved:
            resolved.append(canonical)
    deepest = [p for p in resolved if not any(len(q) > len(p) and q[: len(p)] == p for q in resolved)]
    return AnnotationPaths(paths=deepest, unknown=unknown)


def annotation_paths(result: Sequence[Mapping[str, Any]] | None, config: LabelConfig) -> list[Path]:
    """The deepest consistent taxonomy paths of one annotation (see :func:`parse_annotation`).

    Unknown paths are logged and left out, never raised.
    """
    parsed = parse_annotation(result, config)
    for path, reason in parsed.unknown:
        log.warning("annotation path %s skipped: %s", list(path), reason)
    return parsed.paths


def _annotator_of(ann: Mapping[str, Any]) -> str:
    who = ann.get("completed_by")
    if isinstance(who, Mapping):
        who = who.get("id", who.get("email"))
    if who is None:
        who = ann.get("created_username") or "unknown"
    return str(who)


def _is_reviewed(ann: Mapping[str, Any]) -> bool:
    if ann.get("reviewed") is True:
        return True
    if str(ann.get("review_result") or "").lower() in ("accepted", "approved"):
        return True
    reviews = ann.get("reviews")
    if isinstance(reviews, Sequence) and not isinstance(reviews, str):
        return any(isinstance(r, Mapping) and r.get("accepted") is True for r in reviews)
    return False


def annotations_from_tasks(tasks: Iterable[Any], config: LabelConfig) -> tuple[list[Annotation], list[str]]:
    """The annotations of every task, one :class:`Annotation` per Label Studio annotation.

    Args:
        tasks: ``ml_backend.labelstudio.tasks.TaskRecord`` objects (``id``, ``data``, ``annotations`` as Label Studio returns
            them) or plain task dicts with the same keys.
        config: the project's parsed label config.

    Returns:
        annotations: one per annotation; cancelled or empty ones have no paths (their task stays known and
            is reported as excluded when nothing else labels it).
        problems: one message per label that could not be used (unknown path, missing annotator ...).
    """
    out: list[Annotation] = []
    problems: list[str] = []
    for task in tasks:
        task_id = task["id"] if isinstance(task, Mapping) else task.id
        anns = task.get("annotations", []) if isinstance(task, Mapping) else task.annotations
        for ann in anns or []:
            if not isinstance(ann, Mapping):
                problems.append(f"task {task_id}: an annotation is not an object ({type(ann).__name__}); skipped.")
                continue
            annotator = _annotator_of(ann)
            if ann.get("was_cancelled"):
                out.append(Annotation(int(task_id), annotator, ()))
                continue
            parsed = parse_annotation(ann.get("result"), config)
            for _path, reason in parsed.unknown:
                problems.append(f"task {task_id}, annotation {ann.get('id')} by {annotator}: {reason}")
            out.append(Annotation(
                item=int(task_id), annotator=annotator, paths=tuple(tuple(p) for p in parsed.paths),
                ground_truth=bool(ann.get("ground_truth")), reviewed=_is_reviewed(ann),
            ))
    return out, problems
