"""Images in, taxonomy path predictions out: one loaded model version plus its embedding cache.

The version's features come from its encoder or from plain pixels (``model.features.extractor``); both are
cached by content hash under their own id, and the rest of the path is the same.

A :class:`Predictor` is built once per model version (the backend's store builds it in a background thread
and swaps one reference), then serves any number of ``predict`` calls. Images whose content hash is in the
embedding cache skip the encoder entirely, so re-predicting after a heads-only retrain is cheap.
:meth:`Predictor.predict_encoded` takes encoded images with their content hashes, reads the cache once and decodes
only the misses, in batches whose decoded pixels stay under a limit (a request of many huge images never holds
them all in memory at once).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model.arrays import BoolArray, FloatArray
from model.bundle import ModelBundle
from model.encoder.cache import EmbeddingCache, embed_through_cache
from model.features.extractor import ENCODER_FEATURES, Extractor, FeatureKind, features_kind, make_extractor
from model.heads.decode import PathPrediction, decode, full_path_log_probs
from model.images import check_image_header, load_image
from model.propagation import path_predictions

__all__ = ["Encoded", "Predictor"]

Encoded = tuple[bytes, str]
"""An encoded image and its content hash (``model.images.content_hash``)."""


class Predictor:
    """Serves one model version.

    Args:
        bundle: a loaded, validated model version (``model.bundle.load_bundle``).
        cache_dir: root of the embedding cache (per encoder version inside); None disables caching.
        device: "auto" (CUDA when present), "cpu", "cuda", "cuda:N".
        batch_size: encoder batch size.
    """

    def __init__(self, bundle: ModelBundle, cache_dir: Path | None = None, device: str = "auto", batch_size: int = 64):
        self.bundle = bundle
        self.taxonomy = bundle.taxonomy
        self.version: str = bundle.manifest.version
        # the encoder's Embedder, or the pixel features (model.features.extractor): same interface
        self.embedder: Extractor = make_extractor(bundle.features, bundle.encoder_cfg, bundle.backbone_state,
                                                  device=device, batch_size=batch_size)
        self._device, self._batch_size = device, batch_size
        self._encoder_embedder: Extractor | None = None
        self.heads = bundle.heads.eval()
        self.temperature = float(bundle.temperature)
        self.cache = (
            EmbeddingCache(cache_dir, bundle.features_version, bundle.manifest.embedding_dim)
            if cache_dir is not None
            else None
        )
        self._heads_lock = threading.Lock()

    @property
    def encoder_embedder(self) -> Extractor:
        """The version's encoder (every version stores one, also when pixel features won the model choice): what
        the similarity index holds, so image search works whatever features the heads read. Built on first use."""
        if features_kind(self.bundle.features) is FeatureKind.ENCODER:
            return self.embedder
        if self._encoder_embedder is None:
            self._encoder_embedder = make_extractor(ENCODER_FEATURES, self.bundle.encoder_cfg, self.bundle.backbone_state,
                                                    device=self._device, batch_size=self._batch_size)
        return self._encoder_embedder

    def level_logits(self, emb: FloatArray) -> list[torch.Tensor]:
        """Head logits per level for embeddings ``(N, D)``: a list of ``(N, K_k)`` tensors."""
        with self._heads_lock, torch.inference_mode():
            return [t.float() for t in self.heads(torch.from_numpy(np.ascontiguousarray(emb)))]

    def decode_rows(self, logits: Sequence[torch.Tensor], hashes: Sequence[str | None], leafs_only: bool = True,
                    prefix_threshold: float = 0.5) -> tuple[list[PathPrediction], FloatArray]:
        """Served predictions and top full-path probabilities ``(N,)`` of rows with head ``logits`` (L x ``(N, K_k)``).

        A version chosen as label propagation or its blend (``bundle.propagated``) serves, for an image in its
        propagated table (by content hash), the propagated or blended path distribution; every other image gets the
        heads' calibrated decoding.
        """
        preds = decode(logits, self.taxonomy, leafs_only=leafs_only, prefix_threshold=prefix_threshold,
                       temperature=self.temperature)
        full = np.exp(full_path_log_probs(logits, self.taxonomy, self.temperature))  # (N, P_full)
        table = self.bundle.propagated
        if table is None:
            return preds, full.max(axis=1) if full.shape[1] else np.zeros(len(full))
        served = table.served(full, hashes)
        leaf_paths = self.taxonomy.candidate_paths(leafs_only=True)[0]
        override = [i for i, h in enumerate(hashes) if h and h in table]
        if override:
            decoded = path_predictions(served[override], np.ones(len(override), dtype=bool), leaf_paths, leafs_only,
                                       prefix_threshold)
            for i, pred in zip(override, decoded):
                if pred is not None:
                    preds[i] = pred
        return preds, served.max(axis=1) if served.shape[1] else np.zeros(len(served))

    def predict(
        self,
        images: Sequence[Image.Image | None],
        hashes: Sequence[str | None] | None = None,
        leafs_only: bool = True,
        prefix_threshold: float = 0.5,
    ) -> list[PathPrediction | None]:
        """One prediction per image, in order; None where there is neither an image nor a cached embedding.

        Args:
            images: decoded RGB images; None for an image the caller could not read (encoded images with their
                hashes go to :meth:`predict_encoded`, which decodes only those whose embedding is not cached).
            hashes: content hashes aligned with ``images`` (enables the embedding cache), or None.
            leafs_only: only full paths may be predicted (the label config's ``leafsOnly``).
            prefix_threshold: with ``leafs_only=False``, stop at the deepest prefix this probable.
        """
        results: list[PathPrediction | None] = [None] * len(images)
        index = [i for i, im in enumerate(images) if im is not None or (hashes is not None and hashes[i])]
        if not index:
            return results
        emb, ok = embed_through_cache(self.embedder, self.cache, [images[i] for i in index],
                                      [hashes[i] for i in index] if hashes is not None else None)  # (M, D), (M,)
        index = [i for i, good in zip(index, ok) if good]  # a None image whose hash was not cached drops out
        if not index:
            return results
        emb = emb[ok]
        keys = [hashes[i] if hashes is not None else None for i in index]
        preds, _ = self.decode_rows(self.level_logits(emb), keys, leafs_only, prefix_threshold)
        for i, pred in zip(index, preds):
            results[i] = pred
        return results

    def predict_encoded(
        self,
        items: Sequence[Encoded | None],
        leafs_only: bool = True,
        prefix_threshold: float = 0.5,
        max_pixels: int = 50_000_000,
        batch_pixels: int = 200_000_000,
    ) -> tuple[list[PathPrediction | None], dict[int, str]]:
        """One prediction per item, in order, from encoded images: one cache read, only misses decoded.

        Args:
            items: ``(bytes, content hash)`` per image, or None where there is no image.
            leafs_only: only full paths may be predicted (the label config's ``leafsOnly``).
            prefix_threshold: with ``leafs_only=False``, stop at the deepest prefix this probable.
            max_pixels: largest single image (decompression-bomb guard).
            batch_pixels: decoded pixels held at once; misses are decoded and embedded in batches below this.

        Returns:
            ``(predictions, errors)``: None where there is no prediction, and why by item index.
        """
        n = len(items)
        results: list[PathPrediction | None] = [None] * n
        errors: dict[int, str] = {}
        emb = np.full((n, self.bundle.manifest.embedding_dim), np.nan, dtype=np.float32)  # (N, D)
        ok = np.zeros(n, dtype=bool)
        keyed = [i for i, item in enumerate(items) if item is not None]
        if self.cache is not None and keyed:
            got, found = self.cache.get([items[i][1] for i in keyed])  # type: ignore[index]
            hits = [i for i, hit in zip(keyed, found) if hit]
            emb[hits] = got[found]
            ok[hits] = True
        batch: list[int] = []
        held = 0
        for i in [i for i in keyed if not ok[i]]:
            data = items[i][0]  # type: ignore[index]
            try:
                width, height = check_image_header(data, max_pixels, name=f"image {i}")
            except Exception as exc:  # per-image boundary: the caller reports it with its task
                errors[i] = str(exc)
                continue
            if batch and held + width * height > batch_pixels:
                self._embed_batch(items, batch, emb, ok, errors, max_pixels)
                batch, held = [], 0
            batch.append(i)
            held += width * height
        if batch:
            self._embed_batch(items, batch, emb, ok, errors, max_pixels)
        rows = np.flatnonzero(ok)
        if len(rows):
            keys = [items[i][1] for i in rows.tolist()]
            preds, _ = self.decode_rows(self.level_logits(emb[rows]), keys, leafs_only, prefix_threshold)
            for i, pred in zip(rows.tolist(), preds):
                results[i] = pred
        return results, errors

    def _embed_batch(self, items: Sequence[Encoded | None], batch: list[int], emb: FloatArray, ok: BoolArray,
                     errors: dict[int, str], max_pixels: int) -> None:
        """Decode ``batch`` (indices into ``items``), embed what decodes, store it in the cache."""
        images, rows = [], []
        for i in batch:
            try:
                images.append(load_image(items[i][0], max_pixels))  # type: ignore[index]
                rows.append(i)
            except Exception as exc:  # per-image boundary: corrupt or truncated
                errors[i] = str(exc)
        if not images:
            return
        new, new_ok = self.embedder.embed_with_mask(images)  # (M, D), (M,)
        good = [i for i, fine in zip(rows, new_ok) if fine]
        emb[good] = new[new_ok]
        ok[good] = True
        for i, fine in zip(rows, new_ok):
            if not fine:
                errors[i] = "the image could not be embedded"
        if self.cache is not None and good:
            self.cache.put([items[i][1] for i in good], emb[good])  # type: ignore[index]

