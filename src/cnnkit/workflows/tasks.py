"""The built-in task specs: classify, segment, detect, localize, landmarks. Each ``Options`` dataclass is
the task's command-line and YAML vocabulary; the work is done by the task's workflow module."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from cnnkit.engine.callbacks import Callback
from cnnkit.engine.config import TrainConfig
from cnnkit.engine.trainer import FitResult
from cnnkit.models.yolo import Neck
from cnnkit.tasks.detect import BoxLoss
from cnnkit.tasks.localize import LandmarkLoss
from cnnkit.tasks.segment import SegLoss
from cnnkit.weights import read_metadata
from cnnkit.workflows.spec import PredictRecord, TaskSpec, ValReport, option, register_task

VAL_FRACTION = "seeded validation split when the data has none"
PRETRAINED_BACKBONE = "backbone weights (cnnkit/torchvision/timm; a classifier's head is dropped)"
BACKBONE = "a zoo classifier as the backbone (cnnkit models)"
BACKBONE_ARGS = "JSON of backbone arguments, e.g. '{\"width\": 0.25}'"


def _names(weights: str) -> list[str] | None:
    return read_metadata(weights).get("class_names")


def _pairs(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _anchors(text: str) -> tuple[tuple[tuple[float, float], ...], ...]:
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
class ClassifyOptions:
    data: str | None = option(None, "train/ + val/ class folders, one class-folder root, or a path,label CSV")
    val: str | None = option(None, "an explicit validation folder or CSV")
    val_fraction: float = option(0.2, VAL_FRACTION)
    model: str = option("resnet18", "a registered model name (cnnkit models)")
    model_args: dict[str, Any] | None = option(None, "JSON of builder arguments, e.g. '{\"width\": 0.5}'")
    pretrained: str | None = option(None, "cnnkit/torchvision/timm weights, or 'torchvision' to download")
    freeze: bool = option(False, "freeze the base (BatchNorm in inference mode)")
    unfreeze_last: int = option(0, "base blocks (from the end) to train too")
    trainable: tuple[str, ...] = option((), "base layers to train by name (e.g. stages.3)")
    fine_tune_epochs: int = option(0, "stage 2 (fine-tuning the last blocks) after the frozen stage 1")
    fine_tune_lr_factor: float = option(0.1, "stage 2 learning rate, as a fraction of --lr")
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy")
    fliplr: float = option(0.5, "horizontal flip probability")
    crop_fraction: float = option(0.875, "evaluation: centre crop of the resized image")


@dataclass(frozen=True)
class ClassifyPredict:
    topk: int = option(5, "classes shown per image")


@register_task("classify")
class Classify(TaskSpec):
    help = "image classification (class folders or a path,label CSV)"
    data_help = "class folders, a dataset root (its val split) or a CSV"
    Options = ClassifyOptions
    val_batch = 64
    PredictOptions = ClassifyPredict

    def train(
        self,
        opts: ClassifyOptions,
        cfg: TrainConfig,
        *,
        project: str | os.PathLike[str],
        name: str,
        callbacks: Sequence[Callback] = (),
    ) -> FitResult:
        from cnnkit.data.transforms import AugmentConfig
        from cnnkit.workflows import classify

        transfer = classify.TransferConfig(
            opts.freeze, opts.unfreeze_last, opts.trainable, opts.fine_tune_epochs, opts.fine_tune_lr_factor
        )
        return classify.train(
            opts.data,  # type: ignore[arg-type]
            model=opts.model,
            val=opts.val,
            val_fraction=opts.val_fraction,
            pretrained=opts.pretrained,
            transfer=transfer,
            cfg=cfg,
            augment=AugmentConfig(hflip=opts.fliplr, crop_fraction=opts.crop_fraction),
            label_smoothing=opts.label_smoothing,
            model_args=opts.model_args,
            project=project,
            name=name,
            callbacks=callbacks,
        )

    def resume(self, run: str | os.PathLike[str]) -> FitResult:
        from cnnkit.workflows import classify

        return classify.train(".", resume=run)

    def val(self, weights: str, data: str | None, *, options: Any = None, **kw: Any) -> ValReport:
        from cnnkit.workflows import classify

        metrics, evaluator = classify.val(weights, data, **kw)
        return ValReport(metrics, evaluator.per_class(_names(weights)))

    def predict(
        self, weights: str, sources: Sequence[str], *, out: str | None, options: Any = None, **kw: Any
    ) -> Iterator[PredictRecord]:
        from cnnkit.workflows import classify

        topk = (options or ClassifyPredict()).topk
        for p in classify.predict(weights, sources, topk=topk, out=out, **kw):
            top = [{"class": c, "prob": round(v, 4)} for c, v in p.topk]
            text = ", ".join(f"{c} {v:.3f}" for c, v in p.topk)
            yield PredictRecord({"path": p.path, "topk": top, "drawn": p.drawn}, f"{p.path}: {text}")


@dataclass(frozen=True)
class SegmentOptions:
    data: str | None = option(
        None, "images/ + masks/ (or labels/, annotations/...), train/val splits, or VOC"
    )
    val_fraction: float = option(0.2, VAL_FRACTION)
    model: str = option("unet_same", "unet, unet_same, unet_course, unet_<encoder> (cnnkit models)")
    model_args: dict[str, Any] | None = option(None, "JSON of builder arguments, e.g. '{\"base\": 16}'")
    pretrained: str | None = option(None, "cnnkit weights of the same model")
    loss: SegLoss = option("ce+dice", "training loss")
    class_weights: tuple[float, ...] | None = option(None, "cross-entropy weight of each class")
    binary: bool = option(False, "two classes as one sigmoid channel")
    fliplr: float = option(0.5, "horizontal flip probability")
    strict: bool = option(False, "stop at the first bad image/mask pair instead of skipping it")


@register_task("segment")
class Segment(TaskSpec):
    help = "semantic segmentation (image and mask folders, Pascal VOC)"
    data_help = "the dataset root (default: the training data); its validation split is used"
    Options = SegmentOptions
    val_batch = 16

    def train(
        self,
        opts: SegmentOptions,
        cfg: TrainConfig,
        *,
        project: str | os.PathLike[str],
        name: str,
        callbacks: Sequence[Callback] = (),
    ) -> FitResult:
        from cnnkit.workflows import segment

        seg = segment.SegmentOptions(
            loss=opts.loss,
            class_weights=opts.class_weights or None,
            binary=opts.binary,
            hflip=opts.fliplr,
            strict=opts.strict,
        )
        return segment.train(
            opts.data,  # type: ignore[arg-type]
            model=opts.model,
            model_args=opts.model_args,
            pretrained=opts.pretrained,
            cfg=cfg,
            opts=seg,
            val_fraction=opts.val_fraction,
            project=project,
            name=name,
            callbacks=callbacks,
        )

    def resume(self, run: str | os.PathLike[str]) -> FitResult:
        from cnnkit.workflows import segment

        return segment.train(".", resume=run)

    def val(self, weights: str, data: str | None, *, options: Any = None, **kw: Any) -> ValReport:
        from cnnkit.workflows import segment

        metrics, evaluator = segment.val(weights, data, **kw)
        names = _names(weights) or [str(i) for i in range(evaluator.num_classes)]
        per = {k: v.tolist() for k, v in evaluator.per_class().items()}
        rows = [
            {"class": n, **{k: round(float(v[i]), 6) for k, v in per.items()}} for i, n in enumerate(names)
        ]
        return ValReport(metrics, rows)

    def predict(
        self, weights: str, sources: Sequence[str], *, out: str | None, options: Any = None, **kw: Any
    ) -> Iterator[PredictRecord]:
        from cnnkit.workflows import segment

        names = _names(weights)
        for p in segment.predict(weights, sources, out=out, **kw):
            ids = sorted(int(c) for c in set(p.mask.flatten().tolist()))
            classes = [names[c] if names and c < len(names) else str(c) for c in ids]
            data = {"path": p.path, "classes": classes, "mask": p.mask_file, "overlay": p.overlay_file}
            yield PredictRecord(data, f"{p.path}: {', '.join(classes)} -> {p.mask_file}")


@dataclass(frozen=True)
class DetectOptions:
    data: str | None = option(None, "a YOLO data.yaml (or its folder), a COCO instances JSON, or a VOC root")
    val: str | None = option(None, "COCO: the validation JSON")
    val_fraction: float = option(0.2, VAL_FRACTION)
    model: str = option("yolo", "a registered detector (cnnkit models)")
    backbone: str = option("resnet18", BACKBONE)
    backbone_args: dict[str, Any] | None = option(None, BACKBONE_ARGS)
    pretrained: str | None = option(None, PRETRAINED_BACKBONE)
    strides: tuple[int, ...] = option((8, 16, 32), "backbone strides to detect at")
    anchors: tuple[tuple[tuple[float, float], ...], ...] | None = option(
        None,
        "'w,h w,h ...; w,h ...' per scale in input pixels (default: k-means on the data)",
        parse=_anchors,
    )
    anchors_per_scale: int = option(3, "anchors fitted per scale")
    neck: Neck = option("pan", "feature pyramid between backbone and heads")
    neck_channels: int | None = option(None, "neck width (default: from the backbone)")
    box_loss: BoxLoss = option("ciou", "box regression loss")
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
    val_batch = 16
    ValOptions = DetectVal
    PredictOptions = DetectPredict

    def train(
        self,
        opts: DetectOptions,
        cfg: TrainConfig,
        *,
        project: str | os.PathLike[str],
        name: str,
        callbacks: Sequence[Callback] = (),
    ) -> FitResult:
        from cnnkit.workflows import detect

        augment = detect.DetAugment(
            scale=opts.scale,
            translate=opts.translate,
            hflip=opts.fliplr,
            jitter=opts.jitter,
            mosaic=opts.mosaic,
        )
        det = detect.DetectOptions(
            model=opts.model,
            backbone=opts.backbone,
            backbone_args=dict(opts.backbone_args or {}),
            strides=opts.strides,
            anchors_per_scale=opts.anchors_per_scale,
            anchors=opts.anchors,
            neck=opts.neck,
            neck_channels=opts.neck_channels,
            box_loss=opts.box_loss,
            augment=augment,
            strict=opts.strict,
        )
        return detect.train(
            opts.data,  # type: ignore[arg-type]
            val=opts.val,
            opts=det,
            pretrained=opts.pretrained,
            cfg=cfg,
            val_fraction=opts.val_fraction,
            project=project,
            name=name,
            callbacks=callbacks,
        )

    def resume(self, run: str | os.PathLike[str]) -> FitResult:
        from cnnkit.workflows import detect

        return detect.train(".", resume=run)

    def val(self, weights: str, data: str | None, *, options: Any = None, **kw: Any) -> ValReport:
        from cnnkit.workflows import detect

        o = options or DetectVal()
        metrics, evaluator = detect.val(weights, data, val_data=o.val, conf=o.conf, iou=o.iou, **kw)
        coco = evaluator.result.stats if evaluator.result else {}
        return ValReport(metrics, evaluator.per_class(_names(weights)), {"coco": coco})

    def predict(
        self, weights: str, sources: Sequence[str], *, out: str | None, options: Any = None, **kw: Any
    ) -> Iterator[PredictRecord]:
        from cnnkit.workflows import detect

        o = options or DetectPredict()
        preds = detect.predict(
            weights, sources, out=out, conf=o.conf, iou=o.iou, max_det=o.max_det, agnostic=o.agnostic, **kw
        )
        for p in preds:
            found = ", ".join(
                f"{lab} {s:.2f} {[round(v, 1) for v in b]}" for b, s, lab in zip(p.boxes, p.scores, p.labels)
            )
            drawn = f" -> {p.drawn}" if p.drawn else ""
            text = f"{p.path}: {len(p.boxes)} objects{': ' + found if found else ''}{drawn}"
            yield PredictRecord({"path": p.path, "results": detect.coco_results([p]), "drawn": p.drawn}, text)

    def predictions_json(self, records: list[PredictRecord]) -> Any:
        """COCO's results format: one entry per box, every image's boxes in one list."""
        return [box for r in records for box in r.data["results"]]


@dataclass(frozen=True)
class LocalizeOptions:
    data: str | None = option(
        None, "a localization CSV/JSON, a folder with train.csv (+ val.csv), or YOLO/COCO/VOC"
    )
    val_fraction: float = option(0.2, VAL_FRACTION)
    backbone: str = option("resnet18", BACKBONE)
    backbone_args: dict[str, Any] | None = option(None, BACKBONE_ARGS)
    pretrained: str | None = option(None, PRETRAINED_BACKBONE)
    strict: bool = option(False, "box datasets: stop at the first bad annotation")


@dataclass(frozen=True)
class LandmarkOptions:
    data: str | None = option(None, "a landmark CSV/JSON, or a folder with train.csv (+ val.csv)")
    val_fraction: float = option(0.2, VAL_FRACTION)
    backbone: str = option("resnet18", BACKBONE)
    backbone_args: dict[str, Any] | None = option(None, BACKBONE_ARGS)
    pretrained: str | None = option(None, PRETRAINED_BACKBONE)
    loss: LandmarkLoss = option("smooth_l1", "point regression loss")
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
    """Localization and landmarks share a workflow module: one head on a zoo backbone per image."""

    data_help = "default: the training data (its validation split)"

    def task_args(self, opts: Any) -> dict[str, Any]:
        """The task's own arguments of ``localize.train``."""
        raise NotImplementedError

    def train(
        self,
        opts: Any,
        cfg: TrainConfig,
        *,
        project: str | os.PathLike[str],
        name: str,
        callbacks: Sequence[Callback] = (),
    ) -> FitResult:
        from cnnkit.workflows import localize

        return localize.train(
            self.name,
            opts.data,
            backbone=opts.backbone,
            backbone_args=opts.backbone_args,
            pretrained=opts.pretrained,
            cfg=cfg,
            val_fraction=opts.val_fraction,
            project=project,
            name=name,
            callbacks=callbacks,
            **self.task_args(opts),
        )

    def resume(self, run: str | os.PathLike[str]) -> FitResult:
        from cnnkit.workflows import localize

        return localize.train(self.name, ".", resume=run)

    def val(self, weights: str, data: str | None, *, options: Any = None, **kw: Any) -> ValReport:
        from cnnkit.workflows import localize

        return ValReport(localize.val(weights, self.name, data, **kw), [])


@register_task("localize")
class Localize(_OneObject):
    help = "one main object per image: class + box (or none)"
    Options = LocalizeOptions
    PredictOptions = LocalizePredict

    def task_args(self, opts: LocalizeOptions) -> dict[str, Any]:
        return {"strict": opts.strict}

    def predict(
        self, weights: str, sources: Sequence[str], *, out: str | None, options: Any = None, **kw: Any
    ) -> Iterator[PredictRecord]:
        from cnnkit.workflows import localize

        conf = (options or LocalizePredict()).conf
        for p in localize.predict(weights, "localize", sources, out=out, threshold=conf, **kw):
            box = None if p.box is None else [round(v, 2) for v in p.box]
            data = {"path": p.path, "object_prob": round(p.object_prob, 4), "class": p.label,
                    "class_prob": round(p.class_prob, 4), "box": box, "drawn": p.drawn}  # fmt: skip
            what = f"{p.label} {p.class_prob:.2f} box {box}" if box else f"no object ({p.object_prob:.2f})"
            yield PredictRecord(data, f"{p.path}: {what}")


@register_task("landmarks")
class Landmarks(_OneObject):
    help = "K points per image"
    Options = LandmarkOptions

    def task_args(self, opts: LandmarkOptions) -> dict[str, Any]:
        return {"loss": opts.loss, "flip_pairs": opts.flip_pairs, "norm_points": opts.norm_points}

    def predict(
        self, weights: str, sources: Sequence[str], *, out: str | None, options: Any = None, **kw: Any
    ) -> Iterator[PredictRecord]:
        from cnnkit.workflows import localize

        for p in localize.predict(weights, "landmarks", sources, out=out, **kw):
            points = [[round(x, 2), round(y, 2)] for x, y in p.points or []]
            data = {"path": p.path, "points": points, "drawn": p.drawn}
            yield PredictRecord(data, f"{p.path}: points {points}")
