"""``cnnkit demo``: the main job end to end on built-in data, in a few minutes on two CPU cores."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cnnkit.api import create_model
from cnnkit.summary import summarize

log = logging.getLogger("cnnkit")
DEMO_ZOO = (
    "vgg16",
    "resnet50",
    "googlenet",
    "inception_v3",
    "mobilenet_v1",
    "mobilenet_v2",
    "efficientnet_b0",
)


def zoo_table(names: Sequence[str] = DEMO_ZOO) -> str:
    """Parameters, multiply-adds and receptive field of each model at its default input size."""
    lines = [f"{'model':<18} {'input':>7} {'params':>13} {'MACs':>9} {'RF':>6}"]
    for name in names:
        extra: dict[str, Any] = {"aux_logits": False} if name == "googlenet" else {}
        model = create_model(name, **extra)
        size = getattr(model, "default_imgsz", 224)
        s = summarize(model, size)
        rf = max(r.receptive_field or 0 for r in s.rows)
        lines.append(f"{name:<18} {size:>7} {s.params:>13,} {s.macs / 1e9:>8.2f}G {rf:>6}")
    return "\n".join(lines)


def run_demo(out: str | os.PathLike[str] = "runs/demo") -> int:
    """Zoo summary, then built-in digits -> train a classifier -> validate -> predict."""
    from cnnkit.data.builtin import write_classification
    from cnnkit.engine import TrainConfig
    from cnnkit.workflows import classify, run

    root = Path(out)
    start = time.perf_counter()
    print("== 1. The architecture zoo (parameters and multiply-adds from `cnnkit summary`)")
    print(zoo_table())

    print("\n== 2. Classification on built-in digits (scikit-learn's digits on varied backgrounds)")
    data = root / "digits"
    if not (data / "val").is_dir():
        write_classification(data, seed=0)
    print(f"data: {data} (ImageFolder layout, train/ and val/)")
    cfg = TrainConfig(epochs=8, batch=32, imgsz=32, lr=3e-3, workers=1)
    result = run.train(
        "classify",
        data,
        model="resnet18",
        model_args={"width": 0.25},
        fliplr=0.0,
        crop_fraction=1.0,
        cfg=cfg,
        project=root,
        name="digits",
    )
    metrics = run.val(result.best, data / "val", workers=1).metrics
    print(
        f"validation: top-1 {metrics['top1']:.3f}, top-5 {metrics['top5']:.3f}, "
        f"precision {metrics['precision']:.3f}, recall {metrics['recall']:.3f}"
    )
    samples = [sorted((data / "val" / c).glob("*.png"))[0] for c in ("three", "seven", "zero")]
    for p in classify.predict(result.best, samples, topk=3):
        print(f"predict {Path(p.path).relative_to(data)}: " + ", ".join(f"{c} {v:.2f}" for c, v in p.topk))

    classify_run = result.run_dir
    seg_run, seg_pred = _segmentation(root)
    loc_run = _localization(root, result.best)
    det_run = _detection(root, result.best)

    from cnnkit.engine.loops import new_run_dir
    from cnnkit.workflows.explain import explain

    explained = new_run_dir(root / "explain", "classify")
    for e in explain(result.best, samples, out=explained):
        print(f"explain {Path(e.path).relative_to(data)}: Grad-CAM of {e.targets[0].label} -> {e.drawn}")

    print(f"\nDone in {time.perf_counter() - start:.0f} s. Results (weights, then the pictures to look at):")
    for task, run_dir, what, drawn in (
        ("classifier", classify_run, "Grad-CAM heat maps", explained),
        ("segmenter", seg_run, "drawn predictions", seg_pred / "overlays"),
        ("localizer", loc_run, "drawn predictions", loc_run / "predict"),
        ("detector", det_run, "drawn predictions", det_run / "predict"),
    ):
        print(f"  {task:<12} {run_dir / 'weights' / 'best.safetensors'}")
        print(f"  {'':<12} {_pictures(run_dir)}")
        print(f"  {'':<12} {what} in {drawn}")
    print(f"Try: cnnkit predict classify --weights {result.best} {data / 'val' / 'four'}")
    print(f"     cnnkit explain --weights {result.best} {data / 'val' / 'four'}")
    return 0


PICTURES = ("results.png", "train_batch0.jpg", "val_pred.jpg", "confusion_matrix.png", "pr_curve.png")


def _pictures(run_dir: Path) -> str:
    """The pictures a run drew."""
    found = [name for name in PICTURES if (run_dir / name).is_file()]
    return f"pictures in {run_dir}: {', '.join(found) or 'none'}"


def _localization(root: Path, classifier: Path) -> Path:
    """Built-in single-digit scenes -> a localizer whose backbone starts from the digit classifier."""
    from cnnkit.data.builtin import write_localization
    from cnnkit.engine import TrainConfig
    from cnnkit.workflows import localize, run

    print(
        "\n== 4. Object localization: [p_c, b_x, b_y, b_h, b_w, c_1..c_10], backbone from step 2's classifier"
    )
    data = root / "digit-boxes"
    if not (data / "train.csv").is_file():
        write_localization(data, seed=0)
    cfg = TrainConfig(epochs=16, batch=32, imgsz=64, lr=3e-3, workers=1)
    result = run.train(
        "localize",
        data,
        backbone="resnet18",
        backbone_args={"width": 0.25},
        pretrained=str(classifier),
        fliplr=0.0,  # a mirrored digit is not the same digit
        cfg=cfg,
        project=root,
        name="digit-boxes",
    )
    m = result.metrics
    print(
        f"validation: object/no-object accuracy {m['obj_acc']:.3f}, class accuracy {m['cls_acc']:.3f}, "
        f"mean IoU {m['miou']:.3f}, accuracy at IoU>=0.5 {m['acc_iou50']:.3f}"
    )
    samples = sorted((data / "images" / "val").glob("*.png"))[:3]
    for p in localize.predict(result.best, "localize", samples, out=result.run_dir / "predict"):
        print(f"predict {Path(p.path).name}: {p.label} (p_c {p.object_prob:.2f}) box {_fmt_box(p.box)}")
    return result.run_dir


def _detection(root: Path, classifier: Path) -> Path:
    """Built-in scenes of 1-3 digits -> a YOLO detector (backbone from the classifier) -> COCO mAP."""
    from cnnkit.data.builtin import write_detection
    from cnnkit.engine import TrainConfig
    from cnnkit.workflows import detect, run

    print("\n== 5. Object detection: YOLO grids at strides 8 and 16, k-means anchors, NMS, COCO mAP")
    data = root / "digit-detect"
    if not (data / "data.yaml").is_file():
        write_detection(data, seed=0)
    print(f"data: {data} (ultralytics data.yaml + labels/, and the same boxes as COCO JSON)")
    cfg = TrainConfig(epochs=20, batch=32, imgsz=96, lr=8e-3, optimizer="adamw", warmup_epochs=1, workers=1)
    result = run.train(
        "detect",
        data,
        backbone="resnet18",
        backbone_args={"width": 0.25},
        strides=(8, 16),
        pretrained=str(classifier),
        cfg=cfg,
        project=root,
        name="digit-detect",
    )
    metrics = run.val(result.best, data, workers=1).metrics
    print(
        f"validation: mAP@0.5 {metrics['mAP50']:.3f}, mAP@[.5:.95] {metrics['mAP']:.3f}, "
        f"precision {metrics['precision']:.3f}, recall {metrics['recall']:.3f} (at the best F1)"
    )
    samples = sorted((data / "images" / "val").glob("*.png"))[:3]
    for p in detect.predict(result.best, samples, out=result.run_dir / "predict"):
        found = ", ".join(f"{lab} {s:.2f} {_fmt_box(b)}" for b, s, lab in zip(p.boxes, p.scores, p.labels))
        print(f"predict {Path(p.path).name}: {found or 'nothing'}")
    return result.run_dir


def _fmt_box(box: tuple[float, ...] | None) -> str:
    return "none" if box is None else "(" + ", ".join(f"{v:.0f}" for v in box) + ")"


def _segmentation(root: Path) -> tuple[Path, Path]:
    """Built-in scenes of textured objects -> train a small U-Net keeping the aspect ratio -> validate at
    full resolution -> predict masks and overlays."""
    from cnnkit.data.scenes import write_scenes
    from cnnkit.engine import TrainConfig
    from cnnkit.workflows import run

    print("\n== 3. Semantic segmentation with a U-Net (discs, boxes and triangles; void outlines ignored)")
    data = root / "scenes"
    if not (data / "data.yaml").is_file():
        write_scenes(data, seed=0)
    print(f"data: {data} (images/ + masks/ with train/ and val/, 96x128 images, index PNG masks, data.yaml)")
    cfg = TrainConfig(epochs=10, batch=16, imgsz=64, lr=5e-3, workers=1)
    result = run.train(
        "segment",
        data,
        model="unet_same",
        model_args={"base": 16, "depth": 3},
        rect=True,
        cfg=cfg,
        project=root,
        name="scenes",
    )
    report = run.val(result.best, data, workers=1)
    metrics, background = report.metrics, report.per_class[0]
    print(
        f"validation (at the images' own 96x128): mIoU {metrics['miou']:.3f}, pixel accuracy "
        f"{metrics['pixel_acc']:.3f}, {background['class']} IoU {background['iou']:.3f}"
    )
    out = result.run_dir / "predict"
    samples = sorted((data / "images" / "val").glob("*.jpg"))[:4]
    for record in run.predict(result.best, samples, out=out):
        found = ", ".join(record.data["classes"])
        print(f"predict {Path(record.data['path']).name}: {found} -> {record.data['overlay']}")
    return result.run_dir, out
