"""When a training run pretrains the encoder again, and the records that policy reads.

A project with fewer than ``PRETRAIN_MIN_IMAGES`` images is never pretrained unless asked (self-supervision on so
few images measured worse than plain pixel features): its heads train on the initial encoder and the model choice
compares them with plain image features. Otherwise a project is pretrained on its first training, when asked
(``force_pretrain`` / ``POST /train``), when the live
encoder is missing, and when it grew by ``REPRETRAIN_NEW_FRACTION`` since the last pretraining; otherwise only the
heads train on the live encoder. ``ProjectPaths.pretrain_record`` / ``pretrain_request`` hold the state.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from enum import Enum
from typing import Any

from ml_backend.paths import ProjectPaths
from ml_backend.training.records import utc_now
from model.atomic import atomic_write_json, atomic_write_text

__all__ = [
    "PretrainDecision",
    "PretrainReason",
    "clear_pretrain_request",
    "decide_pretrain",
    "pretrain_requested",
    "read_pretrain_record",
    "request_pretrain",
    "write_pretrain_record",
]

log = logging.getLogger(__name__)


class PretrainReason(str, Enum):
    """Why a run pretrains the encoder (or why it does not)."""

    FIRST = "first training: no encoder pretrained on this project yet"
    FORCED = "pretraining was asked for"
    GREW = "the project gained enough new images since the last pretraining"
    NO_ENCODER = "the live model's encoder is missing"
    HEADS_ONLY = "heads only on the live encoder"
    TOO_FEW_IMAGES = ("too few images to pretrain (PRETRAIN_MIN_IMAGES): the heads train on the initial encoder "
                      "and are compared with plain image features")


@dataclass(frozen=True)
class PretrainDecision:
    """Whether to pretrain, why, and the numbers behind it."""

    pretrain: bool
    reason: PretrainReason
    n_images: int
    n_images_at_last_pretrain: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"pretrain": self.pretrain, "reason": self.reason.value, "n_images": self.n_images,
                "n_images_at_last_pretrain": self.n_images_at_last_pretrain}


def decide_pretrain(
    n_images: int, record: dict[str, Any] | None, has_live_encoder: bool, force: bool, repretrain_fraction: float,
    min_images: int = 0,
) -> PretrainDecision:
    """The pretraining policy.

    Args:
        n_images: readable images of the project now.
        record: the last pretraining's record (``{"n_images": ...}``), None when there was none.
        has_live_encoder: whether a live model (with its encoder) exists to train heads on.
        force: pretraining was asked for (``force_pretrain``).
        repretrain_fraction: pretrain again when ``n_images >= (1 + fraction) * n_images_at_last_pretrain``.
        min_images: never pretrain (unless forced) with fewer images.
    """
    last = int(record["n_images"]) if record and "n_images" in record else None
    if force:
        return PretrainDecision(True, PretrainReason.FORCED, n_images, last)
    if n_images < min_images:
        return PretrainDecision(False, PretrainReason.TOO_FEW_IMAGES, n_images, last)
    if last is None:
        return PretrainDecision(True, PretrainReason.FIRST, n_images, last)
    if not has_live_encoder:
        return PretrainDecision(True, PretrainReason.NO_ENCODER, n_images, last)
    if n_images - last >= repretrain_fraction * max(last, 1):
        return PretrainDecision(True, PretrainReason.GREW, n_images, last)
    return PretrainDecision(False, PretrainReason.HEADS_ONLY, n_images, last)


def read_pretrain_record(paths: ProjectPaths) -> dict[str, Any] | None:
    """The last successful pretraining of a project (``{"n_images", "encoder_version", "finished_at"}``),
    or None when the project's encoder was never pretrained (or the record is unreadable)."""
    try:
        return dict(json.loads(paths.pretrain_record.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("Pretrain record %s unreadable (%s); treating the project as never pretrained.",
                    paths.pretrain_record, exc)
        return None


def write_pretrain_record(paths: ProjectPaths, n_images: int, encoder_version: str) -> None:
    """Remember that an encoder was pretrained on ``n_images`` images."""
    atomic_write_json(paths.pretrain_record,
                      {"n_images": int(n_images), "encoder_version": encoder_version, "finished_at": utc_now()})


def request_pretrain(paths: ProjectPaths) -> None:
    """Ask the project's next training run to pretrain (kept until a pretraining is published), so that a
    forced pretraining folded into an already waiting job is not lost."""
    atomic_write_text(paths.pretrain_request, utc_now())


def pretrain_requested(paths: ProjectPaths) -> bool:
    """Whether a pretraining was asked for and not yet published."""
    return paths.pretrain_request.exists()


def clear_pretrain_request(paths: ProjectPaths) -> None:
    """A pretraining was published: the request is fulfilled."""
    paths.pretrain_request.unlink(missing_ok=True)
