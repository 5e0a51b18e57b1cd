"""Classification: the task spec (class folders or a path,label CSV; transfer learning in two stages),
and ``predict`` with the top classes drawn under each image."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnkit.api import create_model
from cnnkit.data.classify import ClassificationDataset, read_label_csv, scan_image_folder, split_dataset
from cnnkit.data.formats import layout_task
from cnnkit.data.images import OutputNames, iter_frames
from cnnkit.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentConfig,
    classify_eval_transform,
    classify_train_transform,
)
from cnnkit.engine.callbacks import Callback
from cnnkit.engine.config import TrainConfig
from cnnkit.engine.freeze import count_parameters, freeze_base
from cnnkit.engine.trainer import FitResult, fit
from cnnkit.errors import DataError
from cnnkit.registry import expected_normalisation
from cnnkit.tasks.base import TTA, Task
from cnnkit.tasks.classify import ClassificationEvaluator, ClassificationTask
from cnnkit.weights import read_metadata
from cnnkit.workflows.common import Loaded, classifier_transform
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

VAL_DIR_NAMES = ("val", "valid", "validation", "test")


@dataclass(frozen=True)
class ClassifyOptions:
    """Data, model, the transfer-learning recipe and augmentation of a classification run.

    ``freeze``: stage 1 trains only the head (plus ``trainable`` layers; with no ``fine_tune_epochs``,
    also the last ``unfreeze_last`` blocks). ``fine_tune_epochs`` > 0 adds stage 2: the last
    ``unfreeze_last`` blocks train too, at ``fine_tune_lr_factor`` x the learning rate. BatchNorm of the
    base stays in inference mode throughout.
    """

    data: str | None = option(None, "train/ + val/ class folders, one class-folder root, or a path,label CSV")
    val: str | None = option(None, "an explicit validation folder or CSV")
    val_fraction: float = option(0.2, "seeded validation split when the data has none")
    model: str | None = option(
        None, "a registered model name (cnnkit models); default: --pretrained's model, else resnet18"
    )
    model_args: dict[str, Any] | None = option(None, "JSON of builder arguments, e.g. '{\"width\": 0.5}'")
    pretrained: str | None = option(
        None,
        "a cnnkit/torchvision/timm/Keras weights file, or a tag to download (cnnkit models --pretrained); "
        "the images are normalised as these weights expect",
    )
    mean: tuple[float, ...] | None = option(
        None, "normalisation mean of [0, 1] RGB pixels (default: what --pretrained expects, else ImageNet's)"
    )
    std: tuple[float, ...] | None = option(None, "normalisation std, with --mean")
    freeze: bool = option(False, "freeze the base (BatchNorm in inference mode)")
    unfreeze_last: int = option(0, "base blocks (from the end) to train too")
    trainable: tuple[str, ...] = option((), "base layers to train by name (e.g. stages.3)")
    fine_tune_epochs: int = option(0, "stage 2 (fine-tuning the last blocks) after the frozen stage 1")
    fine_tune_lr_factor: float = option(0.1, "stage 2 learning rate, as a fraction of --lr")
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy")
    fliplr: float = option(0.5, "horizontal flip probability")
    crop_fraction: float = option(0.875, "evaluation: centre crop of the resized image")
    strict: bool = option(False, "stop at the first unreadable image instead of skipping it")


@dataclass(frozen=True)
class ClassifyPredict:
    topk: int = option(5, "classes shown per image")


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
        samples, found = scan_image_folder(source, empty_ok=names is not None)
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
    other = layout_task(data)
    if other is not None:
        raise DataError(
            f"{data} is laid out for {other} (an image folder beside its labels), not class folders: "
            f"cnnkit train {other} --data {data}"
        )
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


def _normalisation(opts: ClassifyOptions) -> tuple[list[float], list[float]]:
    """The mean and std given, else those of the pretrained weights (a Keras MobileNetV2 wants [-1, 1]),
    else ImageNet's."""
    if (opts.mean is None) != (opts.std is None) or len(opts.mean or (0,) * 3) != len(opts.std or (0,) * 3):
        raise DataError(f"--mean and --std go together, one value per channel; got {opts.mean}, {opts.std}")
    if opts.mean is not None and opts.std is not None:
        if min(opts.std) <= 0:
            raise DataError(f"--std must be positive, got {list(opts.std)}")
        return list(opts.mean), list(opts.std)
    return expected_normalisation(opts.pretrained) or (list(IMAGENET_MEAN), list(IMAGENET_STD))


def _dataset(
    samples: Any, opts: ClassifyOptions, cfg: TrainConfig, names: list[str], train: bool
) -> ClassificationDataset:
    mean, std = (tuple(v) for v in _normalisation(opts))
    if train:
        augment = AugmentConfig(hflip=opts.fliplr, crop_fraction=opts.crop_fraction)
        transform = classify_train_transform(cfg.square, augment, mean, std)
    else:
        transform = classify_eval_transform(cfg.square, opts.crop_fraction, mean, std)
    split = "train" if train else "val"
    return ClassificationDataset(
        samples, names, transform, source=f"{opts.data} ({split})", strict=opts.strict
    )


def _record(opts: ClassifyOptions) -> dict[str, Any]:
    mean, std = _normalisation(opts)
    return {"crop_fraction": opts.crop_fraction, "mean": mean, "std": std}


@register_task("classify")
class Classify(TaskSpec):
    help = "image classification (class folders or a path,label CSV)"
    data_help = "class folders, a dataset root (its val split) or a CSV"
    Options = ClassifyOptions
    PredictOptions = ClassifyPredict
    val_batch = 64

    def build_data(
        self, opts: ClassifyOptions, cfg: TrainConfig, names: Sequence[str] | None = None
    ) -> TaskData:
        train, val, found = resolve_splits(opts.data or ".", opts.val, opts.val_fraction, cfg.seed)
        train_set, val_set = (_dataset(s, opts, cfg, found, t) for s, t in ((train, True), (val, False)))
        skipped = [*train_set.skipped.items, *val_set.skipped.items]
        return TaskData(train_set, val_set, found, skipped, _record(opts))

    def shard_data(self, opts: ClassifyOptions, cfg: TrainConfig, shards: Any) -> TaskData:
        names = list(shards.names)
        train, val = (shards.stream(split, partial(_dataset, opts=opts, cfg=cfg, names=names, train=t))
                      for split, t in (("train", True), ("val", False)))  # fmt: skip
        return TaskData(train, val, names, [], _record(opts))

    def labelled(self, dataset: ClassificationDataset) -> list[Labelled]:
        return [Labelled(path, [label]) for path, label in dataset.samples]

    def build_model(self, opts: ClassifyOptions, data: TaskData, cfg: TrainConfig) -> nn.Module:
        args = dict(opts.model_args or {})
        name = opts.model or (None if opts.pretrained else "resnet18")
        return create_model(name, num_classes=len(data.names or ()), weights=opts.pretrained, **args)

    def objective(
        self,
        opts: ClassifyOptions,
        data: TaskData,
        model: nn.Module,
        cfg: TrainConfig,
        val_options: Any = None,
    ) -> Task:
        return ClassificationTask(len(data.names or ()), opts.label_smoothing)

    def fit(
        self,
        task: Task,
        model: nn.Module,
        data: TaskData,
        cfg: TrainConfig,
        run_dir: Path,
        metadata: dict[str, Any],
        *,
        opts: ClassifyOptions,
        resume: Path | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> FitResult:
        """Stage 1 (the head, or the whole net without ``freeze``), then stage 2 (fine-tuning the last
        blocks at a lower learning rate, in ``run_dir/finetune``) when asked for."""
        two_stage = opts.freeze and opts.fine_tune_epochs > 0
        if int(metadata.get("stage", 1)) == 1:
            if opts.freeze:
                frozen, kept = freeze_base(model, 0 if two_stage else opts.unfreeze_last, opts.trainable)
                _log_trainable(
                    model, f"stage 1: base frozen ({len(frozen)} blocks), training {['head', *kept]}"
                )
            result = fit(
                task,
                model,
                data.train,
                data.val,
                cfg,
                run_dir,
                resume=resume,
                metadata=metadata,
                callbacks=callbacks,
            )
            if not two_stage:
                return result
            resume = None
        freeze_base(model, opts.unfreeze_last, opts.trainable)
        _log_trainable(
            model,
            f"stage 2: fine-tuning the last {opts.unfreeze_last} blocks at {opts.fine_tune_lr_factor:g}x lr",
        )
        stage2 = cfg.replace(epochs=opts.fine_tune_epochs, lr=cfg.lr * opts.fine_tune_lr_factor)
        result = fit(
            task,
            model,
            data.train,
            data.val,
            stage2,
            run_dir / "finetune",
            resume=resume,
            metadata={**metadata, "stage": 2},
            callbacks=callbacks,
        )
        return best_of_both_stages(run_dir, result)

    def val_data(
        self, opts: ClassifyOptions, cfg: TrainConfig, names: Sequence[str] | None, given: bool
    ) -> TaskData:
        """Without ``given`` data, the training run's validation split (the same seeded split); with it,
        every image of that folder or CSV (a dataset root: its validation split), its classes matched to
        the model's by name."""
        if not given:
            return self.build_data(opts, cfg, names)
        transform = classify_eval_transform(cfg.square, opts.crop_fraction, *map(tuple, _normalisation(opts)))
        data = Path(opts.data or ".")
        if data.is_dir() and (data / "train").is_dir():  # a dataset root: evaluate its validation split
            split = next((data / v for v in VAL_DIR_NAMES if (data / v).is_dir()), None)
            if split is None:
                raise DataError(f"{data}: has train/ but no {'/'.join(VAL_DIR_NAMES)} folder to validate on")
            data = split
        if data.is_file():
            dataset = ClassificationDataset.from_csv(data, transform, names)
        else:
            dataset = ClassificationDataset.from_folder(data, transform, names)
        return TaskData(None, dataset, list(names or dataset.class_names))

    def val_report(self, evaluator: ClassificationEvaluator, names: Sequence[str] | None) -> ValReport:
        return ValReport({}, evaluator.per_class(list(names) if names else None))

    def predict(
        self, weights: str, sources: Sequence[str], *, out: str | None, options: Any = None, **kw: Any
    ) -> Iterator[PredictRecord]:
        topk = (options or ClassifyPredict()).topk
        for p in predict(weights, sources, topk=topk, out=out, **kw):
            top = [{"class": c, "prob": round(v, 4)} for c, v in p.topk]
            text = ", ".join(f"{c} {v:.3f}" for c, v in p.topk)
            yield PredictRecord({"path": p.path, "topk": top, "drawn": p.drawn}, f"{p.path}: {text}")


def best_of_both_stages(run_dir: Path, stage2: FitResult) -> FitResult:
    """The result of a two-stage run: fine-tuning's, but with the better of the two stages' best weights
    (fine-tuning can lower the score: then stage 1's ``weights/best.safetensors`` stays the best).
    Epochs count on from stage 1's."""
    stage1 = read_metadata(run_dir / "weights" / "best.safetensors")
    first_epochs = int(read_metadata(run_dir / "weights" / "last.safetensors").get("epoch", 0))
    fitness = float((stage1.get("metrics") or {}).get(stage2.fitness_key, -math.inf))
    if fitness > stage2.best_fitness:
        log.info(
            "best over both stages: stage 1, epoch %d (%s %.4f > fine-tuning's %.4f)",
            int(stage1.get("epoch", 0)),
            stage2.fitness_key,
            fitness,
            stage2.best_fitness,
        )
        return dataclasses.replace(
            stage2,
            best_fitness=fitness,
            best_epoch=int(stage1.get("epoch", 0)),
            best_file=run_dir / "weights" / "best.safetensors",
        )
    log.info(
        "best over both stages: fine-tuning, epoch %d (%s %.4f)",
        stage2.best_epoch,
        stage2.fitness_key,
        stage2.best_fitness,
    )
    return dataclasses.replace(stage2, best_epoch=first_epochs + stage2.best_epoch)


def _log_trainable(model: nn.Module, what: str) -> None:
    trainable, frozen = count_parameters(model)
    log.info(
        "%s; %s trainable, %s frozen parameters (frozen BatchNorm in inference mode)",
        what,
        f"{trainable:,}",
        f"{frozen:,}",
    )


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
    tta: bool | TTA = False,
    ensemble: Sequence[str | os.PathLike[str]] = (),
    loaded: Loaded | None = None,
    out: str | os.PathLike[str] | None = None,
) -> Iterable[Prediction]:
    """Classify images (files, folders or globs, and video frames), yielding predictions as batches
    complete; ``fast=False`` runs in fp32 without the fast inference path. With ``out``, each image is
    written there with its top classes on it.

    Unreadable images are reported in the log and skipped.
    """
    session = Loaded.of(
        weights, "classify", tta=tta, ensemble=ensemble, device=device, fast=fast, loaded=loaded
    )
    model, meta, prepared = session.model, session.meta, session.prepared
    names = meta.get("class_names") or [str(i) for i in range(int(model.num_classes))]  # type: ignore[arg-type]
    transform = classifier_transform(meta)  # the recorded normalisation (a Keras import's [-1, 1])
    k = min(topk, len(names))
    out_dir = Path(out) if out is not None else None
    names_out = OutputNames(out_dir)
    frames: list[Any] = []
    tensors: list[torch.Tensor] = []

    def flush() -> Iterable[Prediction]:
        probs = prepared(torch.stack(tensors)).float().softmax(1)
        top = probs.topk(k, 1)
        for frame, values, indices in zip(frames, top.values.tolist(), top.indices.tolist()):
            topk = [(names[i], round(v, 6)) for v, i in zip(values, indices)]
            drawn = (
                None if out_dir is None else str(draw_topk(frame.image, topk, names_out.path(frame, ".jpg")))
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
