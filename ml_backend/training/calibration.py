"""Reusing a project's last calibration so that a small heads-only retrain publishes in seconds.

Every published model's scores are calibrated by a temperature fitted on out-of-fold logits
(``model.heads.training.cross_validate``: k extra heads trainings, most of a retrain's time). When a retrain's
labels differ from those of the last cross-validation by at most ``CALIBRATION_REUSE_FRACTION`` (one new
annotation among a thousand) and the encoder is the same, the job trains the final heads only, publishes them
with the last temperature, and runs the cross-validation *after* publishing (for the disagreement flags and
the record the next retrain compares against). Any larger change, a new encoder or no record → the
cross-validation runs before publishing, as always.

The record, ``ProjectPaths.calibration`` (``jobs/calibration.json``, atomic replace)::

    {"temperature": 1.3, "metrics": {...}, "encoder_version": "...", "model_version": "...",
     "n_labelled": 1000, "labels": ["<16 hex digits per (image hash, path) pair>", ...], "at": "...",
     "candidate": "encoder+mlp"}

``candidate`` is the model the last selection published (``model.heads.candidates``, named as published: its
encoder is the live one); a reused calibration keeps it, and ``metrics["model_choice"]`` keeps that selection.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ml_backend.paths import ProjectPaths
from ml_backend.training.records import utc_now
from model.atomic import atomic_write_json

__all__ = [
    "CalibrationRecord",
    "ReuseDecision",
    "decide_reuse",
    "label_digests",
    "read_calibration",
    "write_calibration",
]

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class CalibrationRecord:
    """The last cross-validation of a project: its temperature and metrics, and the labels it saw."""

    temperature: float
    metrics: dict[str, Any]
    encoder_version: str
    model_version: str
    n_labelled: int
    labels: list[str] = field(default_factory=list)  # label_digests() of the labelled pairs
    at: str = ""
    candidate: str = "encoder+mlp"  # the published candidate's recipe (records before the selection: MLP heads)


@dataclass(frozen=True)
class ReuseDecision:
    """Whether a retrain may publish with the recorded temperature, and why."""

    reuse: bool
    reason: str
    changed_fraction: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"reuse": self.reuse, "reason": self.reason, "changed_fraction": self.changed_fraction}


def label_digests(pairs: Iterable[tuple[str, Sequence[str]]]) -> set[str]:
    """A short digest per ``(image content hash, label path)`` training pair."""
    return {hashlib.sha256(f"{h}|{'/'.join(p)}".encode()).hexdigest()[:16] for h, p in pairs}


def decide_reuse(record: CalibrationRecord | None, encoder_version: str, labels: set[str],
                 max_fraction: float) -> ReuseDecision:
    """Reuse the recorded temperature when the encoder is the same and the labels changed by at most
    ``max_fraction`` (pairs added, removed or relabelled, over the current number of pairs)."""
    if max_fraction <= 0:
        return ReuseDecision(False, "reuse is off (CALIBRATION_REUSE_FRACTION=0)")
    if record is None:
        return ReuseDecision(False, "no earlier cross-validation")
    if record.encoder_version != encoder_version:
        return ReuseDecision(False, "the encoder changed since the last cross-validation")
    changed = len(labels.symmetric_difference(record.labels)) / max(len(labels), 1)
    if changed > max_fraction:
        return ReuseDecision(False, f"{changed:.1%} of the labels changed (reuse up to {max_fraction:.1%})", changed)
    return ReuseDecision(True, f"{changed:.1%} of the labels changed since the last cross-validation", changed)


def read_calibration(paths: ProjectPaths) -> CalibrationRecord | None:
    """The project's calibration record, or None (none yet, or unreadable: then logged)."""
    path = paths.calibration
    try:
        return CalibrationRecord(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        log.warning("Calibration record %s unreadable (%s); the next retrain cross-validates first.", path, exc)
        return None


def write_calibration(paths: ProjectPaths, temperature: float, metrics: dict[str, Any], encoder_version: str,
                      model_version: str, labels: set[str], candidate: str = "encoder+mlp") -> CalibrationRecord:
    """Record a cross-validation (atomic replace) and return the record."""
    record = CalibrationRecord(float(temperature), dict(metrics), encoder_version, model_version, len(labels),
                               sorted(labels), utc_now(), candidate)
    atomic_write_json(paths.calibration, asdict(record))
    return record
