"""Label Studio JSON in and out: prediction items for /predict, taxonomy paths of annotations, project ids.

Result item formats (Label Studio 1.23, see ``/work/shared/label-studio.md``)::

    {"from_name": "taxonomy", "to_name": "image", "type": "taxonomy",
     "value": {"taxonomy": [["Animal", "Mammal", "Cat"]]}, "score": 0.87}
    {"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": ["Cat"]}, "score": 0.87}

A path element is the Choice's ``alias`` when set, else its ``value``; annotations holding values where
aliases exist are resolved to the canonical (alias) form.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ml_backend.labelstudio.label_config import ConfigKind, LabelConfig
from model.errors import DataError, TaxonomyError

log = logging.getLogger(__name__)

Path = tuple[str, ...]


class PathLike(Protocol):
    """What a prediction exposes (``model.heads.decode.PathPrediction``)."""

    path: Sequence[str]
    score: float


def prediction_result(config: LabelConfig, prediction: PathLike | None, version: str) -> dict[str, Any]:
    """One ``/predict`` item for one task.

    Args:
        config: the project's parsed label config.
        prediction: the model's path and calibrated score, or None (unreadable image, no image key):
            an empty result with score 0.
        version: the model version the prediction was computed with (Label Studio compares it with
            what /setup reported).

    Returns:
        ``{"result": [item] or [], "score": s, "model_version": version}``.
    """
    if prediction is None:
        return {"result": [], "score": 0.0, "model_version": version}
    path = [str(p) for p in prediction.path]
    score = float(prediction.score)
    if config.kind is ConfigKind.TAXONOMY:
        value: dict[str, Any] = {"taxonomy": [path]}
    else:
        value = {"choices": [path[-1]]}
    item = {
        "from_name": config.from_name,
        "to_name": config.to_name,
        "type": config.result_type,
        "value": value,
        "score": score,
    }
    return {"result": [item], "score": score, "model_version": version}


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


def project_id_of(value: Any) -> int:
    """The Label Studio project id in any form Label Studio sends it.

    Accepts ``7``, ``"7"``, ``"7.1712345678"`` (/setup's "<id>.<created timestamp>") and ``{"id": 7}``.

    Raises:
        DataError: anything else, naming the value.
    """
    if isinstance(value, Mapping):
        value = value.get("id")
    if isinstance(value, bool):
        value = None
    if isinstance(value, int):
        if value >= 0:
            return value
    elif isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    elif isinstance(value, str):
        head = value.strip().split(".", 1)[0]
        if head.isdigit():
            return int(head)
    raise DataError(
        f"Cannot read a Label Studio project id from {value!r}; send the project as 7, \"7\", "
        "\"7.<timestamp>\" or {\"id\": 7}."
    )
