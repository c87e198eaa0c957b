"""The training job's features step: every feature source the enabled candidates read, for all images.

``model.heads.candidates`` compares models on the project's current encoder, on the live model's encoder
when this run pretrained a new one, and on plain pixels. Each source is embedded once per image through the
project's embedding cache (``ProjectPaths.cache``, one directory per encoder version or pixel-feature id), so
a later training computes only images it never saw.
"""

from __future__ import annotations

import logging

import numpy as np

from ml_backend.paths import ProjectPaths
from ml_backend.settings import Settings
from ml_backend.training.encoder import Encoder, embed_all
from ml_backend.training.images import ProjectImages
from model.encoder.cache import EmbeddingCache, embed_through_cache
from model.features.pixels import PixelFeatures
from model.heads.candidates import FeatureSource, parse_candidates

__all__ = ["Features", "embed_features", "source_version"]

log = logging.getLogger(__name__)

Features = dict[FeatureSource, np.ndarray]
"""Features ``(N, D_source)`` of all images (``ProjectImages`` order) per source; NaN rows where unreadable."""


def embed_features(settings: Settings, paths: ProjectPaths, encoder: Encoder, previous: Encoder | None,
                   images: ProjectImages) -> tuple[Features, np.ndarray]:
    """The features of every source the enabled candidates (``MODEL_CANDIDATES``) read.

    Args:
        encoder: the project's current encoder (always embedded: it is published with every version).
        previous: the live model's encoder when it differs from ``encoder`` (this run pretrained), else None.

    Returns:
        ``(features, ok)``; ``ok (N,)`` is True where every source could read the image.
    """
    sources = {c.features for c in parse_candidates(settings.model_candidates)}
    emb, ok = embed_all(settings, paths, encoder, images)  # (N, D), (N,)
    features: Features = {FeatureSource.ENCODER: emb}
    if FeatureSource.PREVIOUS in sources and previous is not None and previous.version != encoder.version:
        prev, prev_ok = embed_all(settings, paths, previous, images)
        features[FeatureSource.PREVIOUS] = prev
        ok = ok & prev_ok
    if FeatureSource.PIXELS in sources:
        extractor = PixelFeatures(max_pixels=settings.image_max_pixels)
        cache = EmbeddingCache(paths.cache, extractor.version, extractor.out_dim)
        pix, pix_ok = embed_through_cache(extractor, cache, [str(p) for p in images.paths], images.hashes)
        features[FeatureSource.PIXELS] = pix
        ok = ok & pix_ok
    log.info("Project %s: features %s for %d images (%d unreadable).", paths.project_id,
             [s.value for s in features], len(ok), int((~ok).sum()))
    return features, ok


def source_version(settings: Settings, source: FeatureSource, encoder: Encoder) -> str | None:
    """The id ``source``'s features are cached under, what a model version's ``features_version`` names (the
    current encoder's version, or the pixel features' id); None for the previous encoder's features."""
    if source is FeatureSource.PIXELS:
        return PixelFeatures(max_pixels=settings.image_max_pixels).version
    if source is FeatureSource.ENCODER:
        return encoder.version
    return None
