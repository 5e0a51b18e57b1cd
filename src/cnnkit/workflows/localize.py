"""Localization and landmark verbs: ``train``, ``val``, ``predict`` (with drawn boxes and points)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from torch import nn

from cnnkit.api import create_model
from cnnkit.data.classify import split_dataset
from cnnkit.data.images import iter_frames
from cnnkit.data.localize import (
    LandmarkDataset,
    LocalizationDataset,
    read_landmarks,
    read_localization,
)
from cnnkit.engine.callbacks import Callback
from cnnkit.engine.config import TrainConfig
from cnnkit.engine.device import select_device
from cnnkit.engine.trainer import (
    FitResult,
    fit,
    new_run_dir,
    seed_everything,
)
from cnnkit.errors import CnnkitError, DataError
from cnnkit.inference import prepare
from cnnkit.ops.boxes import clip
from cnnkit.tasks.localize import LandmarkLoss, LandmarkTask, LocalizationTask, loc_boxes_xyxy
from cnnkit.workflows.common import evaluate_dataset, load_task_model, preprocess, rebuild_model, resume_point
from cnnkit.workflows.record import RunRecord

log = logging.getLogger("cnnkit")


def _split(
    train: list[Any], val: list[Any] | None, fraction: float, seed: int
) -> tuple[list[Any], list[Any]]:
    if val is not None:
        return train, val
    tr, va = split_dataset(len(train), fraction, seed)
    return [train[i] for i in tr], [train[i] for i in va]


def _localization_sets(
    data: str | os.PathLike[str],
    imgsz: int,
    fraction: float,
    seed: int,
    names: Sequence[str] | None = None,
    strict: bool = False,
) -> tuple[LocalizationDataset, LocalizationDataset, list[str]]:
    train, val, found, report = read_localization(data, val_fraction=fraction, seed=seed, strict=strict)
    for line in report.problems[:20]:
        log.warning("%s", line)
    train, val = _split(train, val, fraction, seed)
    names = list(names or found or sorted({s.label for s in train if s.label is not None}))
    if not names:
        raise DataError(f"{data}: no image has an object; a localizer needs at least one class")
    return (
        LocalizationDataset(train, names, imgsz, True),
        LocalizationDataset(val, names, imgsz, False),
        names,
    )


def _landmark_sets(
    data: str | os.PathLike[str],
    imgsz: int,
    fraction: float,
    seed: int,
    flip_pairs: Sequence[Sequence[int]] | None,
) -> tuple[LandmarkDataset, LandmarkDataset, dict[str, Any]]:
    train, val, options = read_landmarks(data)
    train, val = _split(train, val, fraction, seed)
    pairs = flip_pairs if flip_pairs is not None else options.get("flip_pairs", [])
    options = {**options, "flip_pairs": [list(p) for p in pairs]}
    return LandmarkDataset(train, imgsz, True, pairs), LandmarkDataset(val, imgsz, False, pairs), options


def train(
    task: str,
    data: str | os.PathLike[str],
    *,
    backbone: str = "resnet18",
    backbone_args: dict[str, Any] | None = None,
    pretrained: str | os.PathLike[str] | None = None,
    cfg: TrainConfig | None = None,
    val_fraction: float = 0.2,
    loss: LandmarkLoss = "smooth_l1",
    flip_pairs: Sequence[Sequence[int]] | None = None,
    norm_points: tuple[int, int] | None = None,
    project: str | os.PathLike[str] = "runs",
    name: str = "exp",
    resume: str | os.PathLike[str] | None = None,
    strict: bool = False,
    callbacks: Sequence[Callback] = (),
) -> FitResult:
    """Train a localizer (``task="localize"``) or a landmark regressor (``task="landmarks"``).

    ``pretrained`` initialises the backbone (a classifier's weights: its head is dropped).
    """
    if resume is not None:
        return _resume(resume)
    cfg = cfg or TrainConfig()
    seed_everything(cfg.seed)
    common: dict[str, Any] = {
        "backbone": backbone,
        "backbone_args": backbone_args,
        "backbone_weights": None if pretrained is None else str(pretrained),
    }
    meta: dict[str, Any] = {"data": str(data), "val_fraction": val_fraction, "strict": strict}
    train_set: Any
    val_set: Any
    if task == "localize":
        train_set, val_set, names = _localization_sets(data, cfg.imgsz, val_fraction, cfg.seed, strict=strict)
        net = create_model("localizer", num_classes=len(names), **common)
        meta["class_names"] = names
        the_task: Any = LocalizationTask(len(names))
    elif task == "landmarks":
        train_set, val_set, options = _landmark_sets(data, cfg.imgsz, val_fraction, cfg.seed, flip_pairs)
        net = create_model("landmarker", num_points=train_set.num_points, **common)
        norm = norm_points or options.get("norm_points")
        meta.update(
            flip_pairs=options["flip_pairs"], norm_points=norm, loss=loss, num_points=train_set.num_points
        )
        the_task = LandmarkTask(train_set.num_points, loss, cfg.imgsz, tuple(norm) if norm else None)
    else:
        raise CnnkitError(f"task must be 'localize' or 'landmarks', got {task!r}")
    config: dict[str, Any] = net.cnnkit_config  # type: ignore[assignment]
    config["args"].pop("backbone_weights", None)  # weights come from the checkpoint from now on
    meta = RunRecord.new(task, config, cfg, **meta).to_metadata()
    run_dir = new_run_dir(project, task, name)
    return fit(the_task, net, train_set, val_set, cfg, run_dir, metadata=meta, callbacks=callbacks)


def _task_and_sets(meta: dict[str, Any], cfg: TrainConfig) -> tuple[Any, Any, Any]:
    if meta["task"] == "localize":
        tr, va, names = _localization_sets(
            meta["data"],
            cfg.imgsz,
            meta["val_fraction"],
            cfg.seed,
            meta["class_names"],
            meta.get("strict", False),
        )
        return LocalizationTask(len(names)), tr, va
    points, points_val, _ = _landmark_sets(
        meta["data"], cfg.imgsz, meta["val_fraction"], cfg.seed, meta["flip_pairs"]
    )
    norm = meta.get("norm_points")
    task = LandmarkTask(points.num_points, meta["loss"], cfg.imgsz, tuple(norm) if norm else None)
    return task, points, points_val


def _resume(resume: str | os.PathLike[str]) -> FitResult:
    last, meta, cfg = resume_point(resume)
    task, tr, va = _task_and_sets(meta, cfg)
    net = rebuild_model(meta)
    return fit(task, net, tr, va, cfg, last.parent.parent, resume=last, metadata=meta)


def load(weights: str | os.PathLike[str], task: str) -> tuple[nn.Module, dict[str, Any]]:
    return load_task_model(weights, task)


def val(
    weights: str | os.PathLike[str],
    task: str,
    data: str | os.PathLike[str] | None = None,
    *,
    batch: int = 32,
    imgsz: int | None = None,
    device: str = "auto",
    workers: int = 2,
    fast: bool = True,
) -> dict[str, float]:
    """Metrics on the validation split of ``data`` (default: the training data's)."""
    model, meta = load(weights, task)
    cfg = TrainConfig(imgsz=imgsz or int(meta["imgsz"]), seed=int(meta["train_config"]["seed"]))
    the_task, _, val_set = _task_and_sets({**meta, "data": str(data or meta["data"])}, cfg)
    metrics, _ = evaluate_dataset(
        the_task, model, val_set, batch=batch, device=device, workers=workers, fast=fast
    )
    return metrics


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
) -> Iterator[LocPrediction]:
    """Box (or points) per image in the original image's pixels; with ``out``, images with them drawn."""
    model, meta = load(weights, task)
    prepared = prepare(model, select_device(device), fast)
    imgsz = int(meta["imgsz"])
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
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
            drawn = out_dir / f"{frame.stem}.png"
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
