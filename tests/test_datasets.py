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


# ----- the benchmark protocol built on the dataset (bench/ssl_vs_baseline.py) -----------------------------


@pytest.fixture(scope="module")
def protocol():
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "bench"))
    try:
        import ssl_vs_baseline
    finally:
        sys.path.remove(str(root / "bench"))
    return ssl_vs_baseline


def test_test_split_is_stratified_and_keeps_duplicates_together(protocol, animal) -> None:
    images, paths = animal
    leaf = np.array([ANIMAL_TAXONOMY.node(p).index for p in paths])
    groups = content_groups(images)
    test, rest = protocol.test_split(leaf, groups, 2000, seed=0)
    assert len(set(test) | set(rest)) == 10_000 and not set(test) & set(rest)
    assert np.bincount(leaf[test]).min() >= 200 and len(test) <= 2010
    assert not set(groups[test]) & set(groups[rest])
    again, _ = protocol.test_split(leaf, groups, 2000, seed=0)
    assert np.array_equal(test, again)


def test_labelled_subsets_are_nested_stratified_and_outside_the_test_split(protocol, animal) -> None:
    images, paths = animal
    leaf = np.array([ANIMAL_TAXONOMY.node(p).index for p in paths])
    test, rest = protocol.test_split(leaf, content_groups(images), 2000, seed=0)
    subsets = protocol.labelled_subsets(leaf, rest, [0.01, 0.05], 10_000, seed=3)
    assert len(subsets[0.01]) == 100 and len(subsets[0.05]) == 500
    assert set(subsets[0.01]) <= set(subsets[0.05]) and not set(subsets[0.05]) & set(test)
    assert np.bincount(leaf[subsets[0.01]], minlength=10).tolist() == [10] * 10
    other = protocol.labelled_subsets(leaf, rest, [0.01], 10_000, seed=4)
    assert not np.array_equal(other[0.01], subsets[0.01])


def test_metrics_and_consistent_paths(protocol) -> None:
    true = np.array([[0, 0], [0, 1], [1, 2], [2, 3]])
    assert protocol.path_metrics(true, true) == {"f1_l0": 1.0, "acc_l0": 1.0, "f1_l1": 1.0, "acc_l1": 1.0, "hF": 1.0}
    wrong_leaf = true.copy()
    wrong_leaf[0, 1] = 1
    m = protocol.path_metrics(true, wrong_leaf)
    assert m["acc_l0"] == 1.0 and m["acc_l1"] == 0.75 and m["hF"] == pytest.approx(7 / 8)
    # A confident level-2 head outvotes a weak level-1 head: the best path keeps the child under its parent.
    l0 = np.log(np.array([[0.4, 0.35, 0.25]]))
    l1 = np.full((1, 10), -5.0)
    l1[0, ANIMAL_TAXONOMY.node(("farm", "Cow")).index] = 5.0
    best = protocol.best_paths([l0, l1], ANIMAL_TAXONOMY)
    assert best.tolist() == [ANIMAL_TAXONOMY.encode(("farm", "Cow")).tolist()]


def test_duplicate_ids_merge_exact_and_near_duplicates() -> None:
    from bench.datasets import duplicate_ids

    x = np.array([[1, 2], [3, 4], [1, 2], [5, 6], [7, 8]], dtype=np.uint8)
    assert duplicate_ids(x).tolist() == content_groups(x).tolist() == [0, 1, 0, 2, 3]
    vectors = np.array([[1, 0], [0, 1], [1, 0], [0.02, 1], [1, 1]], dtype=np.float32)  # 3 is a near copy of 1
    assert duplicate_ids(x, vectors, threshold=0.99).tolist() == [0, 1, 0, 1, 2]
    assert duplicate_ids(x, vectors, threshold=1.0).tolist() == [0, 1, 0, 2, 3]


def test_duplicate_ids_of_animal_mnist_keep_the_split_of_content_groups(protocol, animal) -> None:
    from bench.datasets import duplicate_ids

    images, paths = animal
    assert np.array_equal(duplicate_ids(images), content_groups(images))  # exact only: the committed split stays
    leaf = np.array([ANIMAL_TAXONOMY.node(p).index for p in paths])
    a, _ = protocol.test_split(leaf, duplicate_ids(images), 2000, seed=0)
    b, _ = protocol.test_split(leaf, content_groups(images), 2000, seed=0)
    assert np.array_equal(a, b)
