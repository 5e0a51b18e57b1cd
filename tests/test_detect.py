"""Detection: COCO metrics against pycocotools, multi-class NMS, the YOLO model, loss, data and CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
import torchvision.ops as tvo

from cnnkit.api import create_model
from cnnkit.data.builtin import write_detection
from cnnkit.data.detect import DetSample
from cnnkit.data.detect_dataset import DetAugment, DetectionDataset, collate, letterbox
from cnnkit.errors import CnnkitError
from cnnkit.ops import batched_nms, multiclass_nms
from cnnkit.ops.boxes import box_iou
from cnnkit.ops.yolo import decode, decode_pixels
from cnnkit.tasks.coco_eval import STAT_NAMES, CocoEvaluator, pycocotools_eval
from cnnkit.tasks.detect import DetectionTask, unletterbox

if TYPE_CHECKING:
    from conftest import CliRun


def random_coco_case(seed: int, n_img: int = 40, k: int = 4) -> tuple[list, list]:
    """Ground truth with crowds and annotation areas unlike the box areas; detections near the objects
    and elsewhere, with tied scores on odd seeds."""
    rng = np.random.default_rng(seed)
    gts, dts = [], []
    for _ in range(n_img):
        g = int(rng.integers(0, 7))
        xy, wh = rng.uniform(0, 200, (g, 2)), rng.uniform(4, 150, (g, 2))
        gb = np.concatenate([xy, xy + wh], 1).round(1)
        gl = rng.integers(0, k, g)
        crowd = rng.random(g) < 0.15
        area = wh.prod(1) * rng.uniform(0.4, 1.0, g)
        d = int(rng.integers(0, 14))
        if g:
            src = rng.integers(0, g, d)
            db = gb[src] + rng.normal(0, 7, (d, 4))
            dl = np.where(rng.random(d) < 0.8, gl[src], rng.integers(0, k, d))
        else:
            p = rng.uniform(0, 200, (d, 2))
            db, dl = np.concatenate([p, p + rng.uniform(4, 90, (d, 2))], 1), rng.integers(0, k, d)
        db[:, 2:] = np.maximum(db[:, 2:], db[:, :2] + 1)
        scores = rng.choice([0.2, 0.5, 0.9], d) if seed % 2 else rng.random(d)
        gts.append((gb, gl, crowd, area))
        dts.append((db, scores, dl))
    return gts, dts


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_coco_metrics_equal_pycocotools(seed: int) -> None:
    pytest.importorskip("pycocotools")
    gts, dts = random_coco_case(seed)
    ours = CocoEvaluator(4)
    for (gb, gl, crowd, area), (db, ds, dl) in zip(gts, dts):
        ours.add(gb, gl, db, ds, dl, gt_crowd=crowd, gt_area=area)
    result = ours.compute()
    ref = pycocotools_eval(
        [(gb, gl) for gb, gl, _, _ in gts], dts, 4, gt_crowd=[g[2] for g in gts], gt_area=[g[3] for g in gts]
    )
    np.testing.assert_allclose(result.precision, ref.eval["precision"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(result.recall, ref.eval["recall"], atol=1e-6, rtol=0)
    np.testing.assert_allclose([result.stats[n] for n in STAT_NAMES], ref.stats, atol=1e-6, rtol=0)
    assert 0.05 < result.stats["mAP50"] < 0.95  # a case that exercises both hits and misses


def test_coco_metrics_hand_cases() -> None:
    gt = np.array([[0, 0, 10, 10], [20, 20, 40, 40]], float)
    perfect = CocoEvaluator(2)
    perfect.add(gt, np.array([0, 1]), gt, np.array([0.9, 0.8]), np.array([0, 1]))
    assert perfect.compute().stats["mAP"] == pytest.approx(1.0)
    wrong_class = CocoEvaluator(2)
    wrong_class.add(gt, np.array([0, 1]), gt, np.array([0.9, 0.8]), np.array([1, 0]))
    assert wrong_class.compute().stats["mAP"] == 0.0
    # a class with no ground truth is left out of the mean; its detections do not count against others
    extra = CocoEvaluator(3)
    extra.add(
        gt, np.array([0, 1]), np.vstack([gt, gt]), np.array([0.9, 0.8, 0.95, 0.95]), np.array([0, 1, 2, 2])
    )
    result = extra.compute()
    assert result.stats["mAP"] == pytest.approx(1.0)
    assert np.isnan(result.per_class_ap()[2])
    p, r, f1, _ = result.best_f1()
    assert p == pytest.approx(1.0) and r == pytest.approx(1.0) and f1 == pytest.approx(1.0)


def test_batched_nms_per_class_path_equals_torchvision() -> None:
    g = torch.Generator().manual_seed(0)
    n = 5000
    xy = torch.rand(n, 2, generator=g) * 600
    boxes = torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=g) * 80], 1)
    scores = torch.rand(n, generator=g)
    classes = torch.randint(0, 80, (n,), generator=g)
    assert torch.equal(batched_nms(boxes, scores, classes, 0.5), tvo.batched_nms(boxes, scores, classes, 0.5))


@pytest.mark.parametrize("multi_label", [False, True])
def test_multiclass_nms_equals_a_plain_reference(multi_label: bool) -> None:
    g = torch.Generator().manual_seed(1)
    b, n, c = 2, 800, 5
    xy = torch.rand(b, n, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + 5 + torch.rand(b, n, 2, generator=g) * 40], -1)
    scores = torch.rand(b, n, c, generator=g) ** 3
    out = multiclass_nms(boxes, scores, conf=0.3, iou=0.5, max_det=50, multi_label=multi_label)
    for i, det in enumerate(out):
        if multi_label:
            idx, cls = (scores[i] > 0.3).nonzero(as_tuple=True)
            sc = scores[i, idx, cls]
        else:
            sc, cls = scores[i].max(1)
            idx = (sc > 0.3).nonzero(as_tuple=True)[0]
            sc, cls = sc[idx], cls[idx]
        keep = tvo.batched_nms(boxes[i, idx], sc, cls, 0.5)[:50]
        assert torch.equal(det.boxes, boxes[i, idx][keep])
        assert torch.equal(det.scores, sc[keep]) and torch.equal(det.labels, cls[keep])


def test_decode_pixels_matches_cell_decode() -> None:
    raw = torch.randn(2, 4, 6, 3, 7)
    anchors_cells = torch.tensor([[1.0, 2.0], [2.5, 1.5], [0.5, 0.7]])
    stride = 16
    fractions = decode(raw, anchors_cells)  # cx, cy, w, h as fractions of the 96 x 64 image
    boxes, obj, cls = decode_pixels(raw, anchors_cells * stride, stride)
    size = torch.tensor([6 * stride, 4 * stride] * 2, dtype=torch.float32)
    cx, cy, w, h = fractions[..., 0], fractions[..., 1], fractions[..., 2], fractions[..., 3]
    expected = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1).reshape(2, -1, 4) * size
    torch.testing.assert_close(boxes, expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(obj.sigmoid(), fractions[..., 4].reshape(2, -1))
    assert cls.shape == (2, 4 * 6 * 3, 2)


@pytest.mark.parametrize(
    ("backbone", "args", "strides"),
    [("resnet18", {"width": 0.25}, (8, 16, 32)), ("mobilenet_v2", {"width": 0.35}, (16, 32))],
)
def test_yolo_model_shapes_and_backward(backbone: str, args: dict, strides: tuple[int, ...]) -> None:
    model = create_model("yolo", backbone=backbone, backbone_args=args, num_classes=3, strides=strides)
    outs = model(torch.randn(2, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(2, 64 // s, 96 // s, 3, 8) for s in strides]
    sum(o.float().mean() for o in outs).backward()  # type: ignore[union-attr]
    # objectness starts at the 1% prior
    assert outs[0][..., 4].sigmoid().mean().item() == pytest.approx(0.01, abs=0.01)
    with pytest.raises(CnnkitError, match="no stage at stride 64"):
        create_model("yolo", backbone=backbone, backbone_args=args, strides=(16, 64))


def test_assignment_uses_the_best_anchor_across_scales() -> None:
    anchors = torch.tensor([[[10.0, 10.0], [20.0, 10.0]], [[40.0, 40.0], [30.0, 60.0]]])
    task = DetectionTask(2, anchors, (8, 16), anchor_iou=1.0)
    targets = torch.tensor([[0, 1, 0, 0, 19, 11], [0, 0, 10, 10, 40, 70.0]])
    assigned = task.assign(targets)
    assert assigned.tolist() == [[False, True, False, False], [False, False, False, True]]


def test_detector_overfits_one_batch_and_finds_the_objects() -> None:
    torch.manual_seed(0)
    image = torch.zeros(2, 3, 64, 64)
    image[0, :, 8:24, 10:30] = 2.0
    image[1, 1, 30:60, 20:44] = 2.0
    targets = torch.tensor([[0, 0, 10, 8, 30, 24], [1, 1, 20, 30, 44, 60.0]])
    info = torch.tensor([[64, 64, 1, 0, 0]] * 2, dtype=torch.float32)
    batch = (image, targets, info)
    model = create_model(
        "yolo",
        backbone="resnet18",
        backbone_args={"width": 0.25},
        num_classes=2,
        strides=(8, 16),
        anchors=[[[16, 16], [24, 24]], [[24, 32], [32, 32]]],
    )
    task = DetectionTask(2, model.anchors, model.strides)  # type: ignore[arg-type]
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    first = None
    for _ in range(60):
        loss, logs = task.loss(model(image), batch)
        first = first if first is not None else loss.item()
        # logged per image (the back-propagated loss is x batch size): the sum of its weighted parts
        assert logs["loss"] == pytest.approx(logs["box"] + logs["obj"] + 0.5 * logs["cls"], rel=1e-5)
        assert loss.item() == pytest.approx(2 * logs["loss"], rel=1e-5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first
    model.eval()
    with torch.no_grad():
        dets = task.postprocess(model(image), conf=0.3, iou=0.5)
    for i, det in enumerate(dets):
        best = int(det.scores.argmax())
        assert int(det.labels[best]) == int(targets[i, 1])
        assert box_iou(det.boxes[best : best + 1], targets[i : i + 1, 2:]).item() > 0.5
    evaluator = task.evaluator()
    with torch.no_grad():
        evaluator.update(model(image), batch)
    assert evaluator.compute()["mAP50"] == pytest.approx(1.0)


def test_letterbox_round_trip_and_augmentations_move_boxes() -> None:
    image = torch.zeros(3, 50, 100, dtype=torch.uint8)
    boxes = torch.tensor([[10.0, 5.0, 30.0, 25.0]])
    out, moved, info = letterbox(image, boxes, 64)
    assert out.shape == (3, 64, 64) and info.tolist() == pytest.approx([50, 100, 0.64, 0, 16])
    torch.testing.assert_close(unletterbox(moved, info), boxes)
    sample = DetSample(Path("x.png"), boxes, torch.tensor([1]), (50, 100))
    flip = DetectionDataset([sample], 64, True, DetAugment(scale=(1, 1), translate=0, hflip=1.0, jitter=0))
    flip.load = lambda i: (image, boxes, torch.tensor([1]), 0)  # type: ignore[method-assign]
    _, target, _ = flip[0]
    torch.testing.assert_close(
        target[0, 1:], torch.tensor([64 - moved[0, 2], moved[0, 1], 64 - moved[0, 0], moved[0, 3]])
    )


def test_mosaic_keeps_boxes_inside_and_labelled() -> None:
    samples = [
        DetSample(
            Path(f"{i}.png"),
            torch.tensor([[5.0, 5.0, 40.0, 30.0], [50, 40, 70, 60]]),
            torch.tensor([i % 3, 1]),
            (64, 80),
        )
        for i in range(4)
    ]
    ds = DetectionDataset(samples, 64, True, DetAugment(mosaic=1.0, scale=(1, 1), translate=0, jitter=0))
    image = torch.full((3, 64, 80), 200, dtype=torch.uint8)
    ds.load = lambda i: (image, samples[i].boxes, samples[i].labels, i)  # type: ignore[method-assign]
    for seed in range(5):
        torch.manual_seed(seed)
        x, target, _ = ds[0]
        assert x.shape == (3, 64, 64) and len(target) >= 1
        assert (target[:, 1:] >= 0).all() and (target[:, 1:] <= 64).all()
        assert set(target[:, 0].long().tolist()) <= {0, 1, 2}
    batch = collate([ds[0], ds[1]])
    assert batch[1].shape[1] == 6 and set(batch[1][:, 0].tolist()) == {0.0, 1.0}


# A detector small enough for CPU tests: resnet18 at a quarter width, grids at strides 8 and 16.
TINY_YOLO = ["--backbone-args", '{"width": 0.25}', "--strides", "8", "16"]


@pytest.mark.slow
def test_cli_train_val_predict_detect(tmp_path: Path, cnnkit_cli: CliRun) -> None:
    data = write_detection(tmp_path / "det", n_train=48, n_val=16, seed=3)
    common = ["--epochs", "2", "--batch", "16", "--imgsz", "64", "--workers", "0", "--quiet"]
    project = ["--project", str(tmp_path / "runs")]
    cnnkit_cli(
        "train", "detect", "--data", str(data), *TINY_YOLO, "--mosaic", "0.5", *common, *project, cwd=tmp_path
    )
    run = tmp_path / "runs" / "detect" / "exp"
    for name in ("results.csv", "pr_curve.png", "confusion_matrix.png", "weights/best.safetensors"):
        assert (run / name).is_file(), name
    weights = str(run / "weights" / "best.safetensors")
    report = json.loads(cnnkit_cli("val", "detect", "--weights", weights, "--json", cwd=tmp_path).stdout)
    assert set(report["metrics"]) >= {"mAP50", "mAP", "precision", "recall"}
    assert len(report["per_class"]) == 10 and "mAP_small" in report["coco"]
    assert {"precision", "recall", "AP50", "AP", "support"} == set(report["per_class"][0]) - {"class"}
    # val keeps its outputs in a new folder: the same numbers, per class, the plots and predictions
    kept = tmp_path / "runs" / "val" / "detect" / "exp"
    assert json.loads((kept / "metrics.json").read_text())["metrics"] == report["metrics"]
    assert (kept / "per_class.csv").read_text().startswith("class,precision,recall,AP50,AP,support")
    for name in ("confusion_matrix.png", "pr_curve.png", "val_pred.jpg"):
        assert (kept / name).stat().st_size > 1000, name
    # the COCO copy of the same data evaluates to the same numbers
    annotations = data / "annotations"
    coco_args = [
        "--data",
        str(annotations / "instances_train.json"),
        "--val",
        str(annotations / "instances_val.json"),
    ]
    coco = json.loads(
        cnnkit_cli("val", "detect", "--weights", weights, *coco_args, "--json", cwd=tmp_path).stdout
    )
    assert coco["metrics"]["mAP"] == pytest.approx(report["metrics"]["mAP"], abs=1e-3)
    assert (kept.parent / "exp2" / "metrics.json").is_file()  # a second val never overwrites the first
    predict = ["predict", "detect", "--weights", weights, "--conf", "0.0001"]
    results = json.loads(cnnkit_cli(*predict, str(data / "images" / "val"), "--json", cwd=tmp_path).stdout)
    assert results and {"image_id", "category_id", "bbox", "score"} <= set(results[0])
    one_image = str(data / "images" / "val" / "00000.png")
    out = cnnkit_cli(*predict, one_image, "--save-img", "--out", str(tmp_path / "pred"), cwd=tmp_path).stdout
    assert (tmp_path / "pred" / "00000.jpg").is_file() and "objects" in out
    anchors = cnnkit_cli("anchors", "--data", str(data), "-k", "4", "--imgsz", "64", cwd=tmp_path).stdout
    assert "mean best IoU" in anchors
    cnnkit_cli(
        "train", "detect", "--resume", str(run), cwd=tmp_path
    )  # finished run: resumes to its end at once


def test_polygon_label_lines_become_their_bounding_box(tmp_path: Path) -> None:
    from PIL import Image

    from cnnkit.data.detect import read_yolo

    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.new("RGB", (100, 50)).save(tmp_path / "images" / "a.png")
    (tmp_path / "labels" / "a.txt").write_text("1 0.1 0.2 0.5 0.2 0.3 0.8\n0 0.5 0.5 0.2 0.2 0.9\n")
    (tmp_path / "data.yaml").write_text("path: .\ntrain: images\nnames: [a, b]\n")
    samples, _, report = read_yolo(tmp_path / "data.yaml")
    assert report.problems == []
    torch.testing.assert_close(
        samples[0].boxes, torch.tensor([[10.0, 10.0, 50.0, 40.0], [40.0, 20.0, 60.0, 30.0]])
    )
    assert samples[0].labels.tolist() == [1, 0]


@pytest.mark.slow
def test_training_skips_bad_samples_and_strict_stops(tmp_path: Path, cnnkit_cli: CliRun) -> None:
    data = write_detection(tmp_path / "det", n_train=24, n_val=8, seed=4)
    labels = data / "labels" / "train"
    (labels / "00001.txt").write_text("3 0.5 0.5 0.2\n")  # malformed line
    (labels / "00002.txt").write_text("0 0.5 0.5 0.2 0.2\n42 0.5 0.5 0.2 0.2\n")  # unknown class, line 2
    (data / "images" / "train" / "00003.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # corrupt image
    args = ["train", "detect", "--data", str(data), *TINY_YOLO]
    common = ["--epochs", "1", "--batch", "8", "--imgsz", "64", "--workers", "0", "--quiet"]
    cnnkit_cli(*args, *common, "--project", str(tmp_path / "runs"), cwd=tmp_path)
    skipped = (tmp_path / "runs" / "detect" / "exp" / "skipped.txt").read_text()
    assert "00001.txt:1" in skipped and "00002.txt:2" in skipped and "00003.png" in skipped
    proc = cnnkit_cli(*args, *common, "--strict", "--project", str(tmp_path / "strict"), ok=False)
    assert proc.returncode == 2 and "00001.txt:1" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_anchor_argument() -> None:
    from cnnkit.workflows.detect import _anchors_arg

    assert _anchors_arg("10,13 16,30; 30,61 62,45") == (
        ((10.0, 13.0), (16.0, 30.0)),
        ((30.0, 61.0), (62.0, 45.0)),
    )


def test_per_class_precision_and_recall_at_the_best_mean_f1() -> None:
    """Class 0: two objects, found once with a false box next to it; class 1: one object, found. The best
    class-mean F1 keeps every detection: P = R = 0.5 for class 0 and 1 for class 1."""
    from cnnkit.tasks.coco_eval import CocoEvaluator

    coco = CocoEvaluator(3)
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], dtype=float)
    dets = np.array([[0, 0, 10, 10], [60, 0, 70, 10], [40, 40, 50, 50]], dtype=float)
    coco.add(gt, np.array([0, 0, 1]), dets, np.array([0.9, 0.8, 0.7]), np.array([0, 0, 1]))
    precision, recall = coco.compute().per_class_pr()
    assert precision[:2] == pytest.approx([0.5, 1.0], abs=1e-3) and recall[:2] == pytest.approx([0.5, 1.0])
    assert np.isnan(precision[2]) and np.isnan(recall[2])  # class 2 has no ground truth
