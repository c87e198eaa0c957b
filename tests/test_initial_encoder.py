"""The encoder a project starts from without pretraining is a function of its images and PRETRAIN_SEED."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ml_backend.settings import Settings
from ml_backend.training.encoder import initial_encoder
from ml_backend.training.images import ProjectImages


def _images(tmp_path: Path, n: int = 12) -> ProjectImages:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return ProjectImages(list(range(n)), [f"h{i}" for i in range(n)], paths, {})


def test_the_same_images_and_seed_give_the_same_initial_encoder(tmp_path: Path) -> None:
    images = _images(tmp_path)
    settings = Settings(model_dir=tmp_path / "data", device="cpu")
    first, again = initial_encoder(settings, images), initial_encoder(settings, images)
    assert first.version == again.version
    other = initial_encoder(Settings(model_dir=tmp_path / "data", device="cpu", pretrain_seed=settings.pretrain_seed + 1),
                            images)
    assert other.version != first.version  # the seed draws the weights
