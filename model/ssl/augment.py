"""The two MoCo v2 views of an image used for pretraining (lightly's ``MoCoV2Transform``).

Both work on RGB PIL images (see :mod:`model.images`) and normalise with the encoder's mean/std.
"""

from __future__ import annotations

from lightly.transforms import MoCoV2Transform

from model.encoder.config import EncoderConfig
from model.ssl.config import AugmentConfig

__all__ = ["moco_v2_transform"]


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


