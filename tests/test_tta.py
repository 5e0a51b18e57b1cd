"""Test-time augmentation (each image averaged with its mirror) and ensembles (several weights
averaged): the mirror is mapped back exactly for every task that supports it, averaging is what it
claims, and what cannot be averaged is refused with the reason."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

import cnnkit
from cnnkit.data import builtin
from cnnkit.data.scenes import write_scenes
from cnnkit.ops.nms import Candidates, multiclass_nms
from cnnkit.ops.yolo import decode_outputs
from cnnkit.tasks.base import TTA, Combined, View, rescaled
from cnnkit.tasks.classify import ClassificationTask
from cnnkit.tasks.detect import DetectionTask
from cnnkit.tasks.localize import LocalizationTask
from cnnkit.tasks.segment import SegmentationTask
from cnnkit.workflows import run

QUICK = {"epochs": 1, "workers": 0, "quiet": True, "batch": 8, "imgsz": 64}


class _Detector(torch.nn.Module):
    """Fixed grids, whatever the input: what a view of a detector returns, to test the mapping back."""

    def __init__(self, grids: list[torch.Tensor], anchors: torch.Tensor, strides: tuple[int, ...]) -> None:
        super().__init__()
        self.grids, self.anchors, self.strides = grids, anchors, strides


def test_detection_views_come_back_to_the_input_frame() -> None:
    """A mirrored view's boxes come back mirrored (x -> W - x), a resized view's rescaled, each decoded
    with its own model's anchors and strides (an ensemble may mix them)."""
    a = _Detector(
        [torch.randn(1, 8, 8, 2, 8), torch.randn(1, 4, 4, 2, 8)], torch.rand(2, 2, 2) * 30 + 5, (8, 16)
    )
    b = _Detector([torch.randn(1, 2, 2, 1, 8)], torch.tensor([[[20.0, 24.0]]]), (16,))
    task = DetectionTask(3, a.anchors, a.strides)
    views = [
        View(a.grids, a, False, (64, 64)),
        View(a.grids, a, True, (64, 64)),
        View(b.grids, b, False, (32, 32)),
    ]
    pooled = task.combine(views, (64, 64))
    assert isinstance(pooled, Candidates) and pooled.views == 3
    boxes_a, scores_a = decode_outputs(a.grids, a.anchors, a.strides)
    boxes_b, _ = decode_outputs(b.grids, b.anchors, b.strides)
    n = boxes_a.shape[1]
    torch.testing.assert_close(pooled.boxes[:, :n], boxes_a)
    mirrored = torch.stack([64 - boxes_a[..., 2], boxes_a[..., 1], 64 - boxes_a[..., 0], boxes_a[..., 3]], -1)
    torch.testing.assert_close(pooled.boxes[:, n : 2 * n], mirrored)
    torch.testing.assert_close(pooled.boxes[:, 2 * n :], boxes_b * 2)
    torch.testing.assert_close(pooled.scores[:, n : 2 * n], scores_a)
    assert pooled.view.tolist() == [0] * n + [1] * n + [2] * boxes_b.shape[1]


def test_box_fusion_averages_each_object_once() -> None:
    """Two views see the object (scores 0.9 and 0.6): one box, their score-weighted mean, scored by the
    mean of the views' best (0.75); a box only one view saw scores half its own; a weaker box beside the
    object (kept by NMS, overlapping the object's other candidates) does not borrow the object's score."""
    boxes = torch.tensor(
        [
            [10.0, 10.0, 30.0, 30.0],  # view 0: the object
            [14.0, 10.0, 34.0, 30.0],  # view 1: the object (IoU 0.67 with view 0's)
            [60.0, 60.0, 80.0, 80.0],  # view 0 only
            [19.0, 10.0, 39.0, 30.0],  # view 1: beside (IoU 0.38 with the first box, 0.6 with the second)
        ]
    )[None]
    scores = torch.tensor([[0.9], [0.6], [0.8], [0.1]])[None]
    view = torch.tensor([0, 1, 0, 1])
    (fused,) = multiclass_nms(boxes, scores, conf=0.01, iou=0.5, view=view, views=2)
    assert fused.scores.tolist() == pytest.approx([0.75, 0.4, 0.05])
    torch.testing.assert_close(fused.boxes[0], (0.9 * boxes[0, 0] + 0.6 * boxes[0, 1]) / 1.5)
    torch.testing.assert_close(fused.boxes[1], boxes[0, 2])
    (plain,) = multiclass_nms(boxes, scores, conf=0.01, iou=0.5)  # one view: NMS as ever
    assert plain.scores.tolist() == pytest.approx([0.9, 0.8, 0.1])


def test_resized_views_average_at_the_input_size() -> None:
    """Segmentation logits of a resized input come back to the input's size before averaging; a
    classifier's are averaged as they are; scales outside [0.25, 4] are refused."""
    unet = cnnkit.create_model("unet_same", num_classes=3, base=8, depth=2).eval()
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        both = Combined([unet], SegmentationTask(3), scales=(0.5, 1.0))(x)
        half = torch.nn.functional.interpolate(rescaled(x, 0.5, 4), size=(32, 48), mode="bilinear")
        small = torch.nn.functional.interpolate(unet(rescaled(x, 0.5, 4)), size=(32, 48), mode="bilinear")
        expected = (unet(x).softmax(1) + small.softmax(1)) / 2
    assert half.shape[-2:] == both.shape[-2:] == (32, 48)
    torch.testing.assert_close(both.softmax(1), expected, atol=1e-5, rtol=1e-4)
    model = cnnkit.create_model("resnet18", num_classes=4, width=0.125).eval()
    with torch.no_grad():
        out = Combined([model], ClassificationTask(4), scales=(0.75, 1.0))(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 4)
    with pytest.raises(cnnkit.CnnkitError, match=r"between 0\.25 and 4"):
        Combined([model], ClassificationTask(4), scales=(8.0,))
    assert TTA(flip=False, scales=(1.17, 0.83)).scales == (0.83, 1.0, 1.17)
    assert TTA.of(True) == TTA() and TTA.of(False) is None and TTA.of(TTA(flip=False)) is None


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
    resized = run.val(first, workers=0, tta=TTA(flip=False, scales=(1.25,))).metrics
    assert set(resized) == set(plain) and resized != plain
    (r,) = cnnkit.load(first, tta=TTA(scales=(0.75, 1.25)), ensemble=[second])(image)
    assert r.mask is not None and r.mask.shape == (48, 64)


def test_detectors_with_other_anchors_and_strides_combine(tmp_path: Path, cnnkit_cli: Any) -> None:
    """An ensemble of two detectors (strides 8+16 with 3 anchors, 16 with 2), each image mirrored and
    resized: val and predict through the command line."""
    data = builtin.write_detection(tmp_path / "det", n_train=16, n_val=4, seed=0)
    common = {"backbone_args": {"width": 0.25}, "imgsz": 64, "project": tmp_path / "runs", **QUICK}
    a = cnnkit.train("detect", data, strides=(8, 16), **common).best
    b = cnnkit.train("detect", data, strides=(16,), anchors_per_scale=2, name="b", **common).best
    flags = ["--weights", str(a), "--ensemble", str(b), "--tta", "--tta-scales", "0.75", "1.25"]
    report = json.loads(cnnkit_cli("val", "detect", *flags, "--json", cwd=tmp_path).stdout)
    assert {"mAP50", "mAP"} <= set(report["metrics"]) and "val_loss" not in report["metrics"]
    image = str(sorted((data / "images" / "val").iterdir())[0])
    found = json.loads(
        cnnkit_cli("predict", "detect", *flags, "--conf", "0.0", image, "--json", cwd=tmp_path).stdout
    )
    width = Image.open(image).size[0]
    assert found and all(0 <= r["bbox"][0] <= r["bbox"][0] + r["bbox"][2] <= width for r in found)


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
