"""What defines an encoder besides its weights: architecture, input size, normalisation, optional start weights,
and the deterministic transform that turns any RGB image into the encoder's ``(3, S, S)`` input."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

import torchvision.transforms as T
from PIL import Image

from model.errors import ConfigError

__all__ = ["Arch", "EncoderConfig", "IMAGENET_MEAN", "IMAGENET_STD", "eval_transform"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


class Arch(str, Enum):
    """Backbone architectures."""

    RESNET18 = "resnet18"
    """torchvision ResNet-18, widths 64/128/256/512, D = 512."""
    RESNET18_HALF = "resnet18-half"
    """ResNet-18 at half width (32/64/128/256), same stem, D = 256; ~4x fewer FLOPs."""


_WIDTHS = {Arch.RESNET18: (64, 128, 256, 512), Arch.RESNET18_HALF: (32, 64, 128, 256)}


@dataclass(frozen=True)
class EncoderConfig:
    """What defines an encoder besides its weights.

    Attributes:
        arch: Backbone architecture.
        input_size: Side in pixels of the square images the encoder sees.
        init_weights: Optional local ``.safetensors`` or ``.pth`` file with backbone weights to start from
            (loaded with ``weights_only=True``; a classifier ``fc.*`` is dropped). Never downloaded.
        mean: Per-channel normalisation mean (RGB).
        std: Per-channel normalisation std (RGB).
    """

    arch: Arch = Arch.RESNET18_HALF
    input_size: int = 64
    init_weights: str | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "arch", Arch(self.arch))
        except ValueError:
            choices = ", ".join(a.value for a in Arch)
            raise ConfigError(f"unknown encoder arch {self.arch!r}; choose one of: {choices}.") from None
        if not 16 <= int(self.input_size) <= 1024:
            raise ConfigError(f"input_size={self.input_size} is outside 16..1024 pixels; use e.g. 64 or 96.")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError("mean and std must have 3 entries (RGB) and std must be positive.")
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))

    @property
    def out_dim(self) -> int:
        """Embedding dimension D of this architecture."""
        return _WIDTHS[self.arch][-1]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        d = asdict(self)
        d["arch"] = self.arch.value
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`."""
        unknown = set(d) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ConfigError(f"unknown EncoderConfig keys {sorted(unknown)}; remove them.")
        d = dict(d)
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


class _ToRGB:
    """Converts a PIL image of any mode (e.g. grayscale) to 3-channel RGB (picklable for workers)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == "RGB" else img.convert("RGB")


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
