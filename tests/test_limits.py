"""Bounded resources: every decode is limited in pixels and bytes (a decompression bomb is skipped in
training and refused in predict, before it is decoded), a JPEG cut short is caught by the header check
and listed in skipped.txt, and a weights file's metadata cannot make cnnkit build a model far larger
than the file (checked on the meta device, before anything is allocated)."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnkit.data import images as images_mod
from cnnkit.data.images import LIMITS, read_image, verify_image
from cnnkit.engine.config import TrainConfig
from cnnkit.errors import CnnkitError, DataError
from cnnkit.workflows import run


@pytest.fixture
def bomb(tmp_path: Path) -> Path:
    """A 20000x20000 PNG of ~0.4 MB: 400 megapixels, 1.2 GB once decoded."""
    path = tmp_path / "bomb.png"
    Image.new("L", (20000, 20000)).save(path)
    return path


def cut_jpeg(path: Path, keep: float = 0.7) -> Path:
    """A JPEG cut at ``keep`` of its length: its header is whole, its data is not."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def test_a_bomb_is_refused_before_decoding(bomb: Path) -> None:
    with pytest.raises(
        DataError, match=r"bomb.png: [\dx,]+ pixels is over the limit .*CNNKIT_MAX_IMAGE_PIXELS"
    ):
        read_image(bomb)
    assert "over the limit" in (verify_image(bomb) or "")


def test_limits_are_configurable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bomb: Path) -> None:
    path = tmp_path / "a.png"
    Image.new("RGB", (64, 48)).save(path)
    assert read_image(path).shape == (3, 48, 64)
    monkeypatch.setattr(LIMITS, "max_pixels", 1000)
    with pytest.raises(DataError, match="64x48 pixels is over the limit of 1,000"):
        read_image(path)
    monkeypatch.setattr(LIMITS, "max_pixels", 10**9)
    monkeypatch.setattr(LIMITS, "max_bytes", 10)
    with pytest.raises(DataError, match="MB limit for an image"):
        read_image(path)
    monkeypatch.setattr(LIMITS, "max_bytes", 10**9)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    monkeypatch.setattr(LIMITS, "max_pixels", 300_000_000)
    with pytest.raises(DataError, match="20000x20000 pixels is over the limit of 300,000,000"):
        read_image(bomb)  # our bound, not Pillow's, decides
    assert images_mod.LIMITS is LIMITS


def test_a_cut_jpeg_fails_the_header_check(tmp_path: Path) -> None:
    path = cut_jpeg(tmp_path / "cut.jpg")
    with Image.open(path) as im:
        im.verify()  # what a plain verify says: fine
    assert "cannot decode image" in (verify_image(path) or "")
    whole = cut_jpeg(tmp_path / "whole.jpg", 1.0)
    assert verify_image(whole) is None
    whole.write_bytes(whole.read_bytes() + b"camera trailer")  # junk after the end marker still decodes
    assert verify_image(whole) is None


def test_training_skips_a_bomb_and_a_cut_jpeg_into_skipped_txt(
    digits_0_4: Path, tmp_path: Path, bomb: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(digits_0_4, data)
    shutil.copy(bomb, data / "train" / "zero" / "bomb.png")
    cut_jpeg(data / "train" / "one" / "cut.jpg")
    cfg = TrainConfig(epochs=1, batch=4, imgsz=32, workers=0, quiet=True, plots=False)
    result = run.train(
        "classify", data, cfg=cfg, project=tmp_path / "runs", model="mobilenet_v2", model_args={"width": 0.25}
    )
    skipped = (result.run_dir / "skipped.txt").read_text()
    assert re.search(r"bomb.png: [\dx,]+ pixels is over the limit", skipped)
    assert "cut.jpg: cannot decode image" in skipped


def test_predict_refuses_a_bomb_and_goes_on(digits_0_4: Path, tmp_path: Path, bomb: Path) -> None:
    cfg = TrainConfig(epochs=1, batch=4, imgsz=32, workers=0, quiet=True, plots=False)
    weights = run.train(
        "classify",
        digits_0_4,
        cfg=cfg,
        project=tmp_path / "runs",
        model="mobilenet_v2",
        model_args={"width": 0.25},
    ).best
    pictures = tmp_path / "in"
    pictures.mkdir()
    shutil.copy(bomb, pictures / "a_bomb.png")
    Image.new("RGB", (40, 30)).save(pictures / "b_ok.png")
    records = list(run.predict(weights, [str(pictures)]))
    assert [Path(r.data["path"]).name for r in records] == ["b_ok.png"]


def test_model_arguments_from_metadata_are_checked_before_allocating(tmp_path: Path) -> None:
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from cnnkit.api import create_model
    from cnnkit.weights import save_weights

    path = save_weights(create_model("mobilenet_v2", num_classes=3, width=0.25), tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    args = json.loads(meta["cnnkit.args"])
    save_file(
        load_file(path),
        str(tmp_path / "wide.safetensors"),
        {**meta, "cnnkit.args": json.dumps({**args, "width": 40})},
    )
    with pytest.raises(CnnkitError, match=r"builds a mobilenet_v2 of [\d,]+ values but the file holds"):
        create_model(None, weights=tmp_path / "wide.safetensors")
    assert create_model(None, weights=path)  # the real one loads
