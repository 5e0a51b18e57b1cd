"""Detection: the task spec (any registered detector; YOLO by default), ``predict`` (drawn boxes,
COCO-style JSON) and ``anchors``.

Data: an ultralytics ``data.yaml`` (or a folder holding one), a COCO instances JSON (``val`` names the
validation JSON; a folder with ``annotations/instances_{train,val}*.json`` works too), or a Pascal VOC
root (``ImageSets/Main/{train,val}.txt``). Without a validation split a seeded fraction is held out.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from torch import nn

from cnnkit.api import create_model
from cnnkit.data.detect import DetSample
from cnnkit.data.detect_dataset import DetAugment, DetectionDataset, check_imgsz, collate, letterbox
from cnnkit.data.formats import BoxData, read_box_data
from cnnkit.data.images import OutputNames, iter_frames
from cnnkit.data.report import DataReport
from cnnkit.engine.config import TrainConfig
from cnnkit.errors import DataError
from cnnkit.inference import OnnxModel
from cnnkit.models.yolo import Neck
from cnnkit.ops.nms import Detections, multiclass_nms
from cnnkit.ops.yolo import AnchorFit, kmeans_anchors
from cnnkit.tasks.base import TTA, Task
from cnnkit.tasks.detect import BoxLoss, DetectionEvaluator, DetectionTask, unletterbox
from cnnkit.viz import box_colour
from cnnkit.workflows.common import Loaded, normalise
from cnnkit.workflows.localize import PRETRAINED_BACKBONE
from cnnkit.workflows.spec import (
    Labelled,
    PredictRecord,
    TaskData,
    TaskSpec,
    ValReport,
    option,
    register_task,
)

log = logging.getLogger("cnnkit")


def _anchors_arg(text: str) -> tuple[tuple[tuple[float, float], ...], ...]:
    """``"10,13 16,30 33,23; 30,61 62,45 59,119"`` (scales separated by ``;``) -> nested tuples."""
    levels = []
    for level in text.split(";"):
        pairs = []
        for pair in level.split():
            w, h = (float(v) for v in pair.split(","))
            pairs.append((w, h))
        levels.append(tuple(pairs))
    return tuple(levels)


@dataclass(frozen=True)
class DetectOptions:
    data: str | None = option(None, "a YOLO data.yaml (or its folder), a COCO instances JSON, or a VOC root")
    val: str | None = option(None, "COCO: the validation JSON")
    val_fraction: float = option(0.2, "seeded validation split when the data has none")
    model: str = option("yolo", "a registered detector (cnnkit models)")
    backbone: str = option("resnet18", "a zoo classifier as the backbone (cnnkit models)")
    backbone_args: dict[str, Any] | None = option(
        None, "JSON of backbone arguments, e.g. '{\"width\": 0.25}'"
    )
    pretrained: str | None = option(None, PRETRAINED_BACKBONE)
    strides: tuple[int, ...] = option((8, 16, 32), "backbone strides to detect at")
    anchors: tuple[tuple[tuple[float, float], ...], ...] | None = option(
        None,
        "'w,h w,h ...; w,h ...' per scale in input pixels (default: k-means on the data)",
        parse=_anchors_arg,
    )
    anchors_per_scale: int = option(3, "anchors fitted per scale")
    neck: Neck = option("pan", "feature pyramid between backbone and heads")
    neck_channels: int | None = option(None, "neck width (default: from the backbone)")
    box_loss: BoxLoss = option("ciou", "box regression loss")
    anchor_iou: float = option(0.5, "an anchor overlapping a box by more is not penalised as background")
    noobj_weight: float = option(0.5, "weight of the background objectness loss")
    scale: tuple[float, float] = option((0.6, 1.4), "random zoom range")
    translate: float = option(0.1, "random shift, fraction of the input size")
    fliplr: float = option(0.5, "horizontal flip probability")
    jitter: float = option(0.3, "colour jitter strength")
    mosaic: float = option(0.0, "probability of a 4-image mosaic")
    strict: bool = option(False, "stop at the first bad annotation instead of skipping the sample")


@dataclass(frozen=True)
class DetectVal:
    val: str | None = option(None, "COCO: the validation JSON")
    conf: float = option(0.001, "score threshold")
    iou: float = option(0.6, "NMS IoU threshold")


@dataclass(frozen=True)
class DetectPredict:
    conf: float = option(0.25, "score threshold")
    iou: float = option(0.45, "NMS IoU threshold")
    max_det: int = option(300, "boxes kept per image")
    agnostic: bool = option(False, "class-agnostic NMS")


@register_task("detect")
class Detect(TaskSpec):
    help = "object detection (YOLO data.yaml, COCO JSON, Pascal VOC)"
    data_help = "default: the training data (its validation split)"
    Options = DetectOptions
    ValOptions = DetectVal
    PredictOptions = DetectPredict
    val_batch = 16

    def build_data(
        self, opts: DetectOptions, cfg: TrainConfig, names: Sequence[str] | None = None
    ) -> TaskData:
        check_imgsz(cfg.square, max(opts.strides))
        ds = read_box_data(
            opts.data or ".", val=opts.val, val_fraction=opts.val_fraction, seed=cfg.seed, strict=opts.strict
        )
        train_set = DetectionDataset(ds.train, cfg.square, True, _augment(opts))
        val_set = DetectionDataset(ds.val, cfg.square, False)
        return TaskData(
            train_set, val_set, list(ds.names), ds.report.skipped(), collate_fn=collate, source=ds
        )

    def shard_data(self, opts: DetectOptions, cfg: TrainConfig, shards: Any) -> TaskData:
        """Streams; anchors are fitted to the box sizes packing sampled (``facts``)."""
        check_imgsz(cfg.square, max(opts.strides))
        train = shards.stream(
            "train", partial(DetectionDataset, imgsz=cfg.square, train=True, augment=_augment(opts))
        )
        val = shards.stream("val", partial(DetectionDataset, imgsz=cfg.square, train=False))
        one = torch.zeros(1, dtype=torch.int64)
        sizes = [DetSample(Path("."), torch.tensor([[0.0, 0.0, w, h]]), one, (1, 1))
                 for w, h in shards.facts.get("box_sizes", [])]  # fmt: skip
        source = BoxData(sizes, [], list(shards.names), DataReport(), "webdataset")
        return TaskData(train, val, list(shards.names), [], collate_fn=collate, source=source)

    def shard_facts(self, data: TaskData) -> dict[str, Any]:
        """Up to 20,000 training boxes' width and height over their image's long side (seeded sample): what
        anchors are fitted to at any input size."""
        sizes = [(b[2:] - b[:2]) / max(s.size) for s in data.train.samples for b in s.boxes]
        picked = random.Random(0).sample(sizes, min(len(sizes), 20_000))
        return {"box_sizes": [[round(float(v), 6) for v in wh] for wh in picked]}

    def labelled(self, dataset: DetectionDataset) -> list[Labelled]:
        return [Labelled(d.path, d.labels.tolist(), boxes=d.boxes) for d in dataset.samples]

    def build_model(self, opts: DetectOptions, data: TaskData, cfg: TrainConfig) -> nn.Module:
        """``opts.model`` on ``opts.backbone`` (initialised from ``opts.pretrained``), with anchors fitted
        to the training boxes unless given."""
        return create_model(
            opts.model,
            num_classes=len(data.names or ()),
            backbone=opts.backbone,
            backbone_args=dict(opts.backbone_args or {}),
            backbone_weights=opts.pretrained,
            strides=opts.strides,
            anchors=_anchors_for(data.source, opts, cfg.square, cfg.seed),
            neck=opts.neck,
            neck_channels=opts.neck_channels,
        )

    def objective(
        self, opts: DetectOptions, data: TaskData, model: nn.Module, cfg: TrainConfig, val_options: Any = None
    ) -> Task:
        thresholds = (
            {} if val_options is None else {"eval_conf": val_options.conf, "eval_iou": val_options.iou}
        )
        return detection_task(model, data.names or [], opts, **thresholds)

    def val_report(self, evaluator: DetectionEvaluator, names: Sequence[str] | None) -> ValReport:
        coco = evaluator.result.stats if evaluator.result else {}
        return ValReport({}, evaluator.per_class(list(names) if names else None), {"coco": coco})

    def predict(
        self, weights: str, sources: Sequence[str], *, out: str | None, options: Any = None, **kw: Any
    ) -> Iterator[PredictRecord]:
        o = options or DetectPredict()
        preds = predict(
            weights, sources, out=out, conf=o.conf, iou=o.iou, max_det=o.max_det, agnostic=o.agnostic, **kw
        )
        for p in preds:
            found = ", ".join(
                f"{lab} {s:.2f} {[round(v, 1) for v in b]}" for b, s, lab in zip(p.boxes, p.scores, p.labels)
            )
            drawn = f" -> {p.drawn}" if p.drawn else ""
            text = f"{p.path}: {len(p.boxes)} objects{': ' + found if found else ''}{drawn}"
            yield PredictRecord({"path": p.path, "results": coco_results([p]), "drawn": p.drawn}, text)

    def predictions_json(self, records: list[PredictRecord]) -> Any:
        """COCO's results format: one entry per box, every image's boxes in one list."""
        return [box for r in records for box in r.data["results"]]


DetectionData = BoxData
read_detection_data = read_box_data  # the name the first release exported


def _augment(opts: DetectOptions) -> DetAugment:
    return DetAugment(
        scale=opts.scale, translate=opts.translate, hflip=opts.fliplr, jitter=opts.jitter, mosaic=opts.mosaic
    )


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


def detection_task(
    model: nn.Module, names: Sequence[str], opts: DetectOptions | None = None, **eval_args: float
) -> DetectionTask:
    opts = opts or DetectOptions()
    return DetectionTask(
        len(names),
        model.anchors,  # type: ignore[arg-type]
        model.strides,  # type: ignore[arg-type]
        box_loss=opts.box_loss,
        anchor_iou=opts.anchor_iou,
        noobj_weight=opts.noobj_weight,
        **eval_args,
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
    tta: bool | TTA = False,
    ensemble: Sequence[str | os.PathLike[str]] = (),
    loaded: Loaded | None = None,
) -> Iterator[DetPrediction]:
    """Detect objects in images (files, folders, globs), one at a time; with ``out``, each image is
    written there with its boxes, classes and scores drawn."""
    session = Loaded.of(
        weights, "detect", tta=tta, ensemble=ensemble, device=device, fast=fast, loaded=loaded
    )
    model, meta, prepared = session.model, session.meta, session.prepared
    names = list(meta["class_names"])
    if isinstance(model, OnnxModel):  # an exported graph: decoded boxes and scores, or NMS'd rows
        detect = partial(_onnx_detections, model.outputs, conf, iou, max_det, agnostic)
    else:
        detect = partial(_detections, detection_task(model, names), conf, iou, max_det, agnostic)
    imgsz = int(meta["imgsz"])
    out_dir = Path(out) if out is not None else None
    names_out = OutputNames(out_dir)
    for frame in iter_frames(sources):
        image = frame.image
        x, info = detector_input(image, imgsz, meta)
        det = detect(prepared(x))
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
            drawn = names_out.path(frame, ".jpg")
            draw_detections(image, pred, drawn)
            pred = DetPrediction(pred.path, pred.boxes, pred.scores, pred.labels, pred.classes, str(drawn))
        yield pred


def detector_input(
    image: torch.Tensor, imgsz: int, meta: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``image [3, H, W] uint8`` as a detector takes it: letterboxed to ``imgsz`` and normalised as in
    training, ``[1, 3, S, S]``, with the letterbox ``info`` that maps boxes back."""
    boxed, _, info = letterbox(image, torch.zeros(0, 4), imgsz)
    return normalise(boxed[None].float() / 255, meta), info


def _detections(
    task: DetectionTask, conf: float, iou: float, max_det: int, agnostic: bool, outputs: Any
) -> Detections:
    return task.postprocess(outputs, conf=conf, iou=iou, max_det=max_det, agnostic=agnostic)[0]


def _onnx_detections(
    names: Sequence[str], conf: float, iou: float, max_det: int, agnostic: bool, outputs: Any
) -> Detections:
    """One image's detections from an exported graph's outputs: ``boxes, scores`` (thresholds and NMS
    applied here), or the ``detections`` rows of a graph exported ``--nms`` (its own thresholds; the
    ``conf`` and ``max_det`` given here filter further)."""
    if list(names) == ["detections"]:
        rows = outputs if isinstance(outputs, torch.Tensor) else outputs[0]
        rows = rows[(rows[:, 0] == 0) & (rows[:, 5] >= conf)]
        rows = rows[rows[:, 5].argsort(descending=True)][:max_det]
        return Detections(rows[:, 1:5].float(), rows[:, 5].float(), rows[:, 6].long())
    boxes, scores = outputs
    return multiclass_nms(
        boxes.float(), scores.float(), conf=conf, iou=iou, max_det=max_det, agnostic=agnostic
    )[0]


def draw_detections(image: torch.Tensor, pred: DetPrediction, path: Path) -> None:
    """Draw boxes with ``class score`` labels over ``image [3, H, W] uint8`` and save it."""
    img = Image.fromarray(image.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(img)
    width = max(1, round(max(img.size) / 200))
    for box, score, label, k in zip(pred.boxes, pred.scores, pred.labels, pred.classes):
        colour = box_colour(k)
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
    ds = read_box_data(data, val_fraction=val_fraction, seed=seed)
    return fit_anchors(ds.train, imgsz, k, seed)
