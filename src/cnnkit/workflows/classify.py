"""Classification verbs: ``train``, ``val``, ``predict``, with the transfer-learning recipe built in."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnkit.api import create_model
from cnnkit.data.classify import ClassificationDataset, read_label_csv, scan_image_folder, split_dataset
from cnnkit.data.images import iter_frames
from cnnkit.data.transforms import (
    AugmentConfig,
    classify_eval_transform,
    classify_train_transform,
)
from cnnkit.engine.callbacks import Callback
from cnnkit.engine.config import TrainConfig, config_from_dict
from cnnkit.engine.device import select_device
from cnnkit.engine.freeze import count_parameters, freeze_base
from cnnkit.engine.trainer import (
    FitResult,
    fit,
    new_run_dir,
    seed_everything,
)
from cnnkit.errors import DataError
from cnnkit.inference import prepare
from cnnkit.tasks.classify import ClassificationEvaluator, ClassificationTask
from cnnkit.workflows.common import (
    evaluate_dataset,
    load_task_model,
    rebuild_model,
    record_skipped,
    resume_point,
)
from cnnkit.workflows.record import RunRecord

log = logging.getLogger("cnnkit")

VAL_DIR_NAMES = ("val", "valid", "validation", "test")


@dataclass(frozen=True)
class TransferConfig:
    """The transfer-learning recipe: train the new head on a frozen base, then fine-tune the last blocks.

    ``freeze``: stage 1 trains only the head (plus ``trainable`` layers; with no ``fine_tune_epochs``,
    also the last ``unfreeze_last`` blocks). ``fine_tune_epochs`` > 0 adds stage 2: the last
    ``unfreeze_last`` blocks train too, at ``fine_tune_lr_factor`` x the learning rate. BatchNorm of the
    base stays in inference mode throughout.
    """

    freeze: bool = False
    unfreeze_last: int = 0
    trainable: tuple[str, ...] = ()
    fine_tune_epochs: int = 0
    fine_tune_lr_factor: float = 0.1


def resolve_splits(
    data: str | os.PathLike[str], val: str | os.PathLike[str] | None, val_fraction: float, seed: int
) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]], list[str]]:
    """Train and val samples and the class names, from one of the layouts people publish:

    ``data/{train,val|valid|test}/<class>/*`` ; ``data/<class>/*`` (split by ``val_fraction``, seeded);
    a ``path,label`` CSV; or explicit ``data`` and ``val`` folders/CSVs.
    """
    data = Path(data)

    def read(source: Path, names: Sequence[str] | None = None) -> tuple[list[tuple[Path, int]], list[str]]:
        if source.is_file():
            return read_label_csv(source, names)
        samples, found = scan_image_folder(source)
        if names is None or found == list(names):
            return samples, found
        index = {n: i for i, n in enumerate(names)}
        missing = [n for n in found if n not in index]
        if missing:
            raise DataError(
                f"{source}: class folders {missing} are not in the training classes {list(names)}"
            )
        return [(p, index[found[c]]) for p, c in samples], list(names)

    if not data.exists():
        raise DataError(f"{data}: no such file or directory")
    if val is not None:
        train, names = read(data)
        val_samples, _ = read(Path(val), names)
        return train, val_samples, names
    if data.is_dir() and (data / "train").is_dir():
        train, names = read(data / "train")
        for vname in VAL_DIR_NAMES:
            if (data / vname).is_dir():
                val_samples, _ = read(data / vname, names)
                return train, val_samples, names
        data_samples, names = train, names
    else:
        data_samples, names = read(data)
    train_idx, val_idx = split_dataset(len(data_samples), val_fraction, seed)
    return [data_samples[i] for i in train_idx], [data_samples[i] for i in val_idx], names


def train(
    data: str | os.PathLike[str],
    *,
    model: str | None = "resnet18",
    val: str | os.PathLike[str] | None = None,
    val_fraction: float = 0.2,
    pretrained: str | os.PathLike[str] | None = None,
    transfer: TransferConfig = TransferConfig(),
    cfg: TrainConfig | None = None,
    augment: AugmentConfig = AugmentConfig(),
    label_smoothing: float = 0.0,
    model_args: dict[str, Any] | None = None,
    project: str | os.PathLike[str] = "runs",
    name: str = "exp",
    resume: str | os.PathLike[str] | None = None,
    callbacks: Sequence[Callback] = (),
) -> FitResult:
    """Train a classifier on a class-folder or CSV dataset; returns the run's result (weights, metrics).

    ``pretrained`` takes cnnkit, torchvision or timm weights: the old top is dropped and a new head is
    built for the dataset's classes. ``resume`` (a run directory or its ``weights/last.pt``) continues a
    stopped run with its saved configuration.
    """
    if resume is not None:
        return _resume(resume)
    cfg = cfg or TrainConfig()
    train_samples, val_samples, class_names = resolve_splits(data, val, val_fraction, cfg.seed)
    train_set = ClassificationDataset(
        train_samples, class_names, classify_train_transform(cfg.imgsz, augment), source=f"{data} (train)"
    )
    val_set = ClassificationDataset(
        val_samples,
        class_names,
        classify_eval_transform(cfg.imgsz, augment.crop_fraction),
        source=f"{data} (val)",
    )
    args = dict(model_args or {})
    seed_everything(cfg.seed)  # the new head's initialisation is part of the seeded run
    net = create_model(model, num_classes=len(class_names), weights=pretrained, **args)
    run_dir = new_run_dir(project, "classify", name)
    record_skipped(run_dir, [*train_set.skipped.items, *val_set.skipped.items])
    meta = RunRecord.new(
        "classify",
        net.cnnkit_config,  # type: ignore[arg-type]
        cfg,
        class_names=class_names,
        data=str(data),
        val=None if val is None else str(val),
        val_fraction=val_fraction,
        crop_fraction=augment.crop_fraction,
        augment=dataclasses.asdict(augment),
        label_smoothing=label_smoothing,
        transfer=dataclasses.asdict(transfer),
        pretrained=None if pretrained is None else str(pretrained),
    ).to_metadata()
    return _fit_stages(net, train_set, val_set, cfg, run_dir, meta, transfer, callbacks=callbacks)


def _fit_stages(
    net: nn.Module,
    train_set: ClassificationDataset,
    val_set: ClassificationDataset,
    cfg: TrainConfig,
    run_dir: Path,
    meta: dict[str, Any],
    transfer: TransferConfig,
    *,
    start_stage: int = 1,
    resume: Path | None = None,
    callbacks: Sequence[Callback] = (),
) -> FitResult:
    """Stage 1 (head, or the whole net without ``freeze``), then stage 2 (fine-tuning) when asked for."""
    task = ClassificationTask(len(train_set.class_names), float(meta["label_smoothing"]))
    two_stage = transfer.freeze and transfer.fine_tune_epochs > 0
    if start_stage == 1:
        if transfer.freeze:
            frozen, kept = freeze_base(net, 0 if two_stage else transfer.unfreeze_last, transfer.trainable)
            trainable, n_frozen = count_parameters(net)
            log.info(
                "stage 1: base frozen (%d blocks, BatchNorm in inference mode), training %s; "
                "%s trainable, %s frozen parameters",
                len(frozen),
                ["head", *kept],
                f"{trainable:,}",
                f"{n_frozen:,}",
            )
        result = fit(
            task, net, train_set, val_set, cfg, run_dir, resume=resume, metadata=meta, callbacks=callbacks
        )
        if not two_stage:
            return result
        resume = None
    freeze_base(net, transfer.unfreeze_last, transfer.trainable)
    trainable, n_frozen = count_parameters(net)
    log.info(
        "stage 2: fine-tuning the last %d blocks at %gx the learning rate; %s trainable, %s frozen",
        transfer.unfreeze_last,
        transfer.fine_tune_lr_factor,
        f"{trainable:,}",
        f"{n_frozen:,}",
    )
    stage2 = cfg.replace(epochs=transfer.fine_tune_epochs, lr=cfg.lr * transfer.fine_tune_lr_factor)
    return fit(
        task,
        net,
        train_set,
        val_set,
        stage2,
        run_dir / "finetune",
        resume=resume,
        metadata={**meta, "stage": 2},
        callbacks=callbacks,
    )


def _resume(resume: str | os.PathLike[str]) -> FitResult:
    """Rebuild a run from its ``last.pt`` (model, data, configuration) and continue it."""
    last, meta, cfg = resume_point(resume)
    stage = int(meta["stage"])
    run_dir = last.parent.parent if stage == 1 else last.parent.parent.parent
    augment = config_from_dict(AugmentConfig, meta["augment"], str(last))
    train_samples, val_samples, class_names = resolve_splits(
        meta["data"], meta["val"], meta["val_fraction"], cfg.seed
    )
    if class_names != meta["class_names"]:
        raise DataError(
            f"{meta['data']}: the classes changed since the run started (were {meta['class_names']})"
        )
    train_set = ClassificationDataset(
        train_samples, class_names, classify_train_transform(cfg.imgsz, augment)
    )
    val_set = ClassificationDataset(
        val_samples, class_names, classify_eval_transform(cfg.imgsz, augment.crop_fraction)
    )
    net = rebuild_model(meta)
    transfer = config_from_dict(TransferConfig, meta["transfer"], str(last))
    return _fit_stages(net, train_set, val_set, cfg, run_dir, meta, transfer, start_stage=stage, resume=last)


def load_classifier(weights: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """A trained classifier and its metadata (class names, input size, normalisation)."""
    return load_task_model(weights, "classify")


def val(
    weights: str | os.PathLike[str],
    data: str | os.PathLike[str] | None = None,
    *,
    batch: int = 64,
    imgsz: int | None = None,
    device: str = "auto",
    workers: int = 2,
    fast: bool = True,
) -> tuple[dict[str, float], ClassificationEvaluator]:
    """Evaluate a trained classifier on a class-folder or CSV dataset (classes matched by name); without
    ``data``, on the validation split of the training data (the same seeded split)."""
    model, meta = load_classifier(weights)
    size = imgsz or int(meta.get("imgsz", 224))
    transform = classify_eval_transform(size, float(meta.get("crop_fraction", 0.875)))
    dataset = _val_dataset(weights, meta, data, transform)
    task = ClassificationTask(len(dataset.class_names))
    return evaluate_dataset(task, model, dataset, batch=batch, device=device, workers=workers, fast=fast)


def _val_dataset(
    weights: str | os.PathLike[str], meta: dict[str, Any], data: str | os.PathLike[str] | None, transform: Any
) -> ClassificationDataset:
    """``data`` (class folders, a dataset root's validation split, or a CSV), or without it the training
    data's validation split (the same seeded split); classes matched by name."""
    names = meta.get("class_names")
    if data is None:
        if "data" not in meta:
            raise DataError(f"{weights} does not record its training data; pass --data")
        seed = int(meta.get("train_config", {}).get("seed", 0))
        _, val_samples, _ = resolve_splits(meta["data"], meta.get("val"), meta.get("val_fraction", 0.2), seed)
        return ClassificationDataset(
            val_samples, meta["class_names"], transform, source=f"{meta['data']} (val)"
        )
    data = Path(data)
    if data.is_dir() and (data / "train").is_dir():  # a dataset root: evaluate its validation split
        split = next((data / v for v in VAL_DIR_NAMES if (data / v).is_dir()), None)
        if split is None:
            raise DataError(f"{data}: has train/ but no {'/'.join(VAL_DIR_NAMES)} folder to validate on")
        data = split
    if data.is_file():
        return ClassificationDataset.from_csv(data, transform, names)
    return ClassificationDataset.from_folder(data, transform, names)


@dataclass(frozen=True)
class Prediction:
    path: str
    topk: list[tuple[str, float]]  # (class name, probability), most likely first
    drawn: str | None = None  # the image with its top classes written on it (``out``)


@torch.inference_mode()
def predict(
    weights: str | os.PathLike[str],
    sources: Iterable[str | os.PathLike[str]],
    *,
    topk: int = 5,
    batch: int = 32,
    device: str = "auto",
    fast: bool = True,
    out: str | os.PathLike[str] | None = None,
) -> Iterable[Prediction]:
    """Classify images (files, folders or globs, and video frames), yielding predictions as batches
    complete; ``fast=False`` runs in fp32 without the fast inference path. With ``out``, each image is
    written there with its top classes on it.

    Unreadable images are reported in the log and skipped.
    """
    model, meta = load_classifier(weights)
    prepared = prepare(model, select_device(device), fast)
    names = meta.get("class_names") or [str(i) for i in range(int(model.num_classes))]  # type: ignore[arg-type]
    transform = classify_eval_transform(int(meta.get("imgsz", 224)), float(meta.get("crop_fraction", 0.875)))
    k = min(topk, len(names))
    out_dir = Path(out) if out is not None else None
    frames: list[Any] = []
    tensors: list[torch.Tensor] = []

    def flush() -> Iterable[Prediction]:
        probs = prepared(torch.stack(tensors)).float().softmax(1)
        top = probs.topk(k, 1)
        for frame, values, indices in zip(frames, top.values.tolist(), top.indices.tolist()):
            topk = [(names[i], round(v, 6)) for v, i in zip(values, indices)]
            drawn = (
                None if out_dir is None else str(draw_topk(frame.image, topk, out_dir / f"{frame.stem}.jpg"))
            )
            yield Prediction(frame.name, topk, drawn)
        frames.clear()
        tensors.clear()

    for frame in iter_frames(sources):
        frames.append(frame)
        tensors.append(transform(frame.image))
        if len(tensors) == batch:
            yield from flush()
    if tensors:
        yield from flush()


def draw_topk(image: torch.Tensor, topk: Sequence[tuple[str, float]], path: Path) -> Path:
    """Write ``image [3, H, W] uint8`` with its top classes and probabilities in a strip below it (small
    images are enlarged first, so the text never covers the picture)."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(image.permute(1, 2, 0).numpy())
    if img.width < 224:
        scale = 224 / img.width
        img = img.resize((224, max(1, round(img.height * scale))), Image.Resampling.NEAREST)
    lines = [f"{c} {v:.2f}" for c, v in topk[:3]]
    canvas = Image.new("RGB", (img.width, img.height + 12 * len(lines) + 6), (0, 0, 0))
    canvas.paste(img, (0, 0))
    ImageDraw.Draw(canvas).multiline_text((4, img.height + 3), "\n".join(lines), fill=(255, 255, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, quality=92)
    return path


def predictions_to_json(preds: Iterable[Prediction]) -> str:
    return json.dumps(
        [{"path": p.path, "topk": [{"class": c, "prob": v} for c, v in p.topk]} for p in preds], indent=2
    )
