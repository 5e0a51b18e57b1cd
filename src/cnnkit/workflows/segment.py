"""Segmentation verbs: ``train``, ``val``, ``predict`` (index masks and colour overlays)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cnnkit.api import create_model
from cnnkit.data.images import iter_frames
from cnnkit.data.segment import (
    SegmentationDataset,
    SegmentationTransform,
    color_map,
    infer_num_classes,
    resolve_segmentation_data,
)
from cnnkit.engine.callbacks import Callback
from cnnkit.engine.config import TrainConfig, config_from_dict
from cnnkit.engine.device import select_device
from cnnkit.engine.trainer import (
    FitResult,
    fit,
    new_run_dir,
    seed_everything,
)
from cnnkit.errors import CnnkitError
from cnnkit.inference import prepare
from cnnkit.tasks.segment import SegLoss, SegmentationEvaluator, SegmentationTask, predict_classes
from cnnkit.workflows.common import (
    evaluate_dataset,
    load_task_model,
    preprocess,
    rebuild_model,
    record_skipped,
    resume_point,
)
from cnnkit.workflows.record import RunRecord

log = logging.getLogger("cnnkit")


@dataclass(frozen=True)
class SegmentOptions:
    """Task options of a segmentation run."""

    loss: SegLoss = "ce+dice"
    class_weights: tuple[float, ...] | None = None
    binary: bool = False  # one sigmoid channel (two classes: background and foreground)
    scale: tuple[float, float] = (0.5, 1.0)  # random resized crop, as a fraction of the image area
    hflip: float = 0.5
    strict: bool = False  # a bad image/mask pair stops the run instead of being skipped


def _datasets(
    data: str | os.PathLike[str],
    cfg: TrainConfig,
    opts: SegmentOptions,
    val_fraction: float,
    names: list[str] | None = None,
) -> tuple[SegmentationDataset, SegmentationDataset, list[str], Any]:
    """Train and val datasets, the class names (from data.yaml, the caller, or the masks) and the spec."""
    spec = resolve_segmentation_data(data, val_fraction, cfg.seed)
    for path, reason in spec.missing:
        log.warning("%s: %s", path, reason)
    names = names or spec.names
    if names is None:
        names = [str(i) for i in range(infer_num_classes(spec.train, spec.ignore_index, spec.palette))]

    def dataset(pairs: list[tuple[Path, Path]], train: bool) -> SegmentationDataset:
        transform = SegmentationTransform(cfg.imgsz, train, opts.scale, opts.hflip)
        split = "train" if train else "val"
        return SegmentationDataset(
            pairs,
            len(names),
            transform,
            ignore_index=spec.ignore_index,
            palette=spec.palette,
            strict=opts.strict,
            source=f"{data} ({split})",
        )

    train_set, val_set = dataset(spec.train, True), dataset(spec.val, False)
    return train_set, val_set, names, spec


def train(
    data: str | os.PathLike[str],
    *,
    model: str | None = "unet_same",
    model_args: dict[str, Any] | None = None,
    pretrained: str | os.PathLike[str] | None = None,
    cfg: TrainConfig | None = None,
    opts: SegmentOptions = SegmentOptions(),
    val_fraction: float = 0.2,
    project: str | os.PathLike[str] = "runs",
    name: str = "exp",
    resume: str | os.PathLike[str] | None = None,
    callbacks: Sequence[Callback] = (),
) -> FitResult:
    """Train a segmentation model (``unet``, ``unet_same``, ``unet_<encoder>``...) on an image/mask set."""
    if resume is not None:
        return _resume(resume)
    cfg = cfg or TrainConfig()
    train_set, val_set, names, spec = _datasets(data, cfg, opts, val_fraction)
    if opts.binary and len(names) != 2:
        raise CnnkitError(f"binary segmentation needs 2 classes, the data has {len(names)}: {names}")
    seed_everything(cfg.seed)
    net = create_model(
        model, num_classes=1 if opts.binary else len(names), weights=pretrained, **(model_args or {})
    )
    run_dir = new_run_dir(project, "segment", name)
    record_skipped(run_dir, [*spec.missing, *train_set.skipped.items, *val_set.skipped.items])
    meta = RunRecord.new(
        "segment",
        net.cnnkit_config,  # type: ignore[arg-type]
        cfg,
        class_names=names,
        data=str(data),
        val_fraction=val_fraction,
        options={**opts.__dict__},
        ignore_index=spec.ignore_index,
        palette=spec.palette,
    ).to_metadata()
    task = _task(names, spec.ignore_index, opts)
    return fit(task, net, train_set, val_set, cfg, run_dir, metadata=meta, callbacks=callbacks)


def _task(names: Sequence[str], ignore_index: int, opts: SegmentOptions) -> SegmentationTask:
    return SegmentationTask(1 if opts.binary else len(names), opts.loss, ignore_index, opts.class_weights)


def _resume(resume: str | os.PathLike[str]) -> FitResult:
    last, meta, cfg = resume_point(resume)
    opts = config_from_dict(SegmentOptions, meta["options"], str(last))
    train_set, val_set, names, spec = _datasets(
        meta["data"], cfg, opts, meta["val_fraction"], meta["class_names"]
    )
    net = rebuild_model(meta)
    task = _task(names, spec.ignore_index, opts)
    return fit(task, net, train_set, val_set, cfg, last.parent.parent, resume=last, metadata=meta)


def load_segmenter(weights: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    return load_task_model(weights, "segment")


def val(
    weights: str | os.PathLike[str],
    data: str | os.PathLike[str] | None = None,
    *,
    batch: int = 16,
    imgsz: int | None = None,
    device: str = "auto",
    workers: int = 2,
    fast: bool = True,
) -> tuple[dict[str, float], SegmentationEvaluator]:
    """Evaluate on the validation split of ``data`` (default: the training data; the split the training
    used, by the same seed)."""
    model, meta = load_segmenter(weights)
    data = data or meta["data"]
    cfg = TrainConfig(imgsz=imgsz or int(meta["imgsz"]), seed=int(meta["train_config"]["seed"]))
    fraction = float(meta.get("val_fraction", 0.2))
    _, val_set, names, spec = _datasets(data, cfg, SegmentOptions(), fraction, meta["class_names"])
    binary = getattr(model, "num_classes", 0) == 1
    task = _task(names, spec.ignore_index, SegmentOptions(binary=bool(binary)))
    metrics, evaluator = evaluate_dataset(
        task, model, val_set, batch=batch, device=device, workers=workers, fast=fast
    )
    return metrics, evaluator


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
) -> Iterator[SegmentPrediction]:
    """Segment images (files, folders, globs) one at a time, at their own size.

    With ``out``, writes ``out/masks/<stem>.png`` (palette PNG whose pixel values are the classes)
    and ``out/overlays/<stem>.jpg`` (the colours blended over the image).
    """
    model, meta = load_segmenter(weights)
    prepared = prepare(model, select_device(device), fast)
    imgsz = int(meta["imgsz"])
    cmap = color_map(256)
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        (out_dir / "masks").mkdir(parents=True, exist_ok=True)
        (out_dir / "overlays").mkdir(parents=True, exist_ok=True)
    for frame in iter_frames(sources):
        image = frame.image
        h, w = image.shape[-2:]
        logits = prepared(preprocess(image, imgsz, meta)).float()
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        mask = predict_classes(logits)[0].to(torch.uint8).cpu().numpy()
        mask_file = overlay_file = None
        if out_dir is not None:
            m = Image.fromarray(mask, mode="P")
            m.putpalette(cmap.flatten().tolist())
            mask_file = str(out_dir / "masks" / f"{frame.stem}.png")
            m.save(mask_file)
            rgb = image.permute(1, 2, 0).numpy().astype(np.float32)
            colour = cmap[mask].astype(np.float32)
            blend = np.where(mask[..., None] > 0, (1 - alpha) * rgb + alpha * colour, rgb)
            overlay_file = str(out_dir / "overlays" / f"{frame.stem}.jpg")
            Image.fromarray(blend.clip(0, 255).astype(np.uint8)).save(overlay_file, quality=92)
        yield SegmentPrediction(frame.name, mask, mask_file, overlay_file)
