"""Test-time augmentation (each image averaged with its mirror) and ensembles (several weights
averaged): the mirror is mapped back exactly for every task that supports it, averaging is what it
claims, and what cannot be averaged is refused with the reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import cnnkit
from cnnkit.data import builtin
from cnnkit.data.scenes import write_scenes
from cnnkit.ops.yolo import decode_outputs
from cnnkit.tasks.base import Combined
from cnnkit.tasks.classify import ClassificationTask
from cnnkit.tasks.detect import DetectionTask
from cnnkit.tasks.localize import LocalizationTask
from cnnkit.tasks.segment import SegmentationTask
from cnnkit.workflows import run

QUICK = {"epochs": 1, "workers": 0, "quiet": True, "batch": 8, "imgsz": 64}


def test_a_mirrored_detectors_grids_map_back_to_mirrored_boxes() -> None:
    """Grid column j of a mirrored image is column S-1-j of the original, and sigmoid(t_x) becomes
    1 - sigmoid(t_x): decoding the mapped-back grids gives each box mirrored, x -> W - x."""
    anchors = torch.tensor([[[10.0, 14.0], [20.0, 12.0]], [[30.0, 40.0], [44.0, 30.0]]])
    task = DetectionTask(3, anchors, (8, 16))
    grids = [torch.randn(1, 8, 8, 2, 8), torch.randn(1, 4, 4, 2, 8)]
    boxes, scores = decode_outputs(grids, anchors, (8, 16))
    back, back_scores = decode_outputs(task.unflip(grids), anchors, (8, 16))
    mirrored = torch.stack([64 - boxes[..., 2], boxes[..., 1], 64 - boxes[..., 0], boxes[..., 3]], -1)
    order = lambda b: b[0][torch.argsort(b[0][:, 0] * 1e4 + b[0][:, 1])]  # noqa: E731
    torch.testing.assert_close(order(back), order(mirrored), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(back_scores.sort(1).values, scores.sort(1).values)


def test_the_mirror_maps_back_for_segmentation_and_localization() -> None:
    logits = torch.randn(2, 3, 8, 10)
    torch.testing.assert_close(SegmentationTask(3).unflip(logits.flip(-1)), logits)
    out = torch.tensor([[2.0, 0.3, 0.4, 0.2, 0.1, 1.0, -1.0]])
    back = LocalizationTask(2).unflip(out)
    assert back[0, 1] == pytest.approx(0.7) and torch.equal(back[0, 2:], out[0, 2:])


def test_averaging_is_the_mean_prediction() -> None:
    torch.manual_seed(0)
    model = cnnkit.create_model("resnet18", num_classes=4, width=0.125).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tta = Combined([model], ClassificationTask(4), flip=True)(x)
        expected = (model(x).softmax(1) + model(x.flip(-1)).softmax(1)) / 2
        torch.testing.assert_close(tta.softmax(1), expected, atol=1e-6, rtol=1e-5)
        twice = Combined([model, model], ClassificationTask(4))(x)  # a model with itself: itself
        torch.testing.assert_close(twice.softmax(1), model(x).softmax(1), atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def segmenters(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("tta")
    data = write_scenes(root / "scenes", n_train=8, n_val=4, size=(48, 64))
    first = cnnkit.train("segment", data, project=root / "runs", name="a", **QUICK).best
    second = cnnkit.train("segment", data, project=root / "runs", name="b", seed=1, **QUICK).best
    return data, first, second


def test_val_and_predict_take_tta_and_ensembles(segmenters: tuple[Path, Path, Path]) -> None:
    data, first, second = segmenters
    plain = run.val(first, workers=0).metrics
    both = run.val(first, workers=0, tta=True, ensemble=[second]).metrics
    assert set(both) == set(plain) and both != plain
    image = sorted((data / "images" / "val").iterdir())[0]
    (one,) = run.predict(first, [image], tta=True, ensemble=[second])
    assert one.arrays["mask"].shape == (48, 64)


def test_what_cannot_be_averaged_is_refused(segmenters: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, first, _ = segmenters
    digits = builtin.write_classification(tmp_path / "digits", classes=(0, 1), size_range=(28, 32))
    options = {"model": "resnet18", "model_args": {"width": 0.125}, "fliplr": 0.0, "project": tmp_path}
    classifier = cnnkit.train("classify", digits, **options, **{**QUICK, "imgsz": 32}).best
    with pytest.raises(cnnkit.CnnkitError, match="trained without flips"):
        run.val(classifier, workers=0, tta=True)
    with pytest.raises(cnnkit.CnnkitError, match="holds a segment model"):
        run.val(classifier, workers=0, ensemble=[first])
    landmarks = builtin.write_landmarks(tmp_path / "kites", n_train=8, n_val=2)
    points = cnnkit.train("landmarks", landmarks, project=tmp_path, **QUICK).best
    with pytest.raises(cnnkit.CnnkitError, match="does not support test-time augmentation"):
        run.val(points, workers=0, tta=True)
