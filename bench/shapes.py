"""Coloured shapes: procedurally rendered 64×64 colour images with a three-level taxonomy (made offline).

A second benchmark dataset that differs in kind from animal-mnist (grayscale 28 px silhouettes, two levels):
colour, larger images, three levels, and the class is carried by shape and texture under strong nuisance
variation (colour, position, size, rotation, background). No such dataset ships with the installed packages
(docs: /work/shared/environment.md), so it is rendered here, deterministically from a seed.

Taxonomy (:data:`SHAPES_TAXONOMY`, 3 families, 6 shapes, 18 leaves)::

    curved   circle, crescent         x  solid, stripes, dots
    polygon  triangle, square         x  solid, stripes, dots
    spiky    star, cross              x  solid, stripes, dots

How one image is made (:func:`render_image`), everything drawn at 128 px and area-downscaled to 64 px:

- background: a random colour with a linear gradient to a second random colour and faint pixel noise;
- the shape: random centre (kept inside the image), size 40-75 % of the side, random rotation (0-360°);
  the crescent is a disc minus an offset disc, the star has 5 points, the cross is a plus sign;
- the fill: a random foreground colour at least 0.35 (RGB distance / sqrt(3)) from the background's mean;
  ``stripes`` alternate it with a second colour at a random angle and a period of 10-18 px (at 128 px);
  ``dots`` put discs of a second colour on a random-phase grid of period 14-20 px; ``solid`` is plain;
- Gaussian noise (sigma 4 grey levels) over the whole image.

Colour carries no label: every colour is drawn independently of the class.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from model.taxonomy import Path, Taxonomy

__all__ = ["FILLS", "SHAPES_TAXONOMY", "SHAPES_TREE", "load_shapes", "render_image"]

FILLS: tuple[str, ...] = ("solid", "stripes", "dots")
SHAPES_TREE: dict[str, dict[str, list[str]]] = {
    "curved": {"circle": list(FILLS), "crescent": list(FILLS)},
    "polygon": {"triangle": list(FILLS), "square": list(FILLS)},
    "spiky": {"star": list(FILLS), "cross": list(FILLS)},
}
"""Family / shape / fill."""

SHAPES_TAXONOMY: Taxonomy = Taxonomy.from_nested(SHAPES_TREE)
"""The three-level taxonomy: 3 families, 6 shapes, 18 leaves."""

_SUPER = 2  # render at 2x and downscale (anti-aliasing)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape of circumradius ``r`` rotated by ``angle`` (radians)."""
    if shape == "triangle":
        pts = [(r, 2 * math.pi * k / 3) for k in range(3)]
    elif shape == "square":
        pts = [(r, math.pi / 4 + math.pi / 2 * k) for k in range(4)]
    elif shape == "star":
        pts = [(r if k % 2 == 0 else 0.42 * r, math.pi * k / 5) for k in range(10)]
    elif shape == "cross":
        a, b = 0.3 * r, r  # arm half-width, arm length
        corners = [(a, b), (a, a), (b, a), (b, -a), (a, -a), (a, -b), (-a, -b), (-a, -a), (-b, -a), (-b, a),
                   (-a, a), (-a, b)]
        return [(cx + x * math.cos(angle) - y * math.sin(angle), cy + x * math.sin(angle) + y * math.cos(angle))
                for x, y in corners]
    else:
        raise ValueError(f"{shape} is not a polygonal shape")
    return [(cx + rr * math.cos(t + angle), cy + rr * math.sin(t + angle)) for rr, t in pts]


def _mask(shape: str, side: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean ``(side, side)`` mask of one randomly placed, sized and rotated shape."""
    r = rng.uniform(0.20, 0.375) * side  # circumradius: the shape spans 40-75 % of the side
    cx, cy = rng.uniform(r, side - r, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    img = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "crescent":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        ox, oy = cx + 0.55 * r * math.cos(angle), cy + 0.55 * r * math.sin(angle)
        draw.ellipse((ox - 0.85 * r, oy - 0.85 * r, ox + 0.85 * r, oy + 0.85 * r), fill=0)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=255)
    return np.asarray(img) > 127


def _colour_far_from(rng: np.random.Generator, ref: np.ndarray, min_dist: float = 0.35) -> np.ndarray:
    while True:
        c = rng.uniform(0, 1, size=3)
        if np.linalg.norm(c - ref) / math.sqrt(3) >= min_dist:
            return c


def render_image(path: Path, size: int, rng: np.random.Generator) -> np.ndarray:
    """One image of the class ``path`` = (family, shape, fill): uint8 ``(size, size, 3)``."""
    _, shape, fill = path
    side = size * _SUPER
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)  # (side, side) each
    bg0, bg1 = rng.uniform(0, 1, size=3), rng.uniform(0, 1, size=3)
    g = rng.uniform(0, 2 * math.pi)
    t = ((xx * math.cos(g) + yy * math.sin(g)) / side * 0.5 + 0.5)[..., None]  # (side, side, 1) in ~[0, 1]
    bg = (1 - t) * bg0 + t * bg1  # (side, side, 3)
    fg = _colour_far_from(rng, (bg0 + bg1) / 2)
    second = _colour_far_from(rng, fg, 0.3)
    colour = np.broadcast_to(fg, bg.shape).copy()
    if fill == "stripes":
        a, period = rng.uniform(0, math.pi), rng.uniform(10, 18)
        phase = ((xx * math.cos(a) + yy * math.sin(a)) / period + rng.uniform()) % 1.0
        colour[phase < 0.5] = second
    elif fill == "dots":
        period = rng.uniform(14, 20)
        px, py = (xx / period + rng.uniform()) % 1.0 - 0.5, (yy / period + rng.uniform()) % 1.0 - 0.5
        colour[px ** 2 + py ** 2 < 0.3 ** 2] = second
    mask = _mask(shape, side, rng)[..., None]  # (side, side, 1)
    img = np.where(mask, colour, bg) * 255.0
    small = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).resize((size, size), Image.Resampling.BOX)
    out = np.asarray(small, dtype=np.float32) + rng.normal(0, 4.0, size=(size, size, 3))
    return np.clip(out, 0, 255).astype(np.uint8)


def load_shapes(per_leaf: int = 250, size: int = 64, seed: int = 0) -> tuple[np.ndarray, list[Path]]:
    """The dataset: ``per_leaf`` images of each of the 18 leaves, in leaf order, rendered from ``seed``.

    Returns:
        images: uint8 ``(18 * per_leaf, size, size, 3)``.
        paths: the (family, shape, fill) path of each image.
    """
    rng = np.random.default_rng(seed)
    leaves = [leaf.path for leaf in SHAPES_TAXONOMY.leaves()]
    paths = [p for p in leaves for _ in range(per_leaf)]
    images = np.stack([render_image(p, size, rng) for p in paths])
    return images, paths
