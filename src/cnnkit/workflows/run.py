"""The generic verbs, written once for every task spec: ``train``, ``resume``, ``val``, ``predict``.

```python
from cnnkit.workflows import run
result = run.train("classify", "data/digits", model="mobilenet_v2", cfg=TrainConfig(epochs=5, imgsz=64))
report = run.val(result.best)                       # the task comes from the weights' run record
records = list(run.predict(result.best, ["img.jpg"], topk=3))
run.resume("runs/classify/exp")                     # with the options the run was started with
```

A spec says how to read its data, build its model and score it (:class:`~cnnkit.workflows.spec.TaskSpec`);
everything else (seeding, the run directory, the record of the run, skipped files, checkpoints,
resuming, evaluating with the training split) is here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

from cnnkit.engine.callbacks import Callback
from cnnkit.engine.config import TrainConfig, config_from_dict
from cnnkit.engine.loops import check_trainable
from cnnkit.engine.trainer import FitResult, new_run_dir, seed_everything
from cnnkit.errors import CnnkitError, DataError
from cnnkit.tasks.base import TTA
from cnnkit.weights import read_metadata, task_of
from cnnkit.workflows.common import (
    Loaded,
    calibration_batches,
    evaluate_dataset,
    load_task_model,
    rebuild_model,
    record_skipped,
    resume_point,
    write_val_outputs,
)
from cnnkit.workflows.record import RunRecord
from cnnkit.workflows.shards import is_shards, task_data
from cnnkit.workflows.spec import PredictRecord, TaskSpec, ValReport, get_task

log = logging.getLogger("cnnkit")
TRAIN_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))  # keywords train() gives to cfg


def _spec(task: str | TaskSpec) -> TaskSpec:
    return task if isinstance(task, TaskSpec) else get_task(task)


def train(
    task: str | TaskSpec,
    data: str | os.PathLike[str] | None = None,
    *,
    cfg: TrainConfig | None = None,
    project: str | os.PathLike[str] = "runs",
    name: str = "exp",
    callbacks: Sequence[Callback] = (),
    options: Any = None,
    **values: Any,
) -> FitResult:
    """Train ``task`` on ``data``: ``options`` is the spec's ``Options`` instance, or give its fields as
    keyword arguments (the command line's names: ``model=``, ``freeze=``, ``mosaic=``...); the training
    configuration's fields (``epochs=``, ``imgsz=``, ``lr=``...) may be keywords too, instead of ``cfg``."""
    spec = _spec(task)
    engine = {k: values.pop(k) for k in list(values) if k in TRAIN_FIELDS}
    if engine:
        cfg = (cfg or TrainConfig()).replace(**engine)
    if options is None:
        if data is not None:
            values["data"] = str(data)
        options = config_from_dict(spec.Options, values, f"train {spec.name}")
    elif values or data is not None:
        raise CnnkitError("pass the task's options either as options= or as keyword arguments, not both")
    if not getattr(options, "data", None):
        raise CnnkitError(f"train {spec.name}: data is required")
    fraction = getattr(options, "val_fraction", 0.2)
    if not 0 < fraction < 1:
        raise CnnkitError(f"val_fraction must be between 0 and 1 (the share held out), got {fraction}")
    cfg = cfg or TrainConfig()
    data_ = task_data(spec, options, cfg)
    seed_everything(cfg.seed)  # the new model's initialisation is part of the seeded run
    model = spec.build_model(options, data_, cfg)
    check_trainable(model, cfg, getattr(options, "model", None) or spec.name)
    config: dict[str, Any] = model.cnnkit_config  # type: ignore[assignment]
    for key in ("weights", "backbone_weights", "encoder_weights"):  # weights come from checkpoints now
        config["args"].pop(key, None)
    run_dir = new_run_dir(project, spec.name, name)
    record_skipped(run_dir, data_.skipped)
    opts = dataclasses.asdict(options)
    record = RunRecord.new(
        spec.name,
        config,
        cfg,
        class_names=data_.names,
        data=opts["data"],
        val=opts.get("val"),
        val_fraction=opts.get("val_fraction", 0.2),
        options=opts,
        **data_.record,
    )
    task_ = spec.objective(options, data_, model, cfg)
    return spec.fit(
        task_, model, data_, cfg, run_dir, record.to_metadata(), opts=options, callbacks=callbacks
    )


RESUME_CHANGES = ("epochs", "device", "workers", "quiet", "plots")  # what a resumed run may change


def resume(
    run: str | os.PathLike[str],
    *,
    task: str | None = None,
    callbacks: Sequence[Callback] = (),
    **changes: Any,
) -> FitResult:
    """Continue a stopped run (its directory or ``weights/last.pt``) with the model, data, options and
    training configuration it was started with. ``changes``: only :data:`RESUME_CHANGES`; ``epochs``
    (more than the run has done) extends it, the schedule stretched to the new length. ``task``:
    refuse a run of another task."""
    last, meta, cfg = resume_point(run)
    done = meta.pop("completed_epochs")
    if task is not None and meta["task"] != task:
        raise CnnkitError(f"{run} is a {meta['task']} run: cnnkit train {meta['task']} --resume {run}")
    refused = sorted(set(changes) - set(RESUME_CHANGES))
    if refused:
        raise CnnkitError(f"a resumed run keeps its {refused}; it may change only {list(RESUME_CHANGES)}")
    if changes.get("epochs") is not None and changes["epochs"] <= done:
        raise CnnkitError(
            f"epochs {changes['epochs']}: {run} has already trained {done}; give more to extend it"
        )
    if "epochs" in changes:
        log.info(
            "extending %s from %d to %d epochs: the learning-rate schedule is recomputed for %d epochs "
            "(its decay stretched to the new length), continuing from epoch %d",
            run, cfg.epochs, changes["epochs"], changes["epochs"], done,
        )  # fmt: skip
    cfg = cfg.replace(**changes)
    meta["train_config"] = {**meta["train_config"], **changes}
    spec = get_task(meta["task"])
    options = options_from_record(spec, meta, str(last))
    data = task_data(spec, options, cfg, meta.get("class_names"))
    if meta.get("class_names") and data.names != meta["class_names"]:
        raise DataError(
            f"{options.data}: the classes changed since the run started (were {meta['class_names']})"
        )
    model = rebuild_model(meta)
    objective = spec.objective(options, data, model, cfg)
    run_dir = last.parent.parent
    if int(meta.get("stage", 1)) > 1:  # a later stage lives in a folder of its run
        run_dir = run_dir.parent
    return spec.fit(
        objective, model, data, cfg, run_dir, meta, opts=options, resume=last, callbacks=callbacks
    )


def val(
    weights: str | os.PathLike[str],
    data: str | os.PathLike[str] | None = None,
    *,
    task: str | None = None,
    options: Any = None,
    batch: int | None = None,
    imgsz: int | None = None,
    device: str = "auto",
    workers: int = 2,
    fast: bool = True,
    backend: str | None = None,
    calib: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    name: str = "exp",
    tta: bool | TTA = False,
    ensemble: Sequence[str | os.PathLike[str]] = (),
) -> ValReport:
    """Evaluate trained ``weights`` on ``data`` (default: the validation split the training used, by the
    same seed); ``task``: refuse weights of another task. ``options`` is the spec's ``ValOptions``
    instance (thresholds), None for its defaults. With ``out``, a new folder ``out/TASK/name`` (``name2``...
    when it exists) gets ``metrics.json``, ``per_class.csv``, the task's plots and ``val_pred.jpg``.
    ``tta``: average each image with its mirror; ``ensemble``: more weights averaged with these.
    ``backend``: what runs the model (:mod:`cnnkit.backends`); ``calib``: images int8 calibrates on."""
    spec = _spec_of(weights, task)
    if spec.name == "detect" and str(weights).endswith(".onnx"):
        raise CnnkitError(
            f"{weights}: an exported detector holds decoded boxes; evaluate its .safetensors weights "
            "(predict works on the .onnx file)"
        )
    model, meta = load_task_model(weights, spec.name, tta=tta, ensemble=ensemble)
    recorded = options_from_record(spec, meta, str(weights))
    if data is None and not recorded.data:
        raise DataError(f"{weights} does not record its training data; pass --data")
    if data is not None:
        recorded = dataclasses.replace(recorded, data=str(data), **_drop_val(recorded))
    if options is None and spec.ValOptions is not None:
        options = spec.ValOptions()
    if options is not None:  # a val option named like a training option replaces it (detect's --val JSON)
        known = {f.name for f in dataclasses.fields(recorded)}
        given = {k: v for k, v in dataclasses.asdict(options).items() if k in known and v is not None}
        recorded = dataclasses.replace(recorded, **given)
    seed = int(meta.get("train_config", {}).get("seed", 0))
    cfg = TrainConfig(imgsz=imgsz or meta.get("imgsz", 224), seed=seed)
    names = meta.get("class_names")
    if is_shards(recorded.data):
        dataset = task_data(spec, recorded, cfg, names)
    else:
        dataset = spec.val_data(recorded, cfg, names, given=data is not None)
    objective = spec.objective(recorded, dataset, model, cfg, val_options=options)
    metrics, evaluator = evaluate_dataset(
        objective,
        model,
        dataset.val,
        batch=batch or spec.val_batch,
        device=device,
        workers=workers,
        fast=fast,
        backend=backend,
        calib=calibration_batches(calib, meta) if calib else (),
        collate_fn=dataset.collate_fn,
    )
    found = spec.val_report(evaluator, names)
    report = ValReport(metrics, found.per_class, found.extra)
    if out is None:
        return report
    folder = new_run_dir(out, spec.name, name)
    source = {"weights": str(weights), "data": recorded.data, "imgsz": cfg.imgsz}
    write_val_outputs(folder, report, source, evaluator, objective, model, dataset, names)
    return dataclasses.replace(report, out=folder)


def _spec_of(weights: str | os.PathLike[str], task: str | None) -> TaskSpec:
    """``task``'s spec, else that of the task ``weights`` were trained for (files without a task are
    classifiers); weights of another task are refused where the model is loaded (``load_task_model``)."""
    return get_task(task or task_of(read_metadata(weights)))


def _drop_val(options: Any) -> dict[str, Any]:
    """A new ``data`` brings its own validation split: the recorded explicit one no longer applies."""
    return {"val": None} if "val" in {f.name for f in dataclasses.fields(options)} else {}


def predict(
    weights: str | os.PathLike[str],
    sources: Sequence[Any],
    *,
    task: str | None = None,
    out: str | os.PathLike[str] | None = None,
    options: Any = None,
    backend: str | None = None,
    calib: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> Iterator[PredictRecord]:
    """Predict with trained ``weights`` on images (files, folders, globs, videos, or images in memory:
    PIL, numpy, tensors); ``out``: where the drawn images go. ``options`` is the spec's
    ``PredictOptions`` instance (None: its defaults); ``backend``: what runs the model
    (:mod:`cnnkit.backends`)."""
    spec = _spec_of(weights, task)
    if backend is not None and kwargs.get("loaded") is None:
        load = {k: kwargs.pop(k) for k in ("tta", "ensemble", "device", "fast") if k in kwargs}
        kwargs["loaded"] = Loaded.of(weights, spec.name, backend=backend, calib=calib, **load)
    yield from spec.predict(
        str(weights),
        [str(s) if isinstance(s, str | os.PathLike) else s for s in sources],  # or images in memory
        out=None if out is None else str(out),
        options=options,
        **kwargs,
    )


# -- the options of a recorded run ---------------------------------------------------------------------
# Names the first release stored its options under, and the fields they are now.
_RENAMED = {"hflip": "fliplr"}


_OLD_DEFAULTS = {"rect": False}  # options whose default changed, with the value records without them had


def options_from_record(spec: TaskSpec, meta: dict[str, Any], source: str) -> Any:
    """The spec's ``Options`` a run was trained with. Files of this release store every field under
    ``options`` (an unknown one is refused); files of the first release kept them in task-specific
    places (flat keys, nested ``augment``/``transfer`` dicts, the model's build arguments), gathered here."""
    fields = {f.name for f in dataclasses.fields(spec.Options)}
    stored = dict(meta.get("options") or {})
    if {"mean", "std"} <= fields and "mean" in meta and "std" in meta:  # as the run normalised, whatever
        stored.update(mean=meta["mean"], std=meta["std"])  # its --pretrained expects (or has become)
    if fields <= set(stored):  # written by this release: every field, and nothing unknown
        return config_from_dict(spec.Options, stored, f"{source}: options")
    values: dict[str, Any] = {}
    model = meta.get("model_config", {})
    sources = [
        {"model": model.get("name")} if "model" in fields and "backbone" not in fields else {},
        dict(model.get("args", {})),
        meta,
        meta.get("augment") or {},
        meta.get("transfer") or {},
        stored,
        stored.get("augment") or {},
    ]
    for mapping in sources:
        for key, value in mapping.items():
            key = _RENAMED.get(key, key)
            if key in fields and value is not None and (not isinstance(value, dict) or key.endswith("_args")):
                values[key] = value
    for key, value in _OLD_DEFAULTS.items():  # a default changed since: the run keeps what it trained with
        if key in fields:
            values.setdefault(key, value)
    log.debug("%s: options read from an earlier release's record: %s", source, sorted(values))
    return config_from_dict(spec.Options, values, f"{source}: options")
