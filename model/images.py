"""Safe image decoding: every image enters the product as an RGB ``PIL.Image`` or a ``DataError`` naming why not.

Every image enters the product through :func:`load_image` (or :func:`to_rgb_image` for images that are
already in memory): it always returns an RGB ``PIL.Image``, or raises :class:`~model.errors.DataError`
naming the image and the reason.

Decompression bombs are refused from the header (``max_pixels``), before any pixel is decoded.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Union

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageOps, UnidentifiedImageError

from model.errors import DataError

__all__ = ["ImageSource", "check_image_header", "content_hash", "load_image", "to_rgb_image"]

ImageSource = Union[str, Path, bytes, Image.Image, NDArray[np.uint8]]
"""Anything the product accepts as one image: a file path, encoded bytes, a PIL image, or a uint8 array
``(H, W)`` / ``(H, W, 3)`` / ``(H, W, 4)``."""

_DIRECT_RGB_MODES = frozenset({"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr"})
_ALPHA_MODES = frozenset({"LA", "PA", "RGBA", "RGBa", "La"})
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


def content_hash(data: bytes) -> str:
    """The content address of an encoded image.

    Args:
        data: The encoded file bytes.

    Returns:
        The sha256 hex digest (64 lower-case hex characters).
    """
    return hashlib.sha256(data).hexdigest()


def _describe(src: ImageSource) -> str:
    if isinstance(src, (str, Path)):
        return f"image file {str(src)!r}"
    if isinstance(src, (bytes, bytearray)):
        return f"image of {len(src)} bytes"
    return f"in-memory image {type(src).__name__}"


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    arr = np.asarray(img)
    if arr.dtype.itemsize > 1 and arr.size and int(arr.max()) > 255:
        arr = (arr.astype(np.float64) / 257.0).round()
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")


def _flatten_to_rgb(img: Image.Image, name: str) -> Image.Image:
    """Converts any supported PIL mode to RGB; alpha is composited on white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_l(img).convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in _DIRECT_RGB_MODES:
        return img.convert("RGB")
    raise DataError(
        f"{name} has the unsupported pixel mode {mode!r}; "
        "save it as 8- or 16-bit grayscale, RGB or RGBA (for example as PNG or JPEG)."
    )


def load_image(src: str | Path | bytes, max_pixels: int = 50_000_000) -> Image.Image:
    """Decodes one image file completely and returns it as RGB.

    EXIF orientation is applied. Palette, grayscale, 16-bit, LA and RGBA images are converted to RGB
    (transparent pixels become white).

    Args:
        src: A path to an image file, or the encoded bytes of one.
        max_pixels: Largest accepted ``width * height``; a larger image is refused as a decompression
            bomb. Checked per call from the header before decoding (PIL's own global hard limit, twice
            ``PIL.Image.MAX_IMAGE_PIXELS``, still applies on top and is not changed).

    Returns:
        The decoded image in mode ``"RGB"``.

    Raises:
        DataError: The file is missing, empty, not an image, truncated, too large, or has an unsupported
            pixel mode. The message names the image and the reason.
    """
    name = _describe(src)
    if isinstance(src, (str, Path)):
        path = Path(src)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"{name} does not exist; check the path or remove it from the list.") from None
        except OSError as exc:
            raise DataError(f"{name} cannot be read ({exc}); check its permissions.") from None
    elif isinstance(src, (bytes, bytearray)):
        data = bytes(src)
    else:
        raise DataError(f"load_image got a {type(src).__name__}; pass a path or encoded bytes.")
    if not data:
        raise DataError(f"{name} is empty (0 bytes); re-upload or re-export the image.")
    with _image_errors(name):
        img = _open_checked(data, name, max_pixels)
        img = ImageOps.exif_transpose(img) or img
        img.load()
    return _flatten_to_rgb(img, name)


def check_image_header(data: bytes, max_pixels: int = 50_000_000, name: str = "the image") -> tuple[int, int]:
    """Checks that ``data`` is an image of a known format within ``max_pixels`` from its header alone
    (nothing is decoded); returns ``(width, height)``.

    Raises:
        DataError: as :func:`load_image` for a bad format, a zero or too large size.
    """
    if not data:
        raise DataError(f"{name} is empty (0 bytes); re-upload or re-export the image.")
    with _image_errors(name):
        return _open_checked(data, name, max_pixels).size


def _open_checked(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """``Image.open`` (lazy: the header only) with the size checks of :func:`load_image`; call it inside
    :func:`_image_errors`."""
    img = Image.open(io.BytesIO(data))
    width, height = img.size
    if width <= 0 or height <= 0:
        raise DataError(f"{name} has zero size ({width}x{height}); re-export the image.")
    if width * height > max_pixels:
        raise DataError(
            f"{name} has {width}x{height} = {width * height} pixels, more than the limit of "
            f"{max_pixels} (decompression bomb guard); downscale it or raise max_pixels."
        )
    return img


@contextlib.contextmanager
def _image_errors(name: str) -> Iterator[None]:
    """PIL's exceptions as DataErrors that name the image and the remedy."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except DataError:
        raise
    except Image.DecompressionBombError as exc:
        raise DataError(f"{name} is refused as a decompression bomb ({exc}); downscale it.") from None
    except UnidentifiedImageError:
        raise DataError(f"{name} is not in a recognised image format; re-upload or re-export it.") from None
    except (OSError, SyntaxError, ValueError) as exc:
        reason = "is truncated" if "truncated" in str(exc) else f"is not a readable image ({exc})"
        raise DataError(f"{name} {reason}; re-upload or re-export it.") from None


def to_rgb_image(src: ImageSource, max_pixels: int = 50_000_000) -> Image.Image:
    """Turns any :data:`ImageSource` into an RGB PIL image.

    Args:
        src: A path, encoded bytes, a PIL image, or a uint8 array ``(H, W)``, ``(H, W, 1|3|4)``.
        max_pixels: See :func:`load_image`.

    Returns:
        The image in mode ``"RGB"``.

    Raises:
        DataError: The image cannot be decoded or the array has the wrong dtype or shape.
    """
    if isinstance(src, Image.Image):
        return _flatten_to_rgb(src, _describe(src))
    if isinstance(src, np.ndarray):
        if src.dtype != np.uint8:
            raise DataError(f"image array has dtype {src.dtype}; convert it to uint8 (0..255) first.")
        arr = src[..., 0] if src.ndim == 3 and src.shape[2] == 1 else src
        if arr.ndim == 2:
            return Image.fromarray(np.ascontiguousarray(arr), mode="L").convert("RGB")
        if arr.ndim == 3 and arr.shape[2] in (3, 4):
            return _flatten_to_rgb(Image.fromarray(np.ascontiguousarray(arr)), "image array")
        raise DataError(f"image array has shape {src.shape}; expected (H, W), (H, W, 3) or (H, W, 4).")
    return load_image(src, max_pixels=max_pixels)


