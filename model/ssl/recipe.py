"""The pretraining recipe chosen from the images themselves: input size and augmentation strengths.

The rule looks at a sample of the project's images (never at labels) and is documented in docs/design.md,
"Pretraining recipe":

- **small images** (median shorter side <= ``SMALL_SIDE`` px; icons, silhouettes, MNIST-like drawings): the
  encoder works at 32 px; views keep more of the object (crops of at least 35 % of the area, since a 20 % crop
  of a 28 px silhouette is a few strokes), blur is weak (it erases thin strokes), and rotations are frequent
  (shape, not orientation, identifies the class). On animal-mnist this recipe beat lightly's MoCo v2 defaults
  by 5-6 points of leaf accuracy, and 32 px beat 64 px.
- **photos** (everything else): MoCo v2's augmentations (crops down to 20 %, colour jitter at half strength,
  random grayscale, blur); the input size is 64 px on a CPU and 96 px on a GPU, never above the images' own
  median shorter side.
- **grayscale images** (nearly every sampled image has R = G = B): random grayscale and saturation/hue jitter
  change nothing, so the grayscale probability is 0 and only brightness/contrast jitter remains meaningful.

An explicit ``ENCODER_INPUT_SIZE`` / ``PRETRAIN_AUGMENT`` overrides the rule.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from enum import Enum
from typing import Any

import numpy as np

from model.errors import TaxomocoError
from model.images import ImageSource, to_rgb_image
from model.ssl.config import AugmentConfig

__all__ = ["SMALL_SIDE", "ImageSummary", "RecipeKind", "choose_recipe", "summarize_images"]

SMALL_SIDE = 48
SUMMARY_IMAGES = 64
GRAY_SHARE = 0.95


class RecipeKind(str, Enum):
    """The augmentation recipes (``PRETRAIN_AUGMENT``)."""

    AUTO = "auto"
    SMALL_IMAGES = "small-images"
    MOCO_V2 = "moco-v2"


@dataclass(frozen=True)
class ImageSummary:
    """What the recipe rule reads off a sample of the images.

    Attributes:
        sampled: Images read successfully.
        median_side: Median of each image's shorter side, in pixels.
        gray_share: Fraction of sampled images whose three channels are equal.
    """

    sampled: int
    median_side: int
    gray_share: float

    @property
    def grayscale(self) -> bool:
        return self.sampled > 0 and self.gray_share >= GRAY_SHARE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize_images(images: Sequence[ImageSource]) -> ImageSummary:
    """Sizes and colour of up to ``SUMMARY_IMAGES`` evenly spaced images (unreadable ones are left out)."""
    stride = max(1, len(images) // SUMMARY_IMAGES)
    sides, gray = [], 0
    for src in list(images)[::stride][:SUMMARY_IMAGES]:
        try:
            img = to_rgb_image(src)
        except (TaxomocoError, OSError, ValueError):
            continue
        sides.append(min(img.size))
        img.thumbnail((64, 64))
        px = np.asarray(img, dtype=np.int16)  # (h, w, 3)
        if np.abs(px[..., 0] - px[..., 1]).max() <= 2 and np.abs(px[..., 1] - px[..., 2]).max() <= 2:
            gray += 1
    if not sides:
        return ImageSummary(0, 0, 0.0)
    return ImageSummary(len(sides), int(statistics.median(sides)), gray / len(sides))


SMALL_IMAGES_AUGMENT = AugmentConfig(min_scale=0.35, blur_prob=0.1, blur_sigmas=(0.1, 0.8), rotation_prob=0.5,
                                     rotation_degrees=20.0)
MOCO_V2_AUGMENT = AugmentConfig()


def choose_recipe(summary: ImageSummary, on_gpu: bool, input_size: int = 0,
                  kind: RecipeKind = RecipeKind.AUTO) -> tuple[int, AugmentConfig, RecipeKind]:
    """Input size, augmentation strengths and the recipe's name for images like ``summary``.

    Args:
        summary: From :func:`summarize_images`.
        on_gpu: Whether the encoder trains on a GPU (larger inputs are affordable).
        input_size: An explicit input size (``ENCODER_INPUT_SIZE``); 0 = choose.
        kind: An explicit recipe (``PRETRAIN_AUGMENT``); AUTO = choose.
    """
    small = summary.sampled > 0 and summary.median_side <= SMALL_SIDE
    if kind is RecipeKind.AUTO:
        kind = RecipeKind.SMALL_IMAGES if small else RecipeKind.MOCO_V2
    augment = SMALL_IMAGES_AUGMENT if kind is RecipeKind.SMALL_IMAGES else MOCO_V2_AUGMENT
    if summary.grayscale:
        augment = replace(augment, gray_prob=0.0)
    if input_size <= 0:
        if kind is RecipeKind.SMALL_IMAGES:
            input_size = 32
        else:
            input_size = 96 if on_gpu else 64
            if summary.sampled:
                input_size = max(32, min(input_size, summary.median_side))
    return input_size, augment, kind
