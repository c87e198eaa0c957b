"""The models a training can build cheaply from the same labels, compared by cross-validation before publishing.

A :class:`Candidate` is a pair (features, head): which feature vectors it reads (a key of the caller's
feature table: ``"encoder"`` for the project's current encoder, ``"previous"`` for the encoder of the live
model when this training pretrained a new one, ``"pixels"`` for ``model.features.pixels``) and how its heads
are fitted. Every candidate yields plain :class:`~model.heads.heads.TaxonomyHeads`, so whichever wins is
published, decoded and calibrated the same way.

=========================  ==========  ==================  =====
name                       features    head                rank
=========================  ==========  ==================  =====
``pixels+linear``          pixels      logistic regression 0
``encoder+prototypes``     encoder     nearest class mean  1
``encoder+mlp``            encoder     one MLP per level   2
``previous-encoder+mlp``   previous    one MLP per level   3
=========================  ==========  ==================  =====

``rank`` orders them by cost and simplicity (no CNN at all < no training < trained heads < an older encoder
kept alive); a tie in the cross-validated score goes to the lower rank (``model.heads.selection``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from model.arrays import FloatArray, IntArray
from model.errors import ConfigError
from model.heads.heads import HeadsConfig, TaxonomyHeads
from model.heads.linear import logistic_heads, prototype_heads
from model.heads.mlp_training import train_heads

__all__ = ["CANDIDATES", "Candidate", "FeatureSource", "HeadKind", "parse_candidates"]


class HeadKind(str, Enum):
    """How a candidate's heads are fitted."""

    MLP = "mlp"  # model.heads.mlp_training.train_heads
    PROTOTYPES = "prototypes"  # model.heads.linear.prototype_heads
    LINEAR = "linear"  # model.heads.linear.logistic_heads


class FeatureSource(str, Enum):
    """Which feature vectors a candidate reads."""

    ENCODER = "encoder"  # the project's current encoder (pretrained in this run, or the live one)
    PREVIOUS = "previous"  # the live model's encoder when this run pretrained a new one
    PIXELS = "pixels"  # model.features.pixels


@dataclass(frozen=True)
class Candidate:
    """One way to build the model (see the module docstring)."""

    name: str
    features: FeatureSource
    head: HeadKind
    rank: int
    description: str

    def train(self, emb: FloatArray, targets: IntArray, num_classes: list[int],
              heads_cfg: HeadsConfig | None = None, init: TaxonomyHeads | None = None) -> TaxonomyHeads:
        """Fit this candidate's heads on labelled features ``(N, D)`` and targets ``(N, L)``.

        ``init``: earlier heads on the same features; the logistic regression starts its solver from them (the same
        optimum, fewer iterations: ``model.heads.linear``); the other heads ignore it.
        """
        if self.head is HeadKind.PROTOTYPES:
            return prototype_heads(emb, targets, num_classes)
        if self.head is HeadKind.LINEAR:
            return logistic_heads(emb, targets, num_classes, init=init)
        return train_heads(emb, targets, num_classes, heads_cfg or HeadsConfig())

    @property
    def recipe(self) -> str:
        """The name this candidate has once published: its encoder is then the live one (``encoder+...``)."""
        return CANDIDATES["encoder+mlp"].name if self.features is FeatureSource.PREVIOUS else self.name


CANDIDATES: dict[str, Candidate] = {c.name: c for c in (
    Candidate("pixels+linear", FeatureSource.PIXELS, HeadKind.LINEAR, 0,
              "downscaled pixels and colour statistics, logistic regression per level"),
    Candidate("encoder+prototypes", FeatureSource.ENCODER, HeadKind.PROTOTYPES, 1,
              "the project's encoder, nearest class mean per level"),
    Candidate("encoder+mlp", FeatureSource.ENCODER, HeadKind.MLP, 2,
              "the project's encoder, one MLP head per level"),
    Candidate("previous-encoder+mlp", FeatureSource.PREVIOUS, HeadKind.MLP, 3,
              "the live model's encoder (before this pretraining), one MLP head per level"),
)}
"""Every candidate by name, in rank order."""


def parse_candidates(names: tuple[str, ...] | list[str]) -> list[Candidate]:
    """The candidates named (any order, duplicates ignored), in rank order.

    Raises:
        ConfigError: an unknown name, or none at all.
    """
    unknown = sorted(set(names) - set(CANDIDATES))
    if unknown or not names:
        raise ConfigError(f"MODEL_CANDIDATES names {unknown or 'nothing'}; choose one or more of "
                          f"{', '.join(CANDIDATES)} (comma-separated).")
    return sorted({CANDIDATES[n] for n in names}, key=lambda c: c.rank)
