"""Image decoding, folder scanning and the skipping dataset."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from model.data import ImageListDataset, Skipped, collate_skipping, scan_images, scan_labelled_folder
from model.errors import DataError
from model.images import check_image_header, content_hash, load_image, to_rgb_image


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _gradient(w: int = 20, h: int = 16) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 12, y * 15, (x + y) * 7], axis=-1).astype(np.uint8)  # (H, W, 3)


def test_rgb_png_roundtrip_from_bytes_and_path(tmp_path: Path) -> None:
    arr = _gradient()
    data = _encode(Image.fromarray(arr))
    path = tmp_path / "a.png"
    path.write_bytes(data)
    for src in (data, path, str(path)):
        img = load_image(src)
        assert img.mode == "RGB" and img.size == (20, 16)
        np.testing.assert_array_equal(np.asarray(img), arr)


@pytest.mark.parametrize("mode", ["L", "P", "LA", "RGBA", "I;16", "1", "CMYK"])
def test_modes_become_rgb(mode: str) -> None:
    base = Image.fromarray(_gradient())
    if mode == "I;16":
        img = Image.fromarray((np.arange(16 * 20).reshape(16, 20) * 200).astype(np.uint16))
    elif mode == "CMYK":
        img = base.convert("CMYK")
    else:
        img = base.convert(mode)
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
    out = load_image(_encode(img, fmt))
    assert out.mode == "RGB" and out.size == (20, 16)


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    arr = np.full((4, 4), 65535, dtype=np.uint16)
    arr[0, 0] = 0
    out = np.asarray(load_image(_encode(Image.fromarray(arr), "TIFF")))
    assert out[0, 0, 0] == 0 and out[1, 1, 0] == 255


def test_transparent_pixels_become_white() -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)  # fully transparent black
    rgba[0, 0] = (10, 20, 30, 255)
    out = np.asarray(load_image(_encode(Image.fromarray(rgba, "RGBA"))))
    assert tuple(out[0, 0]) == (10, 20, 30)
    assert tuple(out[1, 1]) == (255, 255, 255)


def test_errors_name_file_and_reason(tmp_path: Path) -> None:
    good = _encode(Image.fromarray(_gradient(64, 64)), "JPEG")
    cases = {
        "empty.png": (b"", "empty"),
        "junk.png": (b"not an image at all", "recognised image format"),
        "cut.jpg": (good[: len(good) // 2], "truncated"),
    }
    for name, (data, reason) in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(DataError, match=reason) as info:
            load_image(p)
        assert name in str(info.value)
    with pytest.raises(DataError, match="does not exist"):
        load_image(tmp_path / "missing.png")


def test_decompression_bomb_limit_is_per_call() -> None:
    data = _encode(Image.new("RGB", (100, 100)))
    with pytest.raises(DataError, match="decompression bomb"):
        load_image(data, max_pixels=9_999)
    assert load_image(data, max_pixels=10_000).size == (100, 100)
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # PIL's global default is left alone


def test_header_check_reads_size_and_refuses_without_decoding() -> None:
    data = _encode(Image.new("RGB", (100, 80)))
    assert check_image_header(data, max_pixels=8_000) == (100, 80)
    with pytest.raises(DataError, match="task 7.*decompression bomb"):
        check_image_header(data, max_pixels=7_999, name="the image of task 7")
    with pytest.raises(DataError, match="not in a recognised image format"):
        check_image_header(b"GIF89a? not really", name="x")
    with pytest.raises(DataError, match="empty"):
        check_image_header(b"")
    truncated = data[: len(data) // 2]  # the header is intact: only a full decode finds the rest missing
    assert check_image_header(truncated) == (100, 80)
    with pytest.raises(DataError, match="truncated"):
        load_image(truncated)


def test_unsupported_mode() -> None:
    with pytest.raises(DataError, match="unsupported pixel mode 'F'"):
        to_rgb_image(Image.new("F", (4, 4)))


def test_arrays_and_pil_inputs() -> None:
    assert to_rgb_image(np.zeros((5, 6), np.uint8)).size == (6, 5)
    assert to_rgb_image(np.zeros((5, 6, 1), np.uint8)).mode == "RGB"
    assert to_rgb_image(Image.new("L", (3, 3))).mode == "RGB"
    with pytest.raises(DataError, match="uint8"):
        to_rgb_image(np.zeros((5, 6), np.float32))
    with pytest.raises(DataError, match="shape"):
        to_rgb_image(np.zeros((5, 6, 2), np.uint8))


def test_content_hash() -> None:
    assert content_hash(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def _write(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_gradient()).save(path)


def test_scan_labelled_folder(tmp_path: Path) -> None:
    _write(tmp_path / "wild" / "Bear" / "b1.png")
    _write(tmp_path / "wild" / "Bear" / "sub" / "deep.jpg")
    _write(tmp_path / "wild" / "w.png")
    _write(tmp_path / "farm" / "Cow" / "c.PNG")
    _write(tmp_path / ".hidden" / "x.png")
    (tmp_path / "farm" / "notes.txt").write_text("not an image")
    got = {p.relative_to(tmp_path).as_posix(): path for p, path in scan_labelled_folder(tmp_path)}
    assert got == {
        "farm/Cow/c.PNG": ("farm", "Cow"),
        "wild/Bear/b1.png": ("wild", "Bear"),
        "wild/Bear/sub/deep.jpg": ("wild", "Bear", "sub"),
        "wild/w.png": ("wild",),
    }
    assert [p.name for p in scan_images(tmp_path)] == ["c.PNG", "b1.png", "deep.jpg", "w.png"]


def test_scan_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="holds no image"):
        scan_labelled_folder(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        scan_images(tmp_path / "nope")
    _write(tmp_path / "loose.png")
    with pytest.raises(DataError, match="move them into a folder"):
        scan_labelled_folder(tmp_path)


def test_dataset_skips_and_reports_unreadable(tmp_path: Path) -> None:
    good = _encode(Image.fromarray(_gradient()))
    sources = [good, b"garbage", np.zeros((8, 8), np.uint8), tmp_path / "missing.png", Image.new("RGB", (9, 9))]
    ds = ImageListDataset(sources, transform=lambda im: torch.tensor(im.size))
    assert isinstance(ds[1], Skipped) and ds[1].index == 1
    loader = DataLoader(ds, batch_size=3, collate_fn=collate_skipping)
    seen, skipped = [], []
    for x, idx, sk in loader:
        if x is not None:
            assert x.shape == (len(idx), 2)
        seen += idx.tolist()
        skipped += [i for i, _ in sk]
    assert seen == [0, 2, 4] and skipped == [1, 3]


def test_all_skipped_batch() -> None:
    x, idx, sk = collate_skipping([Skipped(0, "bad"), Skipped(1, "bad")])
    assert x is None and idx.numel() == 0 and [i for i, _ in sk] == [0, 1]
