"""Segmentation: the task spec (image/mask folders, Pascal VOC) and ``predict`` (index masks and colour
overlays at each image's own size)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cnnkit.api import create_model
from cnnkit.data.images import OutputNames, iter_frames
from cnnkit.data.segment import (
    SegmentationDataset,
    SegmentationTransform,
    collate_segmentation,
    fit_within,
    frame_of,
    infer_num_classes,
    resolve_segmentation_data,
)
from cnnkit.engine.config import TrainConfig
from cnnkit.errors import CnnkitError
from cnnkit.tasks.base import TTA, Task
from cnnkit.tasks.segment import SegLoss, SegmentationEvaluator, SegmentationTask, predict_classes
from cnnkit.viz import color_map, draw_overlay
from cnnkit.workflows.common import Loaded, names_of, preprocess
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


@dataclass(frozen=True)
class SegmentOptions:
    data: str | None = option(
        None, "images/ + masks/ (or labels/, annotations/...), train/val splits, or VOC"
    )
    val_fraction: float = option(0.2, "seeded validation split when the data has none")
    model: str = option("unet_same", "unet, unet_same, unet_course, unet_<encoder> (cnnkit models)")
    model_args: dict[str, Any] | None = option(None, "JSON of builder arguments, e.g. '{\"base\": 16}'")
    pretrained: str | None = option(None, "cnnkit weights of the same model")
    loss: SegLoss = option("ce+dice", "training loss")
    class_weights: tuple[float, ...] | None = option(None, "cross-entropy weight of each class")
    binary: bool = option(False, "two classes as one sigmoid channel")
    fliplr: float = option(0.5, "horizontal flip probability")
    scale: tuple[float, float] = option((0.5, 1.0), "random resized crop: range of the image area kept")
    rect: bool = option(
        True,
        "keep each image's aspect ratio: long side to --imgsz, padded, not squashed (--no-rect squashes)",
    )
    strict: bool = option(False, "stop at the first bad image/mask pair instead of skipping it")


def _dataset(pairs: Any, opts: SegmentOptions, cfg: TrainConfig, names: list[str], record: dict[str, Any],
             train: bool) -> SegmentationDataset:  # fmt: skip
    """The image/mask pairs with the mask conventions ``record`` holds (ignore value, palette, threshold)."""
    ignore = record["ignore_index"]
    transform = SegmentationTransform(
        cfg.imgsz, train, opts.scale, opts.fliplr, rect=opts.rect, ignore_index=ignore
    )  # --imgsz H W keeps the aspect ratio as --rect does
    split = "train" if train else "val"
    return SegmentationDataset(pairs, len(names), transform, ignore_index=ignore, palette=record["palette"],
                               strict=opts.strict, source=f"{opts.data} ({split})",
                               threshold=record["mask_threshold"])  # fmt: skip


@register_task("segment")
class Segment(TaskSpec):
    help = "semantic segmentation (image and mask folders, Pascal VOC)"
    data_help = "the dataset root (default: the training data); its validation split is used"
    Options = SegmentOptions
    val_batch = 16

    def build_data(
        self, opts: SegmentOptions, cfg: TrainConfig, names: Sequence[str] | None = None
    ) -> TaskData:
        """Train and val pairs; class names from data.yaml, the run being resumed, or the masks."""
        spec = resolve_segmentation_data(opts.data or ".", opts.val_fraction, cfg.seed)
        spec.report.log_problems(log, limit=None)
        found = list(names or spec.names or [])
        if not found:
            top = infer_num_classes(spec.train, spec.ignore_index, spec.palette, spec.threshold)
            found = [str(i) for i in range(top)]
        if opts.binary and len(found) != 2:
            raise CnnkitError(f"binary segmentation needs 2 classes, the data has {len(found)}: {found}")

        record = {
            "ignore_index": spec.ignore_index,
            "palette": spec.palette,
            "mask_threshold": spec.threshold,
        }
        train_set, val_set = (
            _dataset(pairs, opts, cfg, found, record, t)
            for pairs, t in ((spec.train, True), (spec.val, False))
        )
        skipped = [*spec.report.items, *train_set.skipped.items, *val_set.skipped.items]
        return TaskData(train_set, val_set, found, skipped, record, collate_fn=collate_segmentation)

    def shard_data(self, opts: SegmentOptions, cfg: TrainConfig, shards: Any) -> TaskData:
        """Streams of the packed image/mask pairs, read with the mask conventions packing found."""
        names, record = list(shards.names), dict(shards.record)
        if opts.binary and len(names) != 2:
            raise CnnkitError(f"binary segmentation needs 2 classes, the data has {len(names)}: {names}")
        build = partial(_dataset, opts=opts, cfg=cfg, names=names, record=record)
        train, val = (
            shards.stream(split, partial(build, train=t)) for split, t in (("train", True), ("val", False))
        )
        return TaskData(train, val, names, [], record, collate_fn=collate_segmentation)

    def labelled(self, dataset: SegmentationDataset) -> list[Labelled]:
        return [Labelled(image, mask=mask) for image, mask in dataset.pairs]

    def build_model(self, opts: SegmentOptions, data: TaskData, cfg: TrainConfig) -> nn.Module:
        classes = 1 if opts.binary else len(data.names or ())
        return create_model(
            opts.model, num_classes=classes, weights=opts.pretrained, **(opts.model_args or {})
        )

    def objective(
        self,
        opts: SegmentOptions,
        data: TaskData,
        model: nn.Module,
        cfg: TrainConfig,
        val_options: Any = None,
    ) -> Task:
        binary = getattr(model, "num_classes", 0) == 1
        classes = 1 if binary else len(data.names or ())
        _, rect = frame_of(cfg.imgsz, opts.rect)
        return SegmentationTask(
            classes, opts.loss, data.record["ignore_index"], opts.class_weights, rect=rect
        )

    def val_report(self, evaluator: SegmentationEvaluator, names: Sequence[str] | None) -> ValReport:
        names = list(names or [str(i) for i in range(evaluator.num_classes)])
        per = {k: v.tolist() for k, v in evaluator.per_class().items()}
        rows = [
            {"class": n, **{k: round(float(v[i]), 6) for k, v in per.items()}} for i, n in enumerate(names)
        ]
        return ValReport({}, rows)

    def predict(
        self, weights: str, sources: Sequence[str], *, out: str | None, options: Any = None, **kw: Any
    ) -> Iterator[PredictRecord]:
        names = names_of(weights)
        for p in predict(weights, sources, out=out, **kw):
            ids = sorted(int(c) for c in set(p.mask.flatten().tolist()))
            classes = [names[c] if names and c < len(names) else str(c) for c in ids]
            data = {"path": p.path, "classes": classes, "mask": p.mask_file, "overlay": p.overlay_file}
            yield PredictRecord(data, f"{p.path}: {', '.join(classes)} -> {p.mask_file}", {"mask": p.mask})


@dataclass(frozen=True)
class SegmentPrediction:
    path: str
    mask: np.ndarray  # [H, W] class indices at the image's own size
    mask_file: str | None
    overlay_file: str | None


@torch.inference_mode()
def predict(
    weights: str | os.PathLike[str],
    sources: Sequence[str | os.PathLike[str]],
    *,
    out: str | os.PathLike[str] | None = None,
    device: str = "auto",
    alpha: float = 0.5,
    fast: bool = True,
    tta: bool | TTA = False,
    ensemble: Sequence[str | os.PathLike[str]] = (),
    loaded: Loaded | None = None,
) -> Iterator[SegmentPrediction]:
    """Segment images (files, folders, globs) one at a time, at their own size.

    With ``out``, writes ``out/masks/<stem>.png`` (palette PNG whose pixel values are the classes)
    and ``out/overlays/<stem>.jpg`` (the colours blended over the image).
    """
    session = Loaded.of(
        weights, "segment", tta=tta, ensemble=ensemble, device=device, fast=fast, loaded=loaded
    )
    meta, prepared = session.meta, session.prepared
    # S, or [H, W] (which keeps the aspect ratio, as --rect does)
    size, rect = frame_of(meta["imgsz"], bool((meta.get("options") or {}).get("rect", False)))
    cmap = color_map(256)
    out_dir = Path(out) if out is not None else None
    names_out = OutputNames(out_dir)
    for frame in iter_frames(sources):
        image = frame.image
        h, w = image.shape[-2:]
        if rect:  # as trained: to fit H x W, padded bottom/right; the padding is cropped off
            nh, nw = fit_within(h, w, size)
            x = F.pad(preprocess(image, (nh, nw), meta), (0, size[1] - nw, 0, size[0] - nh))
            logits = prepared(x).float()[..., :nh, :nw]
        else:
            logits = prepared(preprocess(image, size, meta)).float()
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        mask = predict_classes(logits)[0].to(torch.uint8).cpu().numpy()
        mask_file = overlay_file = None
        if out_dir is not None:
            m = Image.fromarray(mask, mode="P")
            m.putpalette(cmap.flatten().tolist())
            mask_file = str(names_out.path(frame, ".png", "masks"))
            m.save(mask_file)
            overlay_file = str(names_out.path(frame, ".jpg", "overlays"))
            names = meta.get("class_names") or [str(i) for i in range(256)]
            draw_overlay(image, mask, cmap, names, alpha).save(overlay_file, quality=92)
        yield SegmentPrediction(frame.name, mask, mask_file, overlay_file)
