"""Pieces every task's verbs share: loading a trained model by task, resuming a run, preprocessing."""

from __future__ import annotations

import csv
import json
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from cnnkit.api import create_model
from cnnkit.backends import default_backend, prepare_backend
from cnnkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, classify_eval_transform
from cnnkit.engine.callbacks import drawn_or_logged
from cnnkit.engine.config import TrainConfig, config_from_dict
from cnnkit.engine.device import select_device
from cnnkit.engine.loops import evaluate, load_training_state, make_loader
from cnnkit.engine.pictures import draw_predictions
from cnnkit.errors import CnnkitError, DataError
from cnnkit.inference import OnnxModel
from cnnkit.io import atomic_path
from cnnkit.tasks.base import TTA, Combined, Task
from cnnkit.weights import max_side, read_metadata, task_of

log = logging.getLogger("cnnkit")


def load_task_model(
    weights: str | os.PathLike[str],
    task: str,
    *,
    tta: bool | TTA = False,
    ensemble: Sequence[str | os.PathLike[str]] = (),
) -> tuple[nn.Module, dict[str, Any]]:
    """A trained model in eval mode and its metadata; refuses weights of another task. ``ensemble``:
    more weights of the same task and classes, combined with it; ``tta``: each also run on the mirrored
    image (for weights trained with flips) and, with a :class:`~cnnkit.tasks.base.TTA`, on resized
    copies (see :class:`~cnnkit.tasks.base.Combined`)."""
    augment = TTA.of(tta)
    if augment or ensemble:
        return _combined(weights, task, augment, ensemble)
    meta = read_metadata(weights)
    if "model" not in meta:
        raise CnnkitError(
            f"{weights} has no cnnkit metadata naming its model; load it with "
            "cnnkit.create_model(NAME, weights=PATH) and use the model directly"
        )
    if task_of(meta) != task:
        raise CnnkitError(f"{weights} holds a {meta.get('task') or 'plain'} model, not a {task} model")
    if Path(weights).suffix == ".onnx":
        return OnnxModel(weights, meta).eval(), meta
    return create_model(None, weights=weights).eval(), meta


@dataclass
class Loaded:
    """Weights loaded once for prediction: the model in eval mode, its metadata and the model prepared
    for ``device`` (the fast path with ``fast``). A :class:`~cnnkit.workflows.predictor.Predictor` keeps
    one, so calling it again does not read the weights again."""

    model: nn.Module
    meta: dict[str, Any]
    prepared: Any

    @classmethod
    def of(
        cls,
        weights: str | os.PathLike[str],
        task: str,
        *,
        tta: bool | TTA = False,
        ensemble: Sequence[str | os.PathLike[str]] = (),
        device: str = "auto",
        fast: bool = True,
        backend: str | None = None,
        calib: str | os.PathLike[str] | None = None,
        loaded: Loaded | None = None,
    ) -> Loaded:
        """``loaded`` when given (already loaded), else the weights loaded now and prepared for ``backend``
        (:mod:`cnnkit.backends`; None: ``$CNNKIT_BACKEND`` or the fast PyTorch path), ``auto`` choosing at
        one image of the recorded input size; ``calib``: images int8 backends calibrate on."""
        if loaded is not None:
            return loaded
        model, meta = load_task_model(weights, task, tta=tta, ensemble=ensemble)
        side = max_side(meta.get("imgsz")) or 224
        example = torch.randn(1, int((meta.get("args") or {}).get("in_chans", 3)), side, side)
        batches = calibration_batches(calib, meta) if calib else []
        backend = backend or default_backend()
        prepared = prepare_backend(model, select_device(device), backend, example, fast=fast, calib=batches)
        return cls(model, meta, prepared)


def _combined(
    weights: str | os.PathLike[str],
    task: str,
    tta: TTA | None,
    ensemble: Sequence[str | os.PathLike[str]],
) -> tuple[nn.Module, dict[str, Any]]:
    from cnnkit.tasks.classify import ClassificationTask
    from cnnkit.tasks.detect import DetectionTask
    from cnnkit.tasks.localize import LandmarkTask, LocalizationTask
    from cnnkit.tasks.segment import SegmentationTask

    model, meta = load_task_model(weights, task)
    members = [model]
    for other in ensemble:
        member, theirs = load_task_model(other, task)
        for key in ("class_names", "imgsz", "mean", "std"):
            if theirs.get(key) != meta.get(key):
                raise CnnkitError(f"--ensemble {other}: its {key} differs from {weights}'s")
        members.append(member)  # detectors with other anchors or strides: their boxes are fused
    classes = len(meta.get("class_names") or []) or 1
    combiner: Any = {
        "classify": lambda: ClassificationTask(classes),
        "segment": lambda: SegmentationTask(classes),
        "detect": lambda: DetectionTask(classes, model.anchors, model.strides),  # type: ignore[arg-type]
        "localize": lambda: LocalizationTask(classes),
        "landmarks": lambda: LandmarkTask(int(meta.get("num_points") or 1)),
    }[task]()
    flip, scales = (tta.flip, tta.scales) if tta else (False, (1.0,))
    combined = Combined(members, combiner, flip=flip, scales=scales).eval()
    if flip and not float((meta.get("options") or {}).get("fliplr") or 0):
        raise CnnkitError(
            f"--tta averages each image with its mirror, but {weights} was trained without flips "
            "(fliplr 0: a mirrored image need not be the same class here, as for digits)"
        )
    for name in ("anchors", "strides", "num_classes", "in_chans"):  # what callers read off a model
        if hasattr(model, name) and not hasattr(combined, name):
            setattr(combined, name, getattr(model, name))
    return combined, meta


def names_of(weights: str | os.PathLike[str]) -> list[str] | None:
    """The class names a weights file records, if any."""
    return read_metadata(weights).get("class_names")


def resume_point(resume: str | os.PathLike[str]) -> tuple[Path, dict[str, Any], TrainConfig]:
    """``(last.pt path, run metadata, training config)`` of a run directory or its ``weights/last.pt``."""
    path = Path(resume)
    last = path / "weights" / "last.pt" if path.is_dir() else path
    state = load_training_state(last)
    meta = state.get("metadata")
    if not isinstance(meta, dict) or not {"task", "train_config", "model_config"} <= set(meta):
        raise CnnkitError(
            f"cannot resume from {last}: not a training state written by cnnkit train (no run record); "
            "pass a run directory or its weights/last.pt, or start a new run with --pretrained"
        )
    meta["completed_epochs"] = int(state.get("epoch", 0))
    return last, meta, config_from_dict(TrainConfig, meta["train_config"], f"{last} (train_config)")


def rebuild_model(meta: dict[str, Any]) -> nn.Module:
    """The run's model, built as it was (weights come from the checkpoint)."""
    return create_model(meta["model_config"]["name"], **meta["model_config"]["args"])


def preprocess(image: torch.Tensor, imgsz: int | tuple[int, int], meta: dict[str, Any]) -> torch.Tensor:
    """``[3, H, W] uint8 -> [1, 3, h, w]`` float (``imgsz``: ``h = w``, or ``(h, w)``), resized and
    normalised as in training."""
    size = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    return normalise(
        F.interpolate(image[None].float() / 255, size=size, mode="bilinear", antialias=True), meta
    )


def classifier_transform(meta: dict[str, Any]) -> Any:
    """A classifier's evaluation transform as its weights record: input size, centre crop, mean and std."""
    return classify_eval_transform(
        int(meta.get("imgsz", 224)),
        float(meta.get("crop_fraction", 0.875)),
        tuple(meta.get("mean", IMAGENET_MEAN)),
        tuple(meta.get("std", IMAGENET_STD)),
    )


def calibration_batches(
    source: str | os.PathLike[str], meta: dict[str, Any], count: int = 256, batch: int = 16
) -> list[torch.Tensor]:
    """Up to ``count`` images under ``source`` (a seeded random pick; mask folders left out) prepared as
    the model's input (:func:`preprocess` at the recorded size), in batches: what int8 calibrates on."""
    from cnnkit.data.formats.masks import MASK_DIRS
    from cnnkit.data.images import iter_images, read_image

    def in_mask_folder(path: Path) -> bool:  # below source: a folder of the user's own path may be "gt"
        inner = path.relative_to(source) if path.is_relative_to(source) else Path(path.name)
        return bool({d.lower() for d in inner.parts[:-1]} & set(MASK_DIRS))

    paths = [p for p in iter_images([source]) if not in_mask_folder(p)]
    if not paths:
        raise DataError(f"{source}: no images to calibrate int8 on (give training images: --calib DATA)")
    random.Random(0).shuffle(paths)
    side = max_side(meta.get("imgsz")) or 224
    images = []
    for path in paths[:count]:
        try:
            images.append(preprocess(read_image(path), side, meta)[0])
        except DataError as exc:
            log.warning("calibration: skipping %s", exc)
    return [torch.stack(images[i : i + batch]) for i in range(0, len(images), batch)]


def normalise(x: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
    """``[B, 3, H, W]`` pixels in [0, 1] normalised with the mean and std a run recorded."""
    return (x - torch.tensor(meta["mean"]).view(3, 1, 1)) / torch.tensor(meta["std"]).view(3, 1, 1)


def record_skipped(run_dir: Path, items: Sequence[tuple[str, str]]) -> None:
    """List the files a run left out (path and reason) in ``run_dir/skipped.txt`` and say so once."""
    from cnnkit.engine.distributed import info

    if not items or not info().is_main:
        return
    text = "".join(f"{p}: {r}\n" for p, r in items)
    # a file name that is not UTF-8 is written with its bytes escaped (b"caf\xe9" -> "caf\\xe9")
    printable = os.fsencode(text).decode("utf-8", errors="backslashreplace")
    (run_dir / "skipped.txt").write_text(printable, encoding="utf-8")
    log.warning("%d files skipped; listed in %s", len(items), run_dir / "skipped.txt")


def evaluate_dataset(
    task: Task,
    model: nn.Module,
    dataset: Dataset[Any],
    *,
    batch: int,
    device: str,
    workers: int,
    fast: bool = True,
    backend: str | None = None,
    calib: Sequence[torch.Tensor] = (),
    collate_fn: Any = None,
) -> tuple[dict[str, float], Any]:
    """One validation pass of ``model`` over ``dataset`` on ``device``; ``fast``: the fast inference path
    (:mod:`cnnkit.inference`: folded BatchNorm, channels-last, reduced-precision autocast) run by
    ``backend`` (:mod:`cnnkit.backends`; ``auto`` chooses on the first batch)."""
    dev = select_device(device)
    loader = make_loader(dataset, batch, shuffle=False, workers=workers, device=dev, collate_fn=collate_fn)
    backend = backend or default_backend()
    example = torch.zeros(0)
    if fast and backend != "eager":  # the first batch: what auto times and checks on, the graph's example
        first = next(iter(make_loader(dataset, batch, shuffle=False, workers=0, device=dev,
                                      collate_fn=collate_fn)), None)  # fmt: skip
        example = example if first is None else task.inputs(first)
    prepared = prepare_backend(model, dev, backend, example, fast=fast, calib=calib)
    return evaluate(task, prepared.model, loader, prepared.device, prepared.dtype, progress=True,
                    channels_last=prepared.channels_last)  # fmt: skip


def write_val_outputs(
    folder: Path,
    report: Any,
    source: dict[str, Any],
    evaluator: Any,
    task: Task,
    model: nn.Module,
    dataset: Any,
    names: Sequence[str] | None,
) -> None:
    """What ``val --out`` keeps: ``metrics.json`` (where from, the metrics, per class, extras),
    ``per_class.csv``, the evaluator's plots (confusion matrix, PR curve) and ``val_pred.jpg``."""
    with atomic_path(folder / "metrics.json") as tmp:
        tmp.write_text(json.dumps({**source, **report.to_json()}, indent=2) + "\n")
    if report.per_class:
        with atomic_path(folder / "per_class.csv") as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(report.per_class[0]))
            writer.writeheader()
            writer.writerows(report.per_class)
    if hasattr(evaluator, "save_plots"):
        drawn_or_logged(evaluator.save_plots, folder, names)
    show = getattr(task, "show", None)
    if show is not None and len(dataset.val):
        void = getattr(task, "ignore_index", None)
        path = folder / "val_pred.jpg"
        drawn_or_logged(
            draw_predictions, show, model, dataset.val, path, names or [], dataset.collate_fn, void
        )
