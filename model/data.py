"""Images as training data: folders of images (labelled by their folder path) and a torch ``Dataset`` that
survives unreadable images.

Unreadable images inside a :class:`ImageListDataset` never end a run. The dataset returns a :class:`Skipped`
marker instead of a sample, and :func:`collate_skipping` drops the markers from the batch and reports them next
to the batch (``(index, reason)`` pairs), so the consumer can count them and line results up with the input,
also when the data loader runs in worker processes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from model.errors import DataError
from model.images import ImageSource, to_rgb_image

__all__ = ["IMAGE_SUFFIXES", "ImageListDataset", "Skipped", "collate_skipping", "scan_images", "scan_labelled_folder"]

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
"""File suffixes (lower case) that :func:`scan_images` and :func:`scan_labelled_folder` treat as images."""


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def scan_images(root: Path) -> list[Path]:
    """All image files under a folder, recursively, sorted; hidden files and folders are ignored.

    Args:
        root: The folder to scan.

    Returns:
        Paths of files whose suffix is in :data:`IMAGE_SUFFIXES`.

    Raises:
        DataError: ``root`` is not a folder, or it holds no image.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} does not exist or is not a folder; check the path.")
    files = sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and _visible(p, root)
    )
    if not files:
        raise DataError(
            f"image folder {str(root)!r} holds no image ({', '.join(sorted(IMAGE_SUFFIXES))}); "
            "add images or point to the right folder."
        )
    return files


def scan_labelled_folder(root: Path) -> list[tuple[Path, tuple[str, ...]]]:
    """Images of a folder tree whose folder names are taxonomy paths.

    ``root/wild/Bear/img.png`` is labelled ``("wild", "Bear")``; an image directly in ``root/wild/``
    (a folder that may also have sub-folders) is labelled with the prefix path ``("wild",)``.

    Args:
        root: The top folder; its own name is not part of any path.

    Returns:
        ``(file, path)`` pairs sorted by file.

    Raises:
        DataError: The folder is missing or empty, or images lie directly in ``root`` (they have no
            label: move them into a class folder).
    """
    root = Path(root)
    files = scan_images(root)
    out: list[tuple[Path, tuple[str, ...]]] = []
    unlabelled = [f for f in files if f.parent == root]
    if unlabelled:
        raise DataError(
            f"{len(unlabelled)} image(s) lie directly in {str(root)!r} (e.g. {unlabelled[0].name!r}) and so "
            "have no label; move them into a folder named after their class."
        )
    for f in files:
        out.append((f, tuple(f.parent.relative_to(root).parts)))
    return out


@dataclass(frozen=True)
class Skipped:
    """Marker a dataset returns instead of a sample for an image it could not read.

    Attributes:
        index: Position of the image in the dataset.
        reason: The :class:`DataError` message.
    """

    index: int
    reason: str


class ImageListDataset(Dataset[tuple[Any, int] | Skipped]):
    """A dataset over a list of image sources that applies a transform to each RGB image.

    ``dataset[i]`` returns ``(transform(image), i)``, or a :class:`Skipped` marker when image ``i``
    cannot be read. Use :func:`collate_skipping` as the data loader's ``collate_fn``.

    Args:
        images: Paths, encoded bytes, PIL images or uint8 arrays (see :data:`ImageSource`).
        transform: Maps an RGB PIL image to a tensor (or a list of tensors, e.g. two MoCo views).
        max_pixels: See :func:`load_image`.
    """

    def __init__(
        self,
        images: Sequence[ImageSource],
        transform: Callable[[Image.Image], Any],
        max_pixels: int = 50_000_000,
    ) -> None:
        self.images = images
        self.transform = transform
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int] | Skipped:
        try:
            img = to_rgb_image(self.images[index], max_pixels=self.max_pixels)
        except DataError as exc:
            return Skipped(index, str(exc))
        return self.transform(img), index


def collate_skipping(
    items: list[tuple[Any, int] | Skipped],
) -> tuple[Any, torch.Tensor, list[tuple[int, str]]]:
    """Collates dataset items, dropping :class:`Skipped` markers.

    Args:
        items: What :class:`ImageListDataset` returned for one batch.

    Returns:
        ``(samples, indices, skipped)``: the default-collated samples of the readable images (``None`` when
        all were skipped), their dataset indices ``(B,)`` int64, and ``(index, reason)`` for each skipped one.
    """
    good = [it for it in items if not isinstance(it, Skipped)]
    skipped = [(it.index, it.reason) for it in items if isinstance(it, Skipped)]
    if not good:
        return None, torch.empty(0, dtype=torch.long), skipped
    samples = default_collate([s for s, _ in good])
    indices = torch.tensor([i for _, i in good], dtype=torch.long)  # (B,)
    return samples, indices, skipped
