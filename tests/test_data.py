from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.data import ClassificationDataset, read_image, read_label_csv
from cnnkit.data.transforms import classify_eval_transform
from cnnkit.errors import DataError


def _rgb(h: int = 10, w: int = 14) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("ext", ["png", "jpg", "bmp", "webp", "tiff"])
def test_formats_decode_to_rgb_uint8(tmp_path: Path, ext: str) -> None:
    arr = _rgb()
    Image.fromarray(arr).save(tmp_path / f"a.{ext}", **({"quality": 100} if ext in ("jpg", "webp") else {}))
    img = read_image(tmp_path / f"a.{ext}")
    assert img.dtype == torch.uint8 and img.shape == (3, 10, 14)
    if ext in ("png", "bmp", "tiff"):
        assert torch.equal(img, torch.from_numpy(arr).permute(2, 0, 1))


def test_grayscale_palette_rgba_and_16_bit_become_rgb(tmp_path: Path) -> None:
    gray = np.arange(140, dtype=np.uint8).reshape(10, 14)
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    assert torch.equal(read_image(tmp_path / "gray.png")[1], torch.from_numpy(gray))
    Image.fromarray(_rgb()).convert("P").save(tmp_path / "pal.png")
    assert read_image(tmp_path / "pal.png").shape == (3, 10, 14)
    rgba = np.zeros((10, 14, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, :7, 3] = 255  # left half opaque red, right half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    img = read_image(tmp_path / "rgba.png")
    assert img[:, 0, 0].tolist()[0] == 200
    deep = (np.arange(140, dtype=np.uint16).reshape(10, 14) * 400).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    img16 = read_image(tmp_path / "deep.png")
    assert img16.dtype == torch.uint8 and int(img16.max()) >= 200  # scaled, not clipped or wrapped


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    arr = np.zeros((10, 20, 3), dtype=np.uint8)  # wide image
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    im.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    assert read_image(tmp_path / "rot.jpg").shape == (3, 20, 10)


def test_corrupt_images_are_skipped_and_listed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(_rgb()).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "dog" / "notes.txt").write_text("ignored: not an image")
    with caplog.at_level("WARNING"):
        ds = ClassificationDataset.from_folder(tmp_path, classify_eval_transform(8))
    assert len(ds) == 6 and ds.class_names == ["cat", "dog"]
    assert [Path(p).name for p, _ in ds.skipped.items] == ["broken.jpg"]
    assert "broken.jpg" in caplog.text
    x, y = ds[0]
    assert x.shape == (3, 8, 8) and y == 0


def test_image_that_fails_late_is_replaced_by_the_next(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    for i in range(2):
        Image.fromarray(_rgb()).save(tmp_path / "a" / f"{i}.png")
    ds = ClassificationDataset.from_folder(tmp_path)
    (tmp_path / "a" / "0.png").write_bytes(b"gone bad after the scan")
    img, label = ds[0]
    assert img.shape == (3, 10, 14) and label == 0


def test_no_readable_image_fails_at_once(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="no readable image"):
        ClassificationDataset.from_folder(tmp_path)
    with pytest.raises(DataError, match="no class folders"):
        ClassificationDataset.from_folder(tmp_path / "a")


def test_csv_with_header_relative_paths_and_line_numbers(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    for i in range(3):
        Image.fromarray(_rgb()).save(tmp_path / "img" / f"{i}.png")
    (tmp_path / "labels.csv").write_text("filename,label\nimg/0.png,cat\nimg/1.png,dog\n\nimg/2.png,cat\n")
    samples, names = read_label_csv(tmp_path / "labels.csv")
    assert names == ["cat", "dog"]
    assert [(p.name, y) for p, y in samples] == [("0.png", 0), ("1.png", 1), ("2.png", 0)]
    (tmp_path / "bad.csv").write_text("path,label\nimg/0.png,cat\nimg/1.png\n")
    with pytest.raises(DataError, match=r"bad.csv:3: expected 'path,label'"):
        read_label_csv(tmp_path / "bad.csv")
    (tmp_path / "num.csv").write_text("img/0.png,2\nimg/1.png,0\n")
    assert read_label_csv(tmp_path / "num.csv")[1] == ["0", "1", "2"]
    with pytest.raises(DataError, match=r"num.csv:1: unknown label '2'"):
        read_label_csv(tmp_path / "num.csv", ["a", "b"])
