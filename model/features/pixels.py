"""Plain image features: a downscaled copy of the image plus colour statistics, no learned weights.

The baseline every training compares against (``model.heads.candidates``): on small or simple data a linear
model on these features often beats a weak encoder. :class:`PixelFeatures` has the encoder's embedding
interface (``out_dim``, ``embed_with_mask``), so the embedding cache and the predictor serve it unchanged.

Per image, from its RGB version (grayscale images have three equal channels):

* ``size x size x 3`` pixels of the centre square, area-downscaled, in [0, 1];
* per channel: mean and standard deviation of the whole image, and a ``bins``-bin histogram (fractions).

``D = 3 * size**2 + 6 + 3 * bins`` (798 with the defaults).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from model.arrays import BoolArray, FloatArray
from model.data import ImageListDataset, Skipped
from model.errors import ConfigError
from model.images import ImageSource

__all__ = ["PixelConfig", "PixelFeatures", "pixel_vector"]


@dataclass(frozen=True)
class PixelConfig:
    """What defines the pixel features.

    Attributes:
        size: side of the downscaled centre square.
        bins: histogram bins per channel.
    """

    size: int = 16
    bins: int = 8

    def __post_init__(self) -> None:
        if not 2 <= int(self.size) <= 64 or not 2 <= int(self.bins) <= 64:
            raise ConfigError(f"PixelConfig size and bins must lie in 2..64 (got {self.size}, {self.bins}); "
                              "the defaults are 16 and 8.")

    @property
    def out_dim(self) -> int:
        """Feature dimension D."""
        return 3 * self.size * self.size + 6 + 3 * self.bins

    @property
    def version(self) -> str:
        """A stable id of these features (the embedding cache key, like an encoder version)."""
        digest = hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
        return f"pixels-{digest}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PixelConfig:
        unknown = sorted(set(data) - {"size", "bins"})
        if unknown:
            raise ConfigError(f"unknown PixelConfig keys {unknown}; valid ones are ['bins', 'size'].")
        return cls(**data)


def pixel_vector(img: Image.Image, cfg: PixelConfig) -> FloatArray:
    """The features of one RGB image: ``(D,)`` float32."""
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    w, h = rgb.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    small = rgb.resize((cfg.size, cfg.size), Image.Resampling.BOX, box=(left, top, left + side, top + side))
    pixels = np.asarray(small, dtype=np.float32).reshape(-1) / 255.0  # (size*size*3,)
    whole = np.asarray(rgb, dtype=np.float32).reshape(-1, 3) / 255.0  # (H*W, 3)
    hist = [np.histogram(whole[:, c], bins=cfg.bins, range=(0.0, 1.0))[0] / len(whole) for c in range(3)]
    stats = np.concatenate([whole.mean(0), whole.std(0), *hist]).astype(np.float32)  # (6 + 3*bins,)
    return np.concatenate([pixels, stats])


class PixelFeatures:
    """Pixel features of many images, with the interface of ``model.encoder.embedder.Embedder``.

    Args:
        cfg: the feature definition.
        max_pixels: largest decoded image accepted.
    """

    def __init__(self, cfg: PixelConfig | None = None, max_pixels: int = 50_000_000) -> None:
        self.cfg = cfg or PixelConfig()
        self.out_dim = self.cfg.out_dim
        self.version = self.cfg.version
        self.max_pixels = max_pixels

    def embed_with_mask(self, images: Sequence[ImageSource], progress: bool = False) -> tuple[FloatArray, BoolArray]:
        """Features of images (paths, bytes, PIL images, uint8 arrays).

        Returns:
            ``(features (N, D) float32, ok (N,) bool)``; rows of unreadable images are NaN with ``ok`` False.
        """
        out = np.full((len(images), self.out_dim), np.nan, dtype=np.float32)  # (N, D)
        ok = np.zeros(len(images), dtype=bool)
        dataset = ImageListDataset(images, lambda im: pixel_vector(im, self.cfg), self.max_pixels)
        for i in tqdm(range(len(dataset)), desc="pixel features", unit="img", disable=not progress):
            item = dataset[i]
            if isinstance(item, Skipped):
                continue
            out[i], ok[i] = item[0], True
        return out, ok

    def embed(self, images: Sequence[ImageSource], progress: bool = False) -> FloatArray:
        """Features ``(N, D)``; NaN rows for unreadable images."""
        return self.embed_with_mask(images, progress)[0]
