"""Animal-MNIST: 10,000 real 28×28 grayscale animal silhouettes with a two-level taxonomy.

The images come from the ``animal-mnist`` package (MIT licence), installed with
``pip install --no-deps animal-mnist==0.4``. Its own loader imports tensorflow, so this module reads the two
gzip'ed pickles from the package directory directly and never imports the package.

The package gives ten classes, 1,000 images each, labels ``0..9`` in the order of :data:`ANIMAL_CLASSES`
(checked by eye on a grid of samples per label). The product needs a hierarchy, so this module defines a
natural second level on top of them (:data:`ANIMAL_TAXONOMY_TREE`):

    wild          Bear, Elephant, Giraffe, Zebra
    farm          Cow, Horse, Sheep
    pet-and-bird  Bird, Cat, Dog

284 images appear twice (byte-identical, same label); :func:`content_groups` gives one id per distinct image, and
:func:`duplicate_ids` one id per duplicate group (byte-identical, and near-duplicates when vectors are given:
``model.neighbors``), so that :func:`test_split` keeps every copy of an image on one side.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import pickle
from pathlib import Path as FsPath

import numpy as np
from PIL import Image

from model.errors import DataError
from model.neighbors import NEAR_DUPLICATE_THRESHOLD
from model.neighbors.duplicates import auto_threshold, duplicate_groups, near_pairs
from model.neighbors.index import NeighborIndex
from model.taxonomy import Path, Taxonomy

ANIMAL_CLASSES: tuple[str, ...] = (
    "Bear",
    "Bird",
    "Cat",
    "Cow",
    "Dog",
    "Elephant",
    "Giraffe",
    "Horse",
    "Sheep",
    "Zebra",
)
"""Class names in the package's label order (label ``i`` is ``ANIMAL_CLASSES[i]``)."""

ANIMAL_TAXONOMY_TREE: dict[str, list[str]] = {
    "wild": ["Bear", "Elephant", "Giraffe", "Zebra"],
    "farm": ["Cow", "Horse", "Sheep"],
    "pet-and-bird": ["Bird", "Cat", "Dog"],
}
"""Level 1 groups the animals by where one meets them; level 2 is the package's class."""

ANIMAL_TAXONOMY: Taxonomy = Taxonomy.from_nested(ANIMAL_TAXONOMY_TREE)
"""The two-level taxonomy of animal-mnist: 3 groups at level 0, 10 animals at level 1."""

_PACKAGE = "animal_mnist"
_INSTALL = "pip install --no-deps animal-mnist==0.4"
_DATA_FILE = "animal_data_version_3.gz"
_LABEL_FILE = "animal_label_version_3.gz"
_NUM_IMAGES = 10_000


def _group_of(animal: str) -> str:
    for group, animals in ANIMAL_TAXONOMY_TREE.items():
        if animal in animals:
            return group
    raise AssertionError(f"{animal} is in no group of ANIMAL_TAXONOMY_TREE")


def animal_path(label: int) -> Path:
    """The taxonomy path ``(group, animal)`` of package label ``label`` (0..9)."""
    if not 0 <= int(label) < len(ANIMAL_CLASSES):
        raise DataError(f"Animal-MNIST label {label} is outside 0..9; the data files are not the expected ones.")
    animal = ANIMAL_CLASSES[int(label)]
    return (_group_of(animal), animal)


def data_dir() -> FsPath:
    """The directory holding the animal-mnist data files, found without importing the package.

    Raises:
        DataError: the package is not installed, or its data files are missing.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"The animal-mnist dataset is not installed. Install it with `{_INSTALL}` (no tensorflow needed).")
    root = FsPath(next(iter(spec.submodule_search_locations))) / "data" / "Animal_MNIST"
    missing = [name for name in (_DATA_FILE, _LABEL_FILE) if not (root / name).is_file()]
    if missing:
        raise DataError(f"animal-mnist is installed but {missing} is missing under {root}. Reinstall it with `{_INSTALL}`.")
    return root


def load_animal_mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The raw images and package labels.

    Returns:
        images: uint8 ``(N, 28, 28)``, white silhouettes on black, N = 10,000.
        labels: int64 ``(N,)`` in ``0..9`` (index into :data:`ANIMAL_CLASSES`).

    Raises:
        DataError: the package is missing or its files do not hold the expected arrays.
    """
    root = data_dir()
    # The files are pickles shipped inside the installed package (trusted like its code).
    with gzip.open(root / _DATA_FILE, "rb") as f:
        images = np.asarray(pickle.load(f))
    with gzip.open(root / _LABEL_FILE, "rb") as f:
        labels = np.asarray(pickle.load(f)).astype(np.int64)
    if images.shape != (_NUM_IMAGES, 28, 28) or images.dtype != np.uint8 or labels.shape != (_NUM_IMAGES,):
        raise DataError(
            f"animal-mnist files under {root} hold images {images.shape} {images.dtype} and labels {labels.shape}, "
            f"expected uint8 ({_NUM_IMAGES}, 28, 28) and ({_NUM_IMAGES},). Reinstall with `{_INSTALL}`."
        )
    if labels.min() < 0 or labels.max() >= len(ANIMAL_CLASSES):
        raise DataError(f"animal-mnist labels span {labels.min()}..{labels.max()}, expected 0..9. Reinstall with `{_INSTALL}`.")
    return images, labels


def load_animal_mnist() -> tuple[np.ndarray, list[Path]]:
    """Animal-MNIST images with their taxonomy paths.

    Returns:
        images: uint8 ``(N, 28, 28)``, N = 10,000.
        paths: N paths ``(group, animal)``, valid in :data:`ANIMAL_TAXONOMY`.

    Raises:
        DataError: the package is missing (the message gives the pip command) or its files are damaged.
    """
    images, labels = load_animal_mnist_arrays()
    return images, [animal_path(int(y)) for y in labels]


def content_groups(images: np.ndarray) -> np.ndarray:
    """One id per distinct image content, so that exact duplicates can be kept on one side of a split.

    Args:
        images: ``(N, ...)`` array of images.

    Returns:
        int64 ``(N,)``: equal ids for byte-identical images, ids numbered by first appearance.
    """
    ids: dict[str, int] = {}
    out = np.empty(len(images), dtype=np.int64)
    for i, image in enumerate(images):
        key = hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()
        out[i] = ids.setdefault(key, len(ids))
    return out


def duplicate_ids(images: np.ndarray, vectors: np.ndarray | None = None,
                  threshold: float = NEAR_DUPLICATE_THRESHOLD) -> np.ndarray:
    """One id per duplicate group, for splits that keep every copy of an image on one side.

    Args:
        images: ``(N, ...)`` array of images; byte-identical ones share an id.
        vectors: ``(N, D)`` embeddings (or pixels) of the images; with them, near-duplicates (cosine similarity at
            least ``threshold``, grouped like the product does: ``model.neighbors.duplicates``) share an id too.
        threshold: the near-duplicate threshold for ``vectors``; 0 (the product's default) calibrates it on them
            (``model.neighbors.duplicates.auto_threshold``).

    Returns:
        int64 ``(N,)``, ids numbered by first appearance.
    """
    exact = content_groups(images)  # (N,)
    keys = [str(int(g)) for g in exact]
    pairs: list[tuple[str, str, float]] = []
    if vectors is not None:
        index = NeighborIndex.build(keys, np.asarray(vectors))
        pairs = near_pairs(index, threshold or auto_threshold(index).value)
    out = exact.copy()
    for group in duplicate_groups(list(range(len(keys))), keys, pairs):
        out[list(group.items)] = exact[group.items[0]]
    _, first = np.unique(out, return_index=True)
    renumber = {int(out[i]): n for n, i in enumerate(sorted(first))}
    return np.array([renumber[int(g)] for g in out], dtype=np.int64)


def test_split(labels: np.ndarray, groups: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A stratified test split that keeps each duplicate group on one side.

    Args:
        labels: leaf class per image ``(N,)``.
        groups: duplicate group per image ``(N,)`` (:func:`duplicate_ids` or :func:`content_groups`).
        size: number of test images (about ``size / K`` per class).
        seed: split seed.

    Returns:
        ``(test, rest)``: sorted int64 indices.
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = size // len(classes)
    test: list[int] = []
    for c in classes:
        members = np.flatnonzero(labels == c)
        taken: set[int] = set()
        for g in rng.permutation(np.unique(groups[members])):
            if len(taken) >= per_class:
                break
            taken.update(np.flatnonzero(groups == g).tolist())
        test.extend(sorted(taken))
    test_arr = np.array(sorted(test), dtype=np.int64)
    rest = np.setdiff1d(np.arange(len(labels)), test_arr)
    assert not set(groups[test_arr]) & set(groups[rest]), "a duplicate straddles the test split"
    return test_arr, rest


def animal_label_config() -> str:
    """A Label Studio label config for animal-mnist: an image and a two-level ``<Taxonomy>`` over
    :data:`ANIMAL_TAXONOMY_TREE` (one leaf path per task)."""
    groups = "".join(
        f'<Choice value="{group}">' + "".join(f'<Choice value="{a}"/>' for a in animals) + "</Choice>"
        for group, animals in ANIMAL_TAXONOMY_TREE.items()
    )
    return (f'<View><Image name="image" value="$image"/><Taxonomy name="taxonomy" toName="image" leafsOnly="true" '
            f'maxUsages="1">{groups}</Taxonomy></View>')


def taxonomy_result(path: tuple[str, ...]) -> list[dict]:
    """A Label Studio annotation result choosing ``path`` in :func:`animal_label_config`'s taxonomy."""
    return [{"from_name": "taxonomy", "to_name": "image", "type": "taxonomy", "value": {"taxonomy": [list(path)]}}]


def png_bytes(pixels: np.ndarray) -> bytes:
    """A uint8 image array ``(H, W)`` or ``(H, W, 3)`` as PNG file bytes."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()
