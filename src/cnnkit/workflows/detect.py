"""Detection verbs: ``train``, ``val``, ``predict`` (drawn boxes, COCO-style JSON) and ``anchors``.

Data: an ultralytics ``data.yaml`` (or a folder holding one), a COCO instances JSON (``--val`` names the
validation JSON; a folder with ``annotations/instances_{train,val}*.json`` works too), or a Pascal VOC
root (``ImageSets/Main/{train,val}.txt``). Without a validation split a seeded fraction is held out.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from torch import nn

from cnnkit.api import create_model
from cnnkit.data.detect import DetSample
from cnnkit.data.detect_dataset import DetAugment, DetectionDataset, check_imgsz, collate, letterbox
from cnnkit.data.formats import BoxData, read_box_data
from cnnkit.data.images import iter_frames
from cnnkit.engine.callbacks import Callback
from cnnkit.engine.config import TrainConfig, config_from_dict
from cnnkit.engine.device import select_device
from cnnkit.engine.trainer import FitResult, fit, new_run_dir, seed_everything
from cnnkit.errors import DataError
from cnnkit.inference import prepare
from cnnkit.models.yolo import Neck
from cnnkit.ops.yolo import AnchorFit, kmeans_anchors
from cnnkit.tasks.detect import BoxLoss, DetectionEvaluator, DetectionTask, unletterbox
from cnnkit.workflows.common import (
    evaluate_dataset,
    load_task_model,
    rebuild_model,
    record_skipped,
    resume_point,
)
from cnnkit.workflows.record import RunRecord

log = logging.getLogger("cnnkit")


@dataclass(frozen=True)
class DetectOptions:
    """Model and loss options of a detection run (the engine's are in :class:`TrainConfig`)."""

    model: str = "yolo"  # a registered detector taking a backbone, strides and anchors
    backbone: str = "resnet18"
    backbone_args: dict[str, Any] = field(default_factory=dict)
    strides: tuple[int, ...] = (8, 16, 32)
    anchors_per_scale: int = 3
    anchors: tuple[tuple[tuple[float, float], ...], ...] | None = None  # None: k-means on the data
    neck: Neck = "pan"
    neck_channels: int | None = None
    box_loss: BoxLoss = "ciou"
    anchor_iou: float = 0.5
    noobj_weight: float = 0.5
    augment: DetAugment = field(default_factory=DetAugment)
    strict: bool = False  # stop at the first bad annotation instead of skipping the sample


DetectionData = BoxData
read_detection_data = read_box_data  # the name the first release exported


def letterboxed_sizes(samples: Sequence[DetSample], imgsz: int) -> torch.Tensor:
    """``[N, 2]`` widths and heights of every box after letterboxing its image to ``imgsz``."""
    sizes = [(s.boxes[:, 2:] - s.boxes[:, :2]) * (imgsz / max(s.size)) for s in samples if len(s.boxes)]
    return torch.cat(sizes) if sizes else torch.zeros(0, 2)


def fit_anchors(samples: Sequence[DetSample], imgsz: int, k: int, seed: int = 0) -> AnchorFit:
    """YOLOv2 dimension clusters of the training boxes at the network's input size."""
    wh = letterboxed_sizes(samples, imgsz)
    if len(wh) < k:
        raise DataError(f"only {len(wh)} boxes in the training data; cannot fit {k} anchors (pass anchors)")
    return kmeans_anchors(wh, k, seed=seed)


def _anchors_for(data: DetectionData, opts: DetectOptions, imgsz: int, seed: int) -> list[list[list[float]]]:
    if opts.anchors is not None:
        return [[list(a) for a in level] for level in opts.anchors]
    levels, per = len(opts.strides), opts.anchors_per_scale
    fitted = fit_anchors(data.train, imgsz, levels * per, seed)
    log.info(
        "anchors (k-means, 1 - IoU) at %d px: mean best IoU %.3f: %s",
        imgsz,
        fitted.mean_iou,
        ", ".join(f"{w:.0f}x{h:.0f}" for w, h in fitted.anchors.tolist()),
    )
    a = [[round(w, 2), round(h, 2)] for w, h in fitted.anchors.tolist()]  # sorted by area
    return [a[i * per : (i + 1) * per] for i in range(levels)]


def _task(model: nn.Module, names: Sequence[str], opts: DetectOptions, **eval_args: float) -> DetectionTask:
    return DetectionTask(
        len(names),
        model.anchors,  # type: ignore[arg-type]
        model.strides,  # type: ignore[arg-type]
        box_loss=opts.box_loss,
        anchor_iou=opts.anchor_iou,
        noobj_weight=opts.noobj_weight,
        **eval_args,
    )


def _datasets(
    data: DetectionData, imgsz: int, opts: DetectOptions
) -> tuple[DetectionDataset, DetectionDataset]:
    return DetectionDataset(data.train, imgsz, True, opts.augment), DetectionDataset(data.val, imgsz, False)


def _report_data(data: DetectionData, source: str) -> None:
    log.info(
        "%s: %d training and %d validation images, %d classes; %s",
        source,
        len(data.train),
        len(data.val),
        len(data.names),
        data.report.summary(),
    )
    for line in data.report.problems[:20]:
        log.warning("%s", line)
    if len(data.report.problems) > 20:
        log.warning("... and %d more problems (see skipped.txt)", len(data.report.problems) - 20)


def train(
    data: str | os.PathLike[str],
    *,
    val: str | os.PathLike[str] | None = None,
    opts: DetectOptions = DetectOptions(),
    pretrained: str | os.PathLike[str] | None = None,
    cfg: TrainConfig | None = None,
    val_fraction: float = 0.2,
    project: str | os.PathLike[str] = "runs",
    name: str = "exp",
    resume: str | os.PathLike[str] | None = None,
    callbacks: Sequence[Callback] = (),
) -> FitResult:
    """Train a detector (``opts.model``, YOLO by default) on ``data``; ``pretrained`` initialises the
    backbone (a classifier's weights, its head dropped). Anchors are fitted to the data unless
    ``opts.anchors`` gives them."""
    if resume is not None:
        return _resume(resume)
    cfg = cfg or TrainConfig()
    check_imgsz(cfg.imgsz, max(opts.strides))
    seed_everything(cfg.seed)
    ds = read_detection_data(data, val=val, val_fraction=val_fraction, seed=cfg.seed, strict=opts.strict)
    _report_data(ds, str(data))
    net = create_model(
        opts.model,
        num_classes=len(ds.names),
        backbone=opts.backbone,
        backbone_args=opts.backbone_args,
        backbone_weights=None if pretrained is None else str(pretrained),
        strides=opts.strides,
        anchors=_anchors_for(ds, opts, cfg.imgsz, cfg.seed),
        neck=opts.neck,
        neck_channels=opts.neck_channels,
    )
    config: dict[str, Any] = net.cnnkit_config  # type: ignore[assignment]
    config["args"].pop("backbone_weights", None)  # weights come from the checkpoint from now on
    train_set, val_set = _datasets(ds, cfg.imgsz, opts)
    run_dir = new_run_dir(project, "detect", name)
    record_skipped(run_dir, ds.report.skipped())
    meta = RunRecord.new(
        "detect",
        config,
        cfg,
        class_names=ds.names,
        data=str(data),
        val=None if val is None else str(val),
        val_fraction=val_fraction,
        options=_options_dict(opts),
    ).to_metadata()
    task = _task(net, ds.names, opts)
    return fit(
        task, net, train_set, val_set, cfg, run_dir, metadata=meta, collate_fn=collate, callbacks=callbacks
    )


def _options_dict(opts: DetectOptions) -> dict[str, Any]:
    d = {k: v for k, v in opts.__dict__.items() if k != "augment"}
    d["augment"] = dict(opts.augment.__dict__)
    return d


def _options(d: dict[str, Any]) -> DetectOptions:
    anchors = d["anchors"]
    anchors_t = tuple(tuple(tuple(a) for a in level) for level in anchors) if anchors else None
    augment = config_from_dict(DetAugment, d["augment"], "options.augment")
    return config_from_dict(DetectOptions, {**d, "anchors": anchors_t, "augment": augment}, "options")


def _resume(resume: str | os.PathLike[str]) -> FitResult:
    last, meta, cfg = resume_point(resume)
    opts = _options(meta["options"])
    ds = read_detection_data(
        meta["data"],
        val=meta.get("val"),
        val_fraction=meta["val_fraction"],
        seed=cfg.seed,
        strict=opts.strict,
    )
    net = rebuild_model(meta)
    train_set, val_set = _datasets(ds, cfg.imgsz, opts)
    task = _task(net, meta["class_names"], opts)
    return fit(
        task, net, train_set, val_set, cfg, last.parent.parent, resume=last, metadata=meta, collate_fn=collate
    )


def load_detector(weights: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    return load_task_model(weights, "detect")


def val(
    weights: str | os.PathLike[str],
    data: str | os.PathLike[str] | None = None,
    *,
    val_data: str | os.PathLike[str] | None = None,
    batch: int = 16,
    imgsz: int | None = None,
    device: str = "auto",
    workers: int = 2,
    conf: float = 0.001,
    iou: float = 0.6,
    fast: bool = True,
) -> tuple[dict[str, float], DetectionEvaluator]:
    """COCO metrics on the validation split of ``data`` (default: the training data's)."""
    model, meta = load_detector(weights)
    opts = _options(meta["options"])
    source = data or meta["data"]
    seed = int(meta["train_config"]["seed"])
    ds = read_detection_data(
        source,
        val=val_data or (meta.get("val") if data is None else None),
        val_fraction=meta["val_fraction"],
        seed=seed,
    )
    _report_data(ds, str(source))
    val_set = DetectionDataset(ds.val, imgsz or int(meta["imgsz"]), False)
    task = _task(model, meta["class_names"], opts, eval_conf=conf, eval_iou=iou)
    return evaluate_dataset(
        task, model, val_set, batch=batch, device=device, workers=workers, fast=fast, collate_fn=collate
    )


@dataclass(frozen=True)
class DetPrediction:
    path: str
    boxes: list[tuple[float, float, float, float]]  # xyxy pixels of the original image
    scores: list[float]
    labels: list[str]
    classes: list[int]
    drawn: str | None = None


@torch.inference_mode()
def predict(
    weights: str | os.PathLike[str],
    sources: Sequence[str | os.PathLike[str]],
    *,
    out: str | os.PathLike[str] | None = None,
    conf: float = 0.25,
    iou: float = 0.45,
    max_det: int = 300,
    agnostic: bool = False,
    device: str = "auto",
    fast: bool = True,
) -> Iterator[DetPrediction]:
    """Detect objects in images (files, folders, globs), one at a time; with ``out``, each image is
    written there with its boxes, classes and scores drawn."""
    model, meta = load_detector(weights)
    opts = _options(meta["options"])
    names = list(meta["class_names"])
    task = _task(model, names, opts)
    prepared = prepare(model, select_device(device), fast)
    imgsz = int(meta["imgsz"])
    mean = torch.tensor(meta["mean"]).view(3, 1, 1)
    std = torch.tensor(meta["std"]).view(3, 1, 1)
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    for frame in iter_frames(sources):
        image = frame.image
        boxed, _, info = letterbox(image, torch.zeros(0, 4), imgsz)
        outputs = prepared(((boxed.float() / 255 - mean) / std)[None])
        det = task.postprocess(
            [o.float() for o in outputs], conf=conf, iou=iou, max_det=max_det, agnostic=agnostic
        )[0]
        boxes = unletterbox(det.boxes.cpu(), info)
        classes = det.labels.cpu().tolist()
        pred = DetPrediction(
            frame.name,
            [tuple(b) for b in boxes.tolist()],  # type: ignore[misc]
            det.scores.cpu().tolist(),
            [names[c] for c in classes],
            classes,
        )
        if out_dir is not None:
            drawn = out_dir / f"{frame.stem}.jpg"
            draw_detections(image, pred, drawn)
            pred = DetPrediction(pred.path, pred.boxes, pred.scores, pred.labels, pred.classes, str(drawn))
        yield pred


def _colour(k: int) -> tuple[int, int, int]:
    palette = ((255, 56, 56), (72, 249, 10), (0, 194, 255), (255, 157, 151), (146, 204, 23), (255, 178, 29),
               (132, 56, 255), (0, 212, 187), (255, 55, 199), (61, 219, 134))  # fmt: skip
    return palette[k % len(palette)]


def draw_detections(image: torch.Tensor, pred: DetPrediction, path: Path) -> None:
    """Draw boxes with ``class score`` labels over ``image [3, H, W] uint8`` and save it."""
    img = Image.fromarray(image.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(img)
    width = max(1, round(max(img.size) / 200))
    for box, score, label, k in zip(pred.boxes, pred.scores, pred.labels, pred.classes):
        colour = _colour(k)
        draw.rectangle(box, outline=colour, width=width)
        text = f"{label} {score:.2f}"
        tx, ty = box[0], max(0.0, box[1] - 11)
        draw.rectangle(draw.textbbox((tx, ty), text), fill=colour)
        draw.text((tx, ty), text, fill=(255, 255, 255))
    img.save(path, quality=92)


def coco_results(
    preds: Sequence[DetPrediction], category_ids: Sequence[int] | None = None
) -> list[dict[str, Any]]:
    """COCO results format (``image_id``, ``category_id``, ``bbox`` as x, y, w, h, ``score``); the image id
    is the file stem when it is a number (COCO's file naming), else the file name."""
    results = []
    for p in preds:
        stem = Path(p.path).stem
        image_id: int | str = int(stem) if stem.isdigit() else Path(p.path).name
        for (x1, y1, x2, y2), score, k in zip(p.boxes, p.scores, p.classes):
            results.append(
                {
                    "image_id": image_id,
                    "file_name": p.path,
                    "category_id": category_ids[k] if category_ids else k,
                    "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
                    "score": round(score, 5),
                }
            )
    return results


def anchors(
    data: str | os.PathLike[str], k: int = 9, *, imgsz: int = 640, seed: int = 0, val_fraction: float = 0.2
) -> AnchorFit:
    """k-means anchors (distance 1 - IoU) of a dataset's training boxes, letterboxed to ``imgsz``."""
    ds = read_detection_data(data, val_fraction=val_fraction, seed=seed)
    return fit_anchors(ds.train, imgsz, k, seed)
