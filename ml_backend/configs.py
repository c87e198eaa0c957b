"""The one mapping from :class:`~ml_backend.settings.Settings` to the model's config dataclasses.

The server, the training job, RQ workers and the CLI all build their encoder / pretraining configs here, so a
setting means the same thing everywhere. Settings left on "auto" (``ENCODER_INPUT_SIZE=0``,
``PRETRAIN_AUGMENT=auto``) are decided by :func:`model.ssl.recipe.choose_recipe` from a summary of the images.
"""

from __future__ import annotations

from ml_backend.settings import Settings
from model.encoder.config import EncoderConfig
from model.encoder.device import lightning_device, resolve_device
from model.ssl.config import PretrainConfig
from model.ssl.recipe import ImageSummary, RecipeKind, choose_recipe

__all__ = ["encoder_config", "pretrain_config"]


def _on_gpu(settings: Settings) -> bool:
    return resolve_device(settings.device).type == "cuda"


def encoder_config(settings: Settings, summary: ImageSummary) -> EncoderConfig:
    """The encoder the settings ask for (``ENCODER_ARCH``, ``ENCODER_INPUT_SIZE``, ``ENCODER_INIT_WEIGHTS``) on
    images like ``summary``."""
    size, _, _ = choose_recipe(summary, _on_gpu(settings), settings.input_size, RecipeKind(settings.pretrain_augment))
    init = str(settings.init_weights) if settings.init_weights else None
    return EncoderConfig(arch=settings.arch, input_size=size, init_weights=init)


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
                          devices=devices, strategy=settings.pretrain_strategy, augment=augment)
