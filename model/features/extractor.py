"""Which features a model version's heads read: the project's CNN encoder or plain pixels.

A manifest's ``features`` entry names them (``{"kind": "encoder"}`` or ``{"kind": "pixels", "config": {...}}``);
:func:`make_extractor` builds the matching extractor. Both kinds have the same interface (:class:`Extractor`),
and both are cached per content hash under their own version id (:func:`features_version`), so the predictor
and the training job treat them alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any, Protocol

import torch

from model.arrays import BoolArray, FloatArray
from model.encoder.backbone import build_backbone
from model.encoder.config import EncoderConfig
from model.encoder.embedder import Embedder
from model.errors import BundleError
from model.features.pixels import PixelConfig, PixelFeatures
from model.images import ImageSource

__all__ = ["ENCODER_FEATURES", "Extractor", "FeatureKind", "features_dim", "features_kind", "features_version",
           "make_extractor", "pixel_features_spec"]


class FeatureKind(str, Enum):
    """Where a model's features come from."""

    ENCODER = "encoder"  # the (MoCo-pretrained) CNN backbone of the bundle
    PIXELS = "pixels"  # model.features.pixels: downscaled pixels + colour statistics


ENCODER_FEATURES: dict[str, Any] = {"kind": FeatureKind.ENCODER.value}
"""The ``features`` entry of a model that reads its encoder's embeddings (what versions before it had)."""


class Extractor(Protocol):
    """Images in, ``(N, D)`` features out (``Embedder`` and ``PixelFeatures`` both are one)."""

    out_dim: int

    def embed_with_mask(self, images: Sequence[ImageSource], progress: bool = False) -> tuple[FloatArray, BoolArray]:
        ...


def pixel_features_spec(cfg: PixelConfig | None = None) -> dict[str, Any]:
    """The ``features`` entry of a model on pixel features."""
    return {"kind": FeatureKind.PIXELS.value, "config": (cfg or PixelConfig()).to_dict()}


def features_kind(spec: Mapping[str, Any] | None) -> FeatureKind:
    """The kind a ``features`` entry names (None: the encoder, as in older manifests)."""
    kind = (spec or ENCODER_FEATURES).get("kind")
    try:
        return FeatureKind(kind)
    except ValueError:
        raise BundleError(f"unknown feature kind {kind!r} in a manifest; this taxomoco knows "
                          f"{[k.value for k in FeatureKind]}. Retrain, or update taxomoco.") from None


def _pixel_config(spec: Mapping[str, Any]) -> PixelConfig:
    return PixelConfig.from_dict(dict(spec.get("config") or {}))


def features_dim(spec: Mapping[str, Any] | None, encoder_cfg: EncoderConfig) -> int:
    """The feature dimension D the heads read."""
    if features_kind(spec) is FeatureKind.PIXELS:
        return _pixel_config(spec or {}).out_dim
    return encoder_cfg.out_dim


def features_version(spec: Mapping[str, Any] | None, encoder_version: str) -> str:
    """The id the features are cached under: the encoder's version, or the pixel features' own id."""
    if features_kind(spec) is FeatureKind.PIXELS:
        return _pixel_config(spec or {}).version
    return encoder_version


def make_extractor(spec: Mapping[str, Any] | None, encoder_cfg: EncoderConfig,
                   backbone_state: Mapping[str, torch.Tensor] | None, device: str = "auto",
                   batch_size: int = 64) -> Extractor:
    """The extractor a ``features`` entry names (the encoder needs its weights; pixels need nothing)."""
    if features_kind(spec) is FeatureKind.PIXELS:
        return PixelFeatures(_pixel_config(spec or {}))
    if backbone_state is None:
        raise BundleError("the model reads encoder embeddings but no encoder weights were given.")
    backbone = build_backbone(encoder_cfg)
    backbone.load_state_dict(dict(backbone_state))
    return Embedder(backbone, encoder_cfg, device=device, batch_size=batch_size)
