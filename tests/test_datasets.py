"""The animal-mnist loader and its two-level taxonomy."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from bench import datasets
from bench.datasets import ANIMAL_CLASSES, ANIMAL_TAXONOMY, content_groups, load_animal_mnist
from model.errors import DataError


@pytest.fixture(scope="module")
def animal() -> tuple[np.ndarray, list[tuple[str, str]]]:
    return load_animal_mnist()


def test_images_and_counts(animal: tuple[np.ndarray, list[tuple[str, str]]]) -> None:
    images, paths = animal
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert len(paths) == 10_000
    assert Counter(p[1] for p in paths) == {name: 1000 for name in ANIMAL_CLASSES}
    assert Counter(p[0] for p in paths) == {"wild": 4000, "farm": 3000, "pet-and-bird": 3000}
    # Silhouettes: mostly black background, some white foreground in every image.
    assert (images.reshape(len(images), -1).max(axis=1) > 128).all()
    assert 40 < images.mean() < 100


def test_paths_are_valid_in_the_taxonomy(animal: tuple[np.ndarray, list[tuple[str, str]]]) -> None:
    _, paths = animal
    targets = ANIMAL_TAXONOMY.encode_many(sorted(set(paths)))
    assert targets.shape == (10, 2) and (targets >= 0).all()
    assert ANIMAL_TAXONOMY.num_classes(0) == 3 and ANIMAL_TAXONOMY.num_classes(1) == 10
    assert {leaf.name for leaf in ANIMAL_TAXONOMY.leaves()} == set(ANIMAL_CLASSES)
    assert ANIMAL_TAXONOMY.resolve(("farm", "Horse")) == ("farm", "Horse")
    assert datasets.animal_path(9) == ("wild", "Zebra")
    with pytest.raises(DataError):
        datasets.animal_path(10)


def test_label_order_matches_the_images(animal: tuple[np.ndarray, list[tuple[str, str]]]) -> None:
    """Zebras are the only striped class: many mid-grey pixels inside the silhouette; birds are the smallest."""
    images, paths = animal
    names = np.array([p[1] for p in paths])
    grey = ((images > 40) & (images < 215)).mean(axis=(1, 2))
    per_class_grey = {n: grey[names == n].mean() for n in ANIMAL_CLASSES}
    assert max(per_class_grey, key=per_class_grey.get) == "Zebra"
    area = (images > 128).mean(axis=(1, 2))
    per_class_area = {n: area[names == n].mean() for n in ANIMAL_CLASSES}
    assert min(per_class_area, key=per_class_area.get) in {"Bird", "Giraffe"}


def test_content_groups_tie_duplicates() -> None:
    x = np.zeros((4, 3, 3), dtype=np.uint8)
    x[1, 0, 0] = 1
    x[3, 0, 0] = 1
    assert content_groups(x).tolist() == [0, 1, 0, 1]


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install --no-deps animal-mnist"):
        load_animal_mnist()


def test_export_writes_a_labelled_folder_tree(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, str(root / "bench" / "export_animal_mnist.py"), str(tmp_path), "--labelled-fraction", "0.01",
         "--limit", "300"],
        check=True,
        capture_output=True,
    )
    labelled = sorted((tmp_path / "labelled").rglob("*.png"))
    unlabelled = sorted((tmp_path / "unlabelled").glob("*.png"))
    assert len(labelled) + len(unlabelled) == 300
    assert 1 <= len(labelled) <= 30
    for f in labelled:
        rel = f.relative_to(tmp_path / "labelled").parts
        assert len(rel) == 3
        ANIMAL_TAXONOMY.resolve(rel[:2])
