"""The one mapping from :class:`~ml_backend.settings.Settings` to the model's config dataclasses.

The server, the training job, RQ workers and the CLI all build their encoder / pretraining configs here, so a
setting means the same thing everywhere. Settings left on "auto" (``ENCODER_INPUT_SIZE=0``,
``PRETRAIN_AUGMENT=auto``) are decided by :func:`model.ssl.recipe.choose_recipe` from a summary of the images.
"""

from __future__ import annotations

import logging

from ml_backend.settings import Settings
from model.encoder.backbone import init_weights_arch
from model.encoder.config import Arch, EncoderConfig
from model.encoder.device import lightning_device, resolve_device
from model.ssl.config import PretrainConfig
from model.ssl.recipe import ImageSummary, RecipeKind, choose_recipe

__all__ = ["encoder_config", "pretrain_config"]

log = logging.getLogger(__name__)


def _on_gpu(settings: Settings) -> bool:
    return resolve_device(settings.device).type == "cuda"


def encoder_config(settings: Settings, summary: ImageSummary) -> EncoderConfig:
    """The encoder the settings ask for (``ENCODER_ARCH``, ``ENCODER_INPUT_SIZE``, ``ENCODER_INIT_WEIGHTS``) on
    images like ``summary`` (an input size of 0 is chosen from them, :mod:`model.ssl.recipe`).

    With ``ENCODER_INIT_WEIGHTS`` the file decides the architecture (a torchvision ResNet-18 ImageNet checkpoint
    is ``resnet18``); ``ENCODER_ARCH`` applies only without one.

    Raises:
        ConfigError: the weights file is missing or is not a ResNet-18 (naming the file and what was expected).
    """
    size, _, _ = choose_recipe(summary, _on_gpu(settings), settings.input_size, RecipeKind(settings.pretrain_augment))
    if not settings.init_weights:
        return EncoderConfig(arch=Arch(settings.arch), input_size=size)
    arch = init_weights_arch(settings.init_weights)
    if arch.value != settings.arch:
        log.info("ENCODER_INIT_WEIGHTS %s holds a %s: the encoder is a %s (ENCODER_ARCH=%s applies without a file).",
                 settings.init_weights, arch.value, arch.value, settings.arch)
    return EncoderConfig(arch=arch, input_size=size, init_weights=str(settings.init_weights))


def pretrain_config(settings: Settings, n_images: int, summary: ImageSummary) -> PretrainConfig:
    """The pretraining run the settings ask for on ``n_images`` images like ``summary`` (batch clipped to the
    data; the run itself is fitted to the budget by :mod:`model.ssl.plan`)."""
    accelerator, devices = lightning_device(settings.device)
    if settings.pretrain_devices != "1":  # several GPUs for one pretraining (DDP through Lightning)
        devices = -1 if settings.pretrain_devices == "all" else int(settings.pretrain_devices)
    _, augment, _ = choose_recipe(summary, _on_gpu(settings), settings.input_size,
                                  RecipeKind(settings.pretrain_augment))
    batch = max(2, min(settings.pretrain_batch_size, n_images))
    return PretrainConfig(epochs=settings.pretrain_epochs, batch_size=batch,
                          max_minutes=settings.pretrain_max_minutes or None, lr=settings.pretrain_lr,
                          temperature=settings.pretrain_temperature,
                          memory_bank_size=max(batch, settings.pretrain_memory_bank), accelerator=accelerator,
                          devices=devices, strategy=settings.pretrain_strategy, augment=augment,
                          seed=settings.pretrain_seed)
