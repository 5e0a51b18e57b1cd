"""``cnnkit train|val|predict TASK`` for every registered task spec, and ``cnnkit data`` / ``anchors``.

One loop over the task registry: each task's flags come from its ``Options`` dataclass, the engine's
from :class:`TrainConfig`, and the val/predict flags are the same for every task plus the few a spec
declares. Argument parsing only; the work is in workflows/."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from cnnkit.engine.config import TrainConfig, config_from_dict
from cnnkit.errors import CnnkitError
from cnnkit.io import load_yaml
from cnnkit.tasks.base import TTA
from cnnkit.workflows.spec import (
    TaskSpec,
    add_dataclass_arguments,
    get_task,
    list_tasks,
    values_from_args,
)

FAST_HELP = "fast inference path: folded BatchNorm, channels-last, bf16/fp16 autocast (--no-fast: fp32)"


def add_train_options(p: argparse.ArgumentParser) -> None:
    """Engine options of every task's ``train`` (flags, help and defaults from :class:`TrainConfig`)."""
    g = p.add_argument_group("training")
    g.add_argument("--config", help="YAML of training and task options (command-line flags override it)")
    g.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="processes on this machine (torch.distributed; or run under torchrun)",
    )
    g.add_argument("--project", default="runs", help="root of run directories (default runs/)")
    g.add_argument("--name", default="exp", help="run name (runs/TASK/NAME, numbered if it exists)")
    g.add_argument("--resume", help="a run directory or its weights/last.pt to continue")
    add_dataclass_arguments(g, TrainConfig)


def train_config(args: argparse.Namespace, yaml_values: dict[str, Any] | None = None) -> TrainConfig:
    values = {**(yaml_values or {}), **values_from_args(args, TrainConfig)}
    if values.get("grad_clip") == 0:
        values["grad_clip"] = None
    return config_from_dict(TrainConfig, values, args.config or "options")


def _options(args: argparse.Namespace, cls: type | None) -> Any:
    """A spec's val/predict options (its dataclass's defaults where not given), or None if it has none."""
    return None if cls is None else config_from_dict(cls, values_from_args(args, cls), "options")


def _split_yaml(path: str | None, spec: TaskSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """A ``--config`` YAML's training keys and task keys; unknown keys are refused."""
    if not path:
        return {}, {}
    values = load_yaml(path)
    task_keys = {f.name for f in dataclasses.fields(spec.Options)}
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - task_keys - train_keys)
    if unknown:
        raise CnnkitError(f"{path}: unknown keys {unknown}; known: {sorted(train_keys | task_keys)}")
    return {k: v for k, v in values.items() if k in train_keys}, {
        k: v for k, v in values.items() if k in task_keys
    }


def cmd_train(args: argparse.Namespace) -> int:
    from cnnkit.workflows import run

    spec: TaskSpec = args.spec
    if args.resume:
        _refuse_options_with_resume(args, spec)
        changes = {k: v for k, v in values_from_args(args, TrainConfig).items() if k in run.RESUME_CHANGES}
        result = run.resume(args.resume, task=spec.name, **changes)
    else:
        train_yaml, task_yaml = _split_yaml(args.config, spec)
        opts: Any = config_from_dict(spec.Options, {**task_yaml, **values_from_args(args, spec.Options)})
        if not getattr(opts, "data", None):
            raise CnnkitError(f"train {spec.name}: --data is required (or --resume RUN)")
        cfg = train_config(args, train_yaml)
        result = run.train(spec, options=opts, cfg=cfg, project=args.project, name=args.name)
    from cnnkit.engine.distributed import info

    if info().is_main:
        print(
            f"best {result.best}  (epoch {result.best_epoch}, {result.fitness_key} {result.best_fitness:.4f})"
        )
        print(f"results in {result.run_dir}")
    return 0


def _refuse_options_with_resume(args: argparse.Namespace, spec: TaskSpec) -> None:
    """A resumed run continues with the options it was started with; a flag that would change them is
    refused rather than silently ignored (``--epochs`` extends the run, and the running knobs ``--device``,
    ``--workers``, ``--quiet`` and ``--plots`` may change)."""
    from cnnkit.workflows.run import RESUME_CHANGES

    given = [*values_from_args(args, spec.Options), *values_from_args(args, TrainConfig)]
    given = [k for k in given if k not in RESUME_CHANGES]
    if args.config:
        given.append("config")
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise CnnkitError(
            f"--resume continues {args.resume} with the options it was started with; drop {flags} "
            "(or start a new run with them)"
        )


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def cmd_val(args: argparse.Namespace) -> int:
    from cnnkit.workflows import run

    spec: TaskSpec = args.spec
    report = run.val(
        args.weights,
        args.data,
        task=spec.name,
        batch=args.batch,
        imgsz=args.imgsz,
        device=args.device,
        workers=args.workers,
        fast=args.fast,
        backend=args.backend,
        calib=args.calib,
        options=_options(args, spec.ValOptions),
        out=args.out,
        name=args.name,
        tta=_tta(args),
        ensemble=args.ensemble,
    )
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0
    print("  ".join(f"{k} {_fmt(v)}" for k, v in report.metrics.items()))
    for name, values in report.extra.items():
        print(f"{name}: " + "  ".join(f"{k} {_fmt(v)}" for k, v in values.items()))
    for row in report.per_class:
        cells = "  ".join(f"{k} {_fmt(v)}" for k, v in row.items() if k != "class")
        print(f"  {row['class']:<20} {cells}")
    if report.out is not None:
        print(f"results in {report.out}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from cnnkit.engine.loops import new_run_dir
    from cnnkit.weights import read_metadata, task_of
    from cnnkit.workflows.explain import explain

    folder = new_run_dir(args.out, task_of(read_metadata(args.weights)), "exp")
    options = {"method": args.method, "layer": args.layer, "target_class": args.target_class}
    for e in explain(
        args.weights,
        args.sources,
        **options,
        max_boxes=args.max_boxes,
        conf=args.conf,
        out=folder,
        device=args.device,
    ):
        targets = "; ".join(t.label for t in e.targets) or "nothing detected"
        print(f"{e.path}: {targets} -> {e.drawn}")
    print(f"results in {folder}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from cnnkit.workflows import run

    spec: TaskSpec = args.spec
    records = []
    for record in run.predict(
        args.weights,
        args.sources,
        task=spec.name,
        out=args.out,
        device=args.device,
        fast=args.fast,
        backend=args.backend,
        calib=args.calib,
        options=_options(args, spec.PredictOptions),
        tta=_tta(args),
        ensemble=args.ensemble,
    ):
        if args.json:
            records.append(record)
        else:
            print(record.text, flush=True)
    if args.json:
        print(json.dumps(spec.predictions_json(records), indent=2))
    return 0


def _tta(args: argparse.Namespace) -> bool | TTA:
    return TTA(flip=args.tta, scales=tuple(args.tta_scales)) if args.tta_scales else bool(args.tta)


def _add_inference_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--weights", required=True, help="trained cnnkit weights (.safetensors, or an exported .onnx)"
    )
    p.add_argument(
        "--tta", action="store_true", help="test-time augmentation: average each image with its mirror"
    )
    p.add_argument(
        "--tta-scales",
        nargs="+",
        type=float,
        default=[],
        metavar="S",
        help="test-time augmentation: also run each image resized by these factors (e.g. 0.83 1.17)",
    )
    p.add_argument(
        "--ensemble",
        nargs="+",
        default=[],
        metavar="W",
        help="more weights to combine with --weights (detectors with other anchors or strides: box fusion)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True, help=FAST_HELP)
    add_backend_flag(p)
    p.add_argument("--json", action="store_true", help="print JSON")


def add_backend_flag(p: argparse.ArgumentParser) -> None:
    from cnnkit.backends import CHOICES

    p.add_argument(
        "--backend", choices=CHOICES, metavar="NAME",
        help=f"what runs the model: {', '.join(CHOICES)} (default: $CNNKIT_BACKEND or eager, the fast "
        "PyTorch path; auto times the installed ones once per model and machine and keeps the fastest "
        "that agrees with fp32; *-int8 need --calib)",
    )  # fmt: skip
    p.add_argument("--calib", metavar="DATA", help="images int8 calibrates on (a few hundred training ones)")


def cmd_data_builtin(args: argparse.Namespace) -> int:
    from cnnkit.data import builtin

    writers = {
        "classify": lambda: builtin.write_classification(args.out, seed=args.seed, limit=args.limit),
        "segment": lambda: builtin.write_segmentation(args.out, seed=args.seed),
        "localize": lambda: builtin.write_localization(args.out, seed=args.seed),
        "landmarks": lambda: builtin.write_landmarks(args.out, seed=args.seed),
        "detect": lambda: builtin.write_detection(args.out, seed=args.seed),
    }
    if args.name == "scenes":
        if args.task != "segment":
            raise CnnkitError("the built-in scenes are a segmentation set: --task segment")
        from cnnkit.data.scenes import write_scenes

        writers["segment"] = lambda: write_scenes(args.out, seed=args.seed)
    out = writers[args.task]()
    print(f"wrote {args.task} data to {out}", file=sys.stderr)
    return 0


def cmd_data_convert(args: argparse.Namespace) -> int:
    from cnnkit.data.formats.convert import convert

    out = convert(args.data, args.to, args.out, strict=args.strict)
    print(f"wrote {args.data} as {args.to} to {out}", file=sys.stderr)
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from cnnkit.workflows.check import check

    extra = {"val_fraction": args.val_fraction} if args.val_fraction is not None else {}
    out = None if args.no_pictures else args.out
    report = check(args.task, args.data, out=out, samples=args.samples, seed=args.seed, **extra)
    print(report.text())
    return 0


def cmd_data_pack(args: argparse.Namespace) -> int:
    from cnnkit.workflows.shards import pack_data

    extra = {"val_fraction": args.val_fraction} if args.val_fraction is not None else {}
    out = pack_data(args.task, args.data, args.out, shard_size=args.shard_size, seed=args.seed,
                    strict=args.strict, **extra)  # fmt: skip
    print(
        f"wrote {args.data} as WebDataset shards to {out} (manifest {out / 'dataset.yaml'})", file=sys.stderr
    )
    return 0


def cmd_anchors(args: argparse.Namespace) -> int:
    from cnnkit.workflows import detect

    fit = detect.anchors(args.data, args.k, imgsz=args.imgsz, seed=args.seed)
    print(f"{args.k} anchors (w x h pixels at {args.imgsz}), mean best IoU {fit.mean_iou:.3f}:")
    print("  " + "  ".join(f"{w:.1f},{h:.1f}" for w, h in fit.anchors.tolist()))
    return 0


def add_commands(sub: Any) -> None:
    """Register ``train``, ``val``, ``predict`` (one sub-command per task), ``data`` and ``anchors``."""
    train = sub.add_parser("train", help="train a model").add_subparsers(dest="task", required=True)
    val = sub.add_parser("val", help="evaluate trained weights").add_subparsers(dest="task", required=True)
    predict = sub.add_parser("predict", help="run trained weights on images").add_subparsers(
        dest="task", required=True
    )
    for name in list_tasks():
        spec = get_task(name)
        p = train.add_parser(name, help=spec.help)
        add_dataclass_arguments(p.add_argument_group(f"{name} options"), spec.Options)
        add_train_options(p)
        p.set_defaults(func=cmd_train, spec=spec)

        p = val.add_parser(name, help=spec.help)
        _add_inference_flags(p)
        p.add_argument("--data", help=spec.data_help)
        p.add_argument("--batch", type=int, help=f"batch size (default {spec.val_batch})")
        p.add_argument("--imgsz", type=int, help="input size (default: the training size)")
        p.add_argument("--workers", type=int, default=2, help="data loading processes (default 2)")
        p.add_argument(
            "--out",
            default="runs/val",
            help="metrics.json, per_class.csv and the plots go to a new OUT/TASK/NAME (default runs/val)",
        )
        p.add_argument("--name", default="exp", help="the folder's name (NAME2, NAME3... when it exists)")
        if spec.ValOptions is not None:
            add_dataclass_arguments(p, spec.ValOptions)
        p.set_defaults(func=cmd_val, spec=spec)

        p = predict.add_parser(name, help=spec.help)
        _add_inference_flags(p)
        p.add_argument("sources", nargs="+", help="image or video files, folders or globs")
        p.add_argument(
            "--out", default=f"runs/predict/{name}", help=f"where results are drawn (runs/predict/{name})"
        )
        if spec.PredictOptions is not None:
            add_dataclass_arguments(p, spec.PredictOptions)
        if name == "detect":  # kept for old scripts: drawn images are always written to --out now
            p.add_argument("--save-img", action="store_true", help=argparse.SUPPRESS)
        p.set_defaults(func=cmd_predict, spec=spec)

    p = sub.add_parser("explain", help="Grad-CAM heat maps: where a classifier, localizer or detector looked")
    p.add_argument("--weights", required=True, help="trained cnnkit weights (classify, localize, detect)")
    p.add_argument("sources", nargs="+", help="image or video files, folders or globs")
    p.add_argument("--method", choices=["gradcam", "gradcam++"], default="gradcam", help="(default gradcam)")
    p.add_argument("--layer", help="the module to explain (default: the deepest block of 6x6 cells or more)")
    p.add_argument("--class", dest="target_class", help="explain this class, not the predicted one")
    p.add_argument(
        "--max-boxes", type=int, default=5, help="detection: boxes explained per image (default 5)"
    )
    p.add_argument("--conf", type=float, default=0.25, help="detection: score threshold (default 0.25)")
    p.add_argument(
        "--out", default="runs/explain", help="pictures go to a new OUT/TASK/exp* (default runs/explain)"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default cpu)")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("anchors", help="k-means (1 - IoU) anchor boxes of a detection dataset")
    p.add_argument("--data", required=True)
    p.add_argument("-k", type=int, default=9, help="anchors to fit")
    p.add_argument("--imgsz", type=int, default=640, help="network input size the boxes are letterboxed to")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_anchors)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="action", required=True)
    p = data.add_parser(
        "builtin", help="write a built-in dataset to disk (digits: every task; scenes: segment)"
    )
    p.add_argument("name", choices=["digits", "scenes"])
    p.add_argument(
        "--task", choices=list_tasks(), default="classify", help="the task the data is laid out for"
    )
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="use only the first N digits")
    p.set_defaults(func=cmd_data_builtin)

    p = data.add_parser("convert", help="write a box dataset (any readable layout) as YOLO, COCO or VOC")
    p.add_argument("data", help="the dataset (YOLO, COCO, VOC, LabelMe, CreateML, box CSV)")
    p.add_argument("--to", required=True, choices=["yolo", "coco", "voc"])
    p.add_argument("--out", required=True, help="a new (or empty) folder")
    p.add_argument("--strict", action="store_true", help="stop at the first bad annotation")
    p.set_defaults(func=cmd_data_convert)

    p = data.add_parser("pack", help="write a dataset (any layout a task reads) as WebDataset shards")
    p.add_argument("data", help="the dataset, in any layout the task reads")
    p.add_argument("--task", choices=list_tasks(), required=True)
    p.add_argument("--out", required=True, help="a new (or empty) folder for the shards and dataset.yaml")
    p.add_argument("--shard-size", default="1GB", help="bytes per shard: 1GB, 500MB... (default 1GB)")
    p.add_argument("--val-fraction", type=float, help="seeded validation split when the data has none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strict", action="store_true", help="stop at the first bad sample")
    p.set_defaults(func=cmd_data_pack)

    p = data.add_parser("check", help="look at a dataset before training: counts, sizes, labels, leakage")
    p.add_argument("data", help="the dataset, in any layout the task reads")
    p.add_argument("--task", choices=list_tasks(), required=True)
    p.add_argument("--out", default="runs/check", help="labels.png and samples.jpg go to OUT/TASK/data*")
    p.add_argument("--no-pictures", action="store_true", help="the text report only")
    p.add_argument("--samples", type=int, default=16, help="images in samples.jpg")
    p.add_argument("--val-fraction", type=float, help="seeded validation split when the data has none")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_check)
