"""One object per image: localization (class + box, or none) and landmarks (K points): the two task
specs, which share a backbone-plus-head model, and ``predict`` (with drawn boxes and points)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from torch import nn

from cnnkit.api import create_model
from cnnkit.data.classify import split_dataset
from cnnkit.data.images import OutputNames, iter_frames, keep_readable
from cnnkit.data.localize import LandmarkDataset, LocalizationDataset, read_landmarks, read_localization
from cnnkit.data.report import DataReport
from cnnkit.engine.config import TrainConfig
from cnnkit.errors import DataError
from cnnkit.ops.boxes import clip
from cnnkit.tasks.base import TTA, Task
from cnnkit.tasks.localize import LandmarkLoss, LandmarkTask, LocalizationTask, loc_boxes_xyxy
from cnnkit.workflows.common import Loaded, preprocess
from cnnkit.workflows.spec import Labelled, PredictRecord, TaskData, TaskSpec, option, register_task

log = logging.getLogger("cnnkit")
VAL_FRACTION = "seeded validation split when the data has none"
STRICT = "stop at the first bad sample (annotation row or image) instead of skipping it"
PRETRAINED_BACKBONE = "backbone weights: a weights file or a tag (cnnkit models --pretrained); head dropped"
BACKBONE = "a zoo classifier as the backbone (cnnkit models)"
BACKBONE_ARGS = "JSON of backbone arguments, e.g. '{\"width\": 0.25}'"


def _pairs(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


@dataclass(frozen=True)
class LocalizeOptions:
    data: str | None = option(
        None, "a localization CSV/JSON, a folder with train.csv (+ val.csv), or YOLO/COCO/VOC"
    )
    val_fraction: float = option(0.2, VAL_FRACTION)
    backbone: str = option("resnet18", BACKBONE)
    backbone_args: dict[str, Any] | None = option(None, BACKBONE_ARGS)
    pretrained: str | None = option(None, PRETRAINED_BACKBONE)
    fliplr: float = option(0.5, "horizontal flip probability (0 where a mirror image is another class)")
    strict: bool = option(False, STRICT)


@dataclass(frozen=True)
class LandmarkOptions:
    data: str | None = option(None, "a landmark CSV/JSON, or a folder with train.csv (+ val.csv)")
    val_fraction: float = option(0.2, VAL_FRACTION)
    backbone: str = option("resnet18", BACKBONE)
    backbone_args: dict[str, Any] | None = option(None, BACKBONE_ARGS)
    pretrained: str | None = option(None, PRETRAINED_BACKBONE)
    loss: LandmarkLoss = option("smooth_l1", "point regression loss")
    strict: bool = option(False, STRICT)
    flip_pairs: tuple[tuple[int, ...], ...] | None = option(
        None,
        "index pairs swapped by a horizontal flip, e.g. 1,3 36,45",
        parse=_pairs,
        metavar="I,J",
        nargs="+",
    )
    norm_points: tuple[int, int] | None = option(
        None, "the two points whose distance normalises NME (e.g. outer eye corners 36 45)"
    )


@dataclass(frozen=True)
class LocalizePredict:
    conf: float = option(0.5, "objectness threshold")


class _OneObject(TaskSpec):
    """A zoo backbone and one head per image, trained from ``opts.pretrained`` when given."""

    data_help = "default: the training data (its validation split)"
    head: str  # the registered model

    def head_args(self, data: TaskData) -> dict[str, Any]:
        raise NotImplementedError

    def build_model(self, opts: Any, data: TaskData, cfg: TrainConfig) -> nn.Module:
        return create_model(
            self.head,
            backbone=opts.backbone,
            backbone_args=opts.backbone_args,
            backbone_weights=opts.pretrained,
            **self.head_args(data),
        )


@register_task("localize")
class Localize(_OneObject):
    help = "one main object per image: class + box (or none)"
    Options = LocalizeOptions
    PredictOptions = LocalizePredict
    head = "localizer"

    def build_data(
        self, opts: LocalizeOptions, cfg: TrainConfig, names: Sequence[str] | None = None
    ) -> TaskData:
        train, val, found, report = read_localization(
            opts.data or ".", val_fraction=opts.val_fraction, seed=cfg.seed, strict=opts.strict
        )
        train, val = _readable(*_split(train, val, opts.val_fraction, cfg.seed), report, opts.strict)
        labels = {s.label for s in [*train, *val] if s.label is not None}  # a class seen only in val too
        names = list(names or found or sorted(labels))
        if not names:
            raise DataError(f"{opts.data}: no image has an object; a localizer needs at least one class")
        sets = (
            LocalizationDataset(train, names, cfg.square, True, opts.fliplr),
            LocalizationDataset(val, names, cfg.square, False),
        )
        return TaskData(*sets, names, report.skipped())

    def shard_data(self, opts: LocalizeOptions, cfg: TrainConfig, shards: Any) -> TaskData:
        names = list(shards.names)
        make = partial(LocalizationDataset, class_names=names, imgsz=cfg.square)
        train = shards.stream("train", partial(make, train=True, fliplr=opts.fliplr))
        val = shards.stream("val", partial(make, train=False))
        return TaskData(train, val, names, [])

    def head_args(self, data: TaskData) -> dict[str, Any]:
        return {"num_classes": len(data.names or ())}

    def labelled(self, dataset: LocalizationDataset) -> list[Labelled]:
        return [
            Labelled(s.path, [], torch.zeros(0, 4))
            if s.label is None
            else Labelled(s.path, [dataset.index[s.label]], torch.tensor([s.box]))
            for s in dataset.samples
        ]

    def objective(
        self,
        opts: LocalizeOptions,
        data: TaskData,
        model: nn.Module,
        cfg: TrainConfig,
        val_options: Any = None,
    ) -> Task:
        return LocalizationTask(len(data.names or ()))

    def predict(
        self, weights: str, sources: Sequence[str], *, out: str | None, options: Any = None, **kw: Any
    ) -> Iterator[PredictRecord]:
        conf = (options or LocalizePredict()).conf
        for p in predict(weights, "localize", sources, out=out, threshold=conf, **kw):
            box = None if p.box is None else [round(v, 2) for v in p.box]
            data = {"path": p.path, "object_prob": round(p.object_prob, 4), "class": p.label,
                    "class_prob": round(p.class_prob, 4), "box": box, "drawn": p.drawn}  # fmt: skip
            what = f"{p.label} {p.class_prob:.2f} box {box}" if box else f"no object ({p.object_prob:.2f})"
            yield PredictRecord(data, f"{p.path}: {what}")


def _points_record(opts: LandmarkOptions, found: dict[str, Any], num_points: int) -> dict[str, Any]:
    """Flip pairs and the NME pair from ``opts``, else from the file (``found``), and the point count."""
    pairs = opts.flip_pairs if opts.flip_pairs is not None else found.get("flip_pairs", [])
    norm = opts.norm_points or found.get("norm_points")
    return {"flip_pairs": [list(p) for p in pairs], "norm_points": norm, "num_points": num_points}


@register_task("landmarks")
class Landmarks(_OneObject):
    help = "K points per image"
    Options = LandmarkOptions
    head = "landmarker"

    def build_data(
        self, opts: LandmarkOptions, cfg: TrainConfig, names: Sequence[str] | None = None
    ) -> TaskData:
        """Points and their file's options; flip pairs and the NME pair from ``opts`` or else the file."""
        report = DataReport()
        train, val, found = read_landmarks(opts.data or ".", report, opts.strict)
        train, val = _readable(*_split(train, val, opts.val_fraction, cfg.seed), report, opts.strict)
        record = _points_record(opts, found, len(train[0].points) if train else 0)
        pairs = record["flip_pairs"]
        train_set = LandmarkDataset(train, cfg.square, True, pairs)
        val_set = LandmarkDataset(val, cfg.square, False, pairs)
        return TaskData(train_set, val_set, None, report.skipped(), record=record)

    def shard_data(self, opts: LandmarkOptions, cfg: TrainConfig, shards: Any) -> TaskData:
        """Streams; flip pairs and the NME pair from ``opts`` or else what packing found in the file."""
        record = _points_record(opts, shards.record, shards.record["num_points"])
        make = partial(LandmarkDataset, imgsz=cfg.square, flip_pairs=record["flip_pairs"])
        train, val = (
            shards.stream("train", partial(make, train=True)),
            shards.stream("val", partial(make, train=False)),
        )
        return TaskData(train, val, None, [], record=record)

    def head_args(self, data: TaskData) -> dict[str, Any]:
        return {"num_points": data.record["num_points"]}

    def labelled(self, dataset: LandmarkDataset) -> list[Labelled]:
        return [Labelled(s.path, points=s.points, visible=s.visible) for s in dataset.samples]

    def objective(
        self,
        opts: LandmarkOptions,
        data: TaskData,
        model: nn.Module,
        cfg: TrainConfig,
        val_options: Any = None,
    ) -> Task:
        norm = data.record["norm_points"]
        return LandmarkTask(data.record["num_points"], opts.loss, cfg.square, tuple(norm) if norm else None)

    def predict(
        self, weights: str, sources: Sequence[str], *, out: str | None, options: Any = None, **kw: Any
    ) -> Iterator[PredictRecord]:
        for p in predict(weights, "landmarks", sources, out=out, **kw):
            points = [[round(x, 2), round(y, 2)] for x, y in p.points or []]
            yield PredictRecord(
                {"path": p.path, "points": points, "drawn": p.drawn}, f"{p.path}: points {points}"
            )


def _split(
    train: list[Any], val: list[Any] | None, fraction: float, seed: int
) -> tuple[list[Any], list[Any]]:
    if val is not None:
        return train, val
    tr, va = split_dataset(len(train), fraction, seed)
    return [train[i] for i in tr], [train[i] for i in va]


def _readable(
    train: list[Any], val: list[Any], report: DataReport, strict: bool
) -> tuple[list[Any], list[Any]]:
    """Both splits without the samples whose image is missing or unreadable (reported, as in every task)."""
    before = len(report)
    train, val = (keep_readable(x, lambda s: s.path, report, strict) for x in (train, val))
    DataReport(report.items[before:]).log_problems(log)
    for split, samples in (("training", train), ("validation", val)):
        if not samples:
            raise DataError(f"no usable {split} sample is left (see the problems above)")
    return train, val


@dataclass(frozen=True)
class LocPrediction:
    path: str
    object_prob: float
    label: str | None
    class_prob: float
    box: tuple[float, float, float, float] | None  # xyxy pixels of the original image
    points: list[tuple[float, float]] | None  # landmarks, pixels of the original image
    drawn: str | None


@torch.inference_mode()
def predict(
    weights: str | os.PathLike[str],
    task: str,
    sources: Sequence[str | os.PathLike[str]],
    *,
    out: str | os.PathLike[str] | None = None,
    threshold: float = 0.5,
    device: str = "auto",
    fast: bool = True,
    tta: bool | TTA = False,
    ensemble: Sequence[str | os.PathLike[str]] = (),
    loaded: Loaded | None = None,
) -> Iterator[LocPrediction]:
    """Box (or points) per image in the original image's pixels; with ``out``, images with them drawn."""
    session = Loaded.of(weights, task, tta=tta, ensemble=ensemble, device=device, fast=fast, loaded=loaded)
    meta, prepared = session.meta, session.prepared
    imgsz = int(meta["imgsz"])
    out_dir = Path(out) if out is not None else None
    names_out = OutputNames(out_dir)
    for frame in iter_frames(sources):
        image = frame.image
        h, w = image.shape[-2:]
        y = prepared(preprocess(image, imgsz, meta)).float().cpu()
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        if task == "localize":
            p_obj = float(y[0, 0].sigmoid())
            probs = y[0, 5:].softmax(0)
            c = int(probs.argmax())
            found = p_obj >= threshold
            box = tuple(clip(loc_boxes_xyxy(y)[0] * scale, h, w).tolist()) if found else None
            label, points = (meta["class_names"][c] if found else None), None
            pred = LocPrediction(frame.name, p_obj, label, float(probs[c]), box, None, None)  # type: ignore[arg-type]
        else:
            points = [(float(px * w), float(py * h)) for px, py in y[0].tolist()]
            pred = LocPrediction(frame.name, 1.0, None, 1.0, None, points, None)
        if out_dir is not None:
            drawn = names_out.path(frame, ".png")
            draw_prediction(image, pred, drawn)
            pred = LocPrediction(
                pred.path, pred.object_prob, pred.label, pred.class_prob, pred.box, pred.points, str(drawn)
            )
        yield pred


def draw_prediction(image: torch.Tensor, pred: LocPrediction, path: Path) -> None:
    """Draw the box (with class and probabilities) and the landmarks over ``image [3, H, W] uint8``."""
    img = Image.fromarray(image.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(img)
    if pred.box is not None:
        draw.rectangle(pred.box, outline=(255, 64, 64), width=max(1, img.width // 100))
        draw.text(
            (pred.box[0] + 2, pred.box[1] + 1), f"{pred.label} {pred.class_prob:.2f}", fill=(255, 255, 0)
        )
    for i, (px, py) in enumerate(pred.points or []):
        r = max(1.5, img.width / 80)
        draw.ellipse((px - r, py - r, px + r, py + r), fill=(64, 255, 64))
        draw.text((px + r, py - r), str(i), fill=(255, 255, 255))
    img.save(path)
