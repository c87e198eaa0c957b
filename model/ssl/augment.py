"""Image transforms: the two MoCo v2 views used for pretraining, and the deterministic eval transform.

Both work on RGB PIL images (see :mod:`model.images`) and normalise with the encoder's mean/std.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torchvision.transforms as T
from lightly.transforms import MoCoV2Transform
from PIL import Image

from model.encoder.backbone import EncoderConfig
from model.errors import ConfigError


@dataclass(frozen=True)
class AugmentConfig:
    """Strengths of the MoCo v2 augmentations (lightly's ``MoCoV2Transform`` parameters).

    The defaults are MoCo v2's recipe adapted to small images (colour jitter at half strength, as lightly
    recommends for CIFAR-sized inputs) plus the flips and small rotations of the product's source method.

    Attributes:
        min_scale: Smallest random-resized-crop area, as a fraction of the image (0..1).
        cj_prob: Probability of colour jitter.
        cj_strength: Multiplies brightness/contrast/saturation (0.4) and hue (0.1) jitter.
        gray_prob: Probability of converting a view to grayscale.
        blur_prob: Probability of Gaussian blur.
        blur_sigmas: (min, max) standard deviation of the blur kernel, in pixels.
        hflip_prob: Probability of a horizontal flip.
        vflip_prob: Probability of a vertical flip (raise for top-down or rotation-free imagery).
        rotation_prob: Probability of a random rotation.
        rotation_degrees: Rotations are drawn from ``[-rotation_degrees, +rotation_degrees]``.
    """

    min_scale: float = 0.2
    cj_prob: float = 0.8
    cj_strength: float = 0.5
    gray_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigmas: tuple[float, float] = (0.1, 2.0)
    hflip_prob: float = 0.5
    vflip_prob: float = 0.0
    rotation_prob: float = 0.25
    rotation_degrees: float = 15.0

    def __post_init__(self) -> None:
        for name in ("min_scale", "cj_prob", "gray_prob", "blur_prob", "hflip_prob", "vflip_prob", "rotation_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"AugmentConfig.{name}={value} is outside [0, 1]; use a probability/fraction.")
        if self.min_scale <= 0.0:
            raise ConfigError("AugmentConfig.min_scale must be > 0; use e.g. 0.2.")
        if self.cj_strength < 0 or self.rotation_degrees < 0:
            raise ConfigError("AugmentConfig.cj_strength and rotation_degrees must be >= 0.")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        d = asdict(self)
        d["blur_sigmas"] = list(self.blur_sigmas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AugmentConfig":
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        if "blur_sigmas" in d:
            d["blur_sigmas"] = tuple(d["blur_sigmas"])
        return cls(**d)


class _ToRGB:
    """Converts a PIL image of any mode (e.g. grayscale) to 3-channel RGB (picklable for workers)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == "RGB" else img.convert("RGB")


def moco_v2_transform(encoder_cfg: EncoderConfig, cfg: AugmentConfig = AugmentConfig()) -> MoCoV2Transform:
    """The MoCo v2 two-view transform.

    Random resized crop to ``encoder_cfg.input_size``, colour jitter, random grayscale, Gaussian blur,
    horizontal/vertical flips, rotation, then normalisation with the encoder's mean/std.

    Args:
        encoder_cfg: Gives the view size and the normalisation.
        cfg: Augmentation strengths.

    Returns:
        A callable mapping an RGB PIL image to a list of two tensors, each ``(3, S, S)`` float32.
    """
    return MoCoV2Transform(
        input_size=encoder_cfg.input_size,
        cj_prob=cfg.cj_prob,
        cj_strength=cfg.cj_strength,
        min_scale=cfg.min_scale,
        random_gray_scale=cfg.gray_prob,
        gaussian_blur=cfg.blur_prob,
        sigmas=cfg.blur_sigmas,
        vf_prob=cfg.vflip_prob,
        hf_prob=cfg.hflip_prob,
        rr_prob=cfg.rotation_prob,
        rr_degrees=cfg.rotation_degrees,
        normalize={"mean": list(encoder_cfg.mean), "std": list(encoder_cfg.std)},
    )


def eval_transform(encoder_cfg: EncoderConfig) -> T.Compose:
    """The deterministic transform used to embed images.

    Grayscale → 3 channels, resize the shorter side to ``input_size``, centre crop, to tensor, normalise.

    Args:
        encoder_cfg: Gives the size and the normalisation.

    Returns:
        A callable mapping a PIL image to a ``(3, S, S)`` float32 tensor.
    """
    size = encoder_cfg.input_size
    return T.Compose(
        [
            _ToRGB(),
            T.Resize(size, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(mean=list(encoder_cfg.mean), std=list(encoder_cfg.std)),
        ]
    )
