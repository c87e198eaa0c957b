"""Prediction result items for Label Studio (``/predict`` answers), in the label config's own control and form.

Result item formats (Label Studio 1.23, see ``docs/design.md``)::

    {"from_name": "taxonomy", "to_name": "image", "type": "taxonomy",
     "value": {"taxonomy": [["Animal", "Mammal", "Cat"]]}, "score": 0.87}
    {"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": ["Cat"]}, "score": 0.87}

A path element is the Choice's ``alias`` when set, else its ``value``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

from ml_backend.labelstudio.label_config import ConfigKind, LabelConfig

__all__ = ["Path", "PathLike", "prediction_result"]

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


