"""Settings of a MoCo v2 pretraining run: hyper-parameters, hardware and augmentation strengths (plain dataclasses,
importable without Lightning)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from model.errors import ConfigError

__all__ = ["AugmentConfig", "PretrainConfig"]


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
    def from_dict(cls, d: dict[str, Any]) -> AugmentConfig:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        if "blur_sigmas" in d:
            d["blur_sigmas"] = tuple(d["blur_sigmas"])
        return cls(**d)


@dataclass(frozen=True)
class PretrainConfig:
    """Hyper-parameters and hardware settings of a pretraining run.

    Attributes:
        epochs: Epoch cap. The run's length is fitted to ``max_minutes`` and the number of images
            (:mod:`model.ssl.plan`); the learning-rate and momentum schedules span the fitted run.
        batch_size: Images per step (per device).
        lr: Initial SGD learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        memory_bank_size: Negatives kept in the MoCo memory bank (at most; fitted to the number of images).
        temperature: InfoNCE temperature.
        proj_hidden_dim: Projection head hidden width.
        proj_out_dim: Projection head output width.
        ema_start: Key-encoder momentum at the first step (cosine schedule to ``ema_end``).
        ema_end: Key-encoder momentum at the last planned step.
        max_minutes: Time budget of a run (the plan fits its steps into it; Lightning's ``max_time`` stops a run
            that overruns); None = only the epoch cap.
        num_workers: Data loader processes decoding and augmenting images.
        seed: Seed for weights, augmentations and shuffling.
        accelerator: Lightning accelerator: ``"auto"``, ``"cpu"``, ``"gpu"``.
        devices: Lightning devices: ``"auto"``, a count, or a list of ids.
        strategy: Lightning strategy: ``"auto"``, ``"ddp"`` … (DDP gathers keys and syncs BatchNorm).
        precision: Lightning precision; None = ``"bf16-mixed"`` where supported, else ``"32-true"``.
        channels_last: Channels-last memory format for convolutions.
        augment: MoCo v2 augmentation strengths.
        bn_recalibration_images: Images used to recompute BatchNorm statistics after training (0 = off).
    """

    epochs: int = 300
    batch_size: int = 128
    lr: float = 6e-2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    memory_bank_size: int = 4096
    temperature: float = 0.2
    proj_hidden_dim: int = 512
    proj_out_dim: int = 128
    ema_start: float = 0.99
    ema_end: float = 1.0
    max_minutes: float | None = 20.0
    num_workers: int = 0
    seed: int = 0
    accelerator: str = "auto"
    devices: int | str | tuple[int, ...] = "auto"
    strategy: str = "auto"
    precision: str | None = None
    channels_last: bool = True
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    bn_recalibration_images: int = 2048

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2:
            raise ConfigError(f"epochs={self.epochs} must be >= 1 and batch_size={self.batch_size} >= 2.")
        if self.memory_bank_size < self.batch_size:
            raise ConfigError(
                f"memory_bank_size={self.memory_bank_size} is smaller than batch_size={self.batch_size}; "
                "use a bank of at least one batch (MoCo uses many batches)."
            )
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError(f"max_minutes={self.max_minutes} must be positive or None.")
        if self.temperature <= 0 or self.lr <= 0:
            raise ConfigError("temperature and lr must be positive.")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        d = asdict(self)
        d["augment"] = self.augment.to_dict()
        if isinstance(self.devices, tuple):
            d["devices"] = list(self.devices)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PretrainConfig:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        if "augment" in d:
            d["augment"] = AugmentConfig.from_dict(d["augment"])
        if isinstance(d.get("devices"), list):
            d["devices"] = tuple(d["devices"])
        return cls(**d)
