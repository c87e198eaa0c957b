"""Write animal-mnist as image folders for the command-line demo.

Usage:
    python bench/export_animal_mnist.py OUT_DIR [--labelled-fraction 0.05] [--seed 0] [--limit N]

Writes ``OUT_DIR/labelled/<group>/<animal>/animal-NNNNN.png`` for a stratified, seeded fraction of the images
(at least one per animal) and ``OUT_DIR/unlabelled/animal-NNNNN.png`` for the rest. ``NNNNN`` is the index in
the package's arrays, so a file can be traced back to its true label.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT_DIR = Path(__file__).resolve().parents[1]
if str(ROOT_DIR) not in sys.path:  # run as `python bench/<script>.py` from anywhere
    sys.path.insert(0, str(ROOT_DIR))

import numpy as np
from PIL import Image
from tqdm import tqdm

from bench.datasets import load_animal_mnist


def labelled_indices(paths: list[tuple[str, str]], fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A stratified sample: ``round(fraction * n)`` images of each animal, at least one.

    Args:
        paths: one ``(group, animal)`` per image.
        fraction: share of each animal to label, in (0, 1].
        rng: seeded generator.

    Returns:
        Sorted int64 indices into ``paths``.
    """
    animals = np.array([p[1] for p in paths])
    chosen: list[np.ndarray] = []
    for animal in sorted(set(animals)):
        members = np.flatnonzero(animals == animal)
        k = max(1, int(round(fraction * len(members))))
        chosen.append(rng.choice(members, size=min(k, len(members)), replace=False))
    return np.sort(np.concatenate(chosen))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder to create (may exist; files are overwritten)")
    parser.add_argument("--labelled-fraction", type=float, default=0.05, help="share of images given a label (0..1]")
    parser.add_argument("--seed", type=int, default=0, help="seed of the labelled sample and of --limit")
    parser.add_argument("--limit", type=int, default=None, help="export only this many random images (for tests)")
    args = parser.parse_args(argv)
    if not 0.0 < args.labelled_fraction <= 1.0:
        parser.error(f"--labelled-fraction must be in (0, 1], got {args.labelled_fraction}")

    images, paths = load_animal_mnist()
    rng = np.random.default_rng(args.seed)
    index = np.arange(len(images))
    if args.limit is not None:
        index = np.sort(rng.choice(index, size=min(args.limit, len(index)), replace=False))
    subset_paths = [paths[i] for i in index]
    is_labelled = np.zeros(len(index), dtype=bool)
    is_labelled[labelled_indices(subset_paths, args.labelled_fraction, rng)] = True

    for j, i in enumerate(tqdm(index, desc="export", unit="img")):
        folder = args.out_dir.joinpath("labelled", *paths[i]) if is_labelled[j] else args.out_dir / "unlabelled"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(folder / f"animal-{i:05d}.png")
    print(f"wrote {int(is_labelled.sum())} labelled and {int((~is_labelled).sum())} unlabelled images to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
