"""Embeddings of image files for the folder commands (``taxomoco train|evaluate|predict|similar``): encoder
embeddings, and pixel features when a head uses them, read through a model directory's embedding cache."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from model.encoder.backbone import build_backbone, encoder_version
from model.encoder.cache import EmbeddingCache, embed_through_cache
from model.encoder.config import EncoderConfig
from model.encoder.embedder import Embedder
from model.features.pixels import PixelFeatures
from model.heads.candidates import FeatureSource
from model.images import content_hash

__all__ = ["embed_files", "file_hashes", "folder_features"]


def file_hashes(files: Sequence[Path]) -> list[str]:
    """Content hashes of image files (the embedding cache's keys)."""
    return [content_hash(f.read_bytes()) for f in files]


def embed_files(
    files: Sequence[Path], cfg: EncoderConfig, state: dict, cache_dir: Path | None, device: str
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of image files through the cache. Returns ``(N, D)`` float32 and an ``(N,)`` readable mask."""
    backbone = build_backbone(cfg)
    backbone.load_state_dict(state)
    cache = EmbeddingCache(cache_dir, encoder_version(state), backbone.out_dim) if cache_dir else None
    embedder = Embedder(backbone, cfg, device=device)
    return embed_through_cache(embedder, cache, list(files), file_hashes(files), progress=True)


def folder_features(files: Sequence[Path], cfg: EncoderConfig, state: dict, cache_dir: Path, device: str,
                    pixels: bool) -> tuple[dict[FeatureSource, np.ndarray], np.ndarray]:
    """Encoder embeddings (and pixel features) of image files through the cache; ``ok (N,)`` where all read."""
    emb, ok = embed_files(files, cfg, state, cache_dir, device)
    features = {FeatureSource.ENCODER: emb}
    if pixels:
        extractor = PixelFeatures()
        cache = EmbeddingCache(cache_dir, extractor.version, extractor.out_dim)
        pix, pix_ok = embed_through_cache(extractor, cache, list(files), file_hashes(files), progress=True)
        features[FeatureSource.PIXELS] = pix
        ok = ok & pix_ok
    return features, ok
