"""``cnnkit train|val|predict TASK`` and ``cnnkit data``: argument parsing only; the work is in workflows/."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from cnnkit.engine.config import TrainConfig, config_from_dict, load_yaml

FAST_HELP = "fast inference path: folded BatchNorm, channels-last, bf16/fp16 autocast (--no-fast: fp32)"


def add_train_options(p: argparse.ArgumentParser) -> None:
    """Engine options shared by every task's ``train`` (defaults from :class:`TrainConfig`)."""
    d = TrainConfig()
    g = p.add_argument_group("training")
    g.add_argument("--config", help="YAML file of training options (command-line flags override it)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch", type=int, help=f"per-process batch size (default {d.batch})")
    g.add_argument("--accumulate", type=int, help="micro-batches per optimizer step (gradient accumulation)")
    g.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="processes on this machine (torch.distributed; or run under torchrun)",
    )
    g.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None, help="CUDA, distributed")
    g.add_argument("--imgsz", type=int, help=f"input size (default {d.imgsz})")
    g.add_argument("--optimizer", choices=["sgd", "adam", "adamw"])
    g.add_argument("--lr", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--schedule", choices=["cosine", "step", "constant"])
    g.add_argument("--warmup-epochs", type=float)
    g.add_argument("--grad-clip", type=float, help="max gradient norm (0 turns clipping off)")
    g.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--amp", choices=["auto", "off", "bf16", "fp16"])
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--seed", type=int)
    g.add_argument("--workers", type=int)
    g.add_argument("--patience", type=int, help="early stopping after N epochs without improvement")
    g.add_argument("--save-period", type=int)
    g.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--plots", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--project", default="runs", help="root of run directories (default runs/)")
    g.add_argument("--name", default="exp", help="run name (runs/TASK/NAME, numbered if it exists)")
    g.add_argument("--resume", help="a run directory or its weights/last.pt to continue")


def _report(result: Any, fitness_name: str) -> None:
    from cnnkit.engine.distributed import info

    if not info().is_main:
        return
    print(f"best {result.best}  (epoch {result.best_epoch}, {fitness_name} {result.best_fitness:.4f})")
    print(f"results in {result.run_dir}")


def train_config(args: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = load_yaml(args.config) if args.config else {}
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
    if values.get("grad_clip") == 0:
        values["grad_clip"] = None
    return config_from_dict(TrainConfig, values, args.config or "options")


def cmd_train_classify(args: argparse.Namespace) -> int:
    from cnnkit.data.transforms import AugmentConfig
    from cnnkit.workflows import classify

    if args.resume:
        result = classify.train(args.data or ".", resume=args.resume)
    else:
        if not args.data:
            raise SystemExit("cnnkit train classify: --data is required (or --resume)")
        augment = AugmentConfig(hflip=args.fliplr, crop_fraction=args.crop_fraction)
        transfer = classify.TransferConfig(
            freeze=args.freeze,
            unfreeze_last=args.unfreeze_last,
            trainable=tuple(args.trainable),
            fine_tune_epochs=args.fine_tune_epochs,
            fine_tune_lr_factor=args.fine_tune_lr_factor,
        )
        result = classify.train(
            args.data,
            model=args.model,
            val=args.val,
            val_fraction=args.val_fraction,
            pretrained=args.pretrained,
            transfer=transfer,
            cfg=train_config(args),
            augment=augment,
            label_smoothing=args.label_smoothing,
            model_args=json.loads(args.model_args) if args.model_args else None,
            project=args.project,
            name=args.name,
        )
    _report(result, "top1")
    return 0


def cmd_val_classify(args: argparse.Namespace) -> int:
    from cnnkit.workflows import classify

    metrics, evaluator = classify.val(
        args.weights, args.data, batch=args.batch, imgsz=args.imgsz, device=args.device, fast=args.fast
    )
    if args.json:
        print(
            json.dumps({"metrics": metrics, "per_class": evaluator.per_class(_names(args.weights))}, indent=2)
        )
    else:
        print("  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        for row in evaluator.per_class(_names(args.weights)):
            print(
                f"  {row['class']:<20} precision {row['precision']:.3f}  recall {row['recall']:.3f}  "
                f"n {row['support']}"
            )
    return 0


def _names(weights: str) -> list[str] | None:
    from cnnkit.weights import read_metadata

    return read_metadata(weights).get("class_names")


def cmd_predict_classify(args: argparse.Namespace) -> int:
    from cnnkit.workflows import classify

    preds = classify.predict(args.weights, args.sources, topk=args.topk, device=args.device, fast=args.fast)
    if args.json:
        print(classify.predictions_to_json(preds))
        return 0
    for p in preds:
        print(f"{p.path}: " + ", ".join(f"{c} {v:.3f}" for c, v in p.topk), flush=True)
    return 0


def cmd_train_segment(args: argparse.Namespace) -> int:
    from cnnkit.workflows import segment

    if args.resume:
        result = segment.train(".", resume=args.resume)
    else:
        if not args.data:
            raise SystemExit("cnnkit train segment: --data is required (or --resume)")
        opts = segment.SegmentOptions(
            loss=args.loss,
            class_weights=tuple(args.class_weights) if args.class_weights else None,
            binary=args.binary,
            hflip=args.fliplr,
            strict=args.strict,
        )
        result = segment.train(
            args.data,
            model=args.model,
            model_args=json.loads(args.model_args) if args.model_args else None,
            pretrained=args.pretrained,
            cfg=train_config(args),
            opts=opts,
            val_fraction=args.val_fraction,
            project=args.project,
            name=args.name,
        )
    _report(result, "mIoU")
    return 0


def cmd_val_segment(args: argparse.Namespace) -> int:
    from cnnkit.workflows import segment

    metrics, evaluator = segment.val(
        args.weights, args.data, batch=args.batch, device=args.device, fast=args.fast
    )
    names = _names(args.weights) or [str(i) for i in range(evaluator.num_classes)]
    per = {k: v.tolist() for k, v in evaluator.per_class().items()}
    if args.json:
        print(json.dumps({"metrics": metrics, "per_class": {"names": names, **per}}, indent=2))
        return 0
    print("  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    for i, name in enumerate(names):
        print(f"  {name:<20} IoU {per['iou'][i]:.3f}  Dice {per['dice'][i]:.3f}  acc {per['acc'][i]:.3f}")
    return 0


def cmd_predict_segment(args: argparse.Namespace) -> int:
    from cnnkit.workflows import segment

    results = []
    for p in segment.predict(args.weights, args.sources, out=args.out, device=args.device, fast=args.fast):
        classes = sorted(int(c) for c in set(p.mask.flatten().tolist()))
        results.append({"path": p.path, "mask": p.mask_file, "overlay": p.overlay_file, "classes": classes})
        if not args.json:
            print(f"{p.path}: classes {classes} -> {p.mask_file}", flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def cmd_train_localize(args: argparse.Namespace) -> int:
    from cnnkit.workflows import localize

    if args.resume:
        result = localize.train(args.task, ".", resume=args.resume)
    else:
        if not args.data:
            raise SystemExit(f"cnnkit train {args.task}: --data is required (or --resume)")
        pairs = [tuple(int(i) for i in p.split(",")) for p in args.flip_pairs] if args.flip_pairs else None
        result = localize.train(
            args.task,
            args.data,
            backbone=args.backbone,
            backbone_args=json.loads(args.backbone_args) if args.backbone_args else None,
            pretrained=args.pretrained,
            cfg=train_config(args),
            val_fraction=args.val_fraction,
            loss=args.loss,
            flip_pairs=pairs,
            norm_points=tuple(args.norm_points) if args.norm_points else None,
            project=args.project,
            name=args.name,
        )
    _report(result, "fitness")
    return 0


def cmd_val_localize(args: argparse.Namespace) -> int:
    from cnnkit.workflows import localize

    metrics = localize.val(args.weights, args.task, args.data, device=args.device, fast=args.fast)
    print(
        json.dumps(metrics, indent=2) if args.json else "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    )
    return 0


def cmd_predict_localize(args: argparse.Namespace) -> int:
    from cnnkit.workflows import localize

    results = []
    for p in localize.predict(
        args.weights,
        args.task,
        args.sources,
        out=args.out,
        threshold=args.conf,
        device=args.device,
        fast=args.fast,
    ):
        results.append(
            {
                "path": p.path,
                "object_prob": p.object_prob,
                "class": p.label,
                "class_prob": p.class_prob,
                "box": p.box,
                "points": p.points,
                "drawn": p.drawn,
            }
        )
        if not args.json:
            what = (
                f"{p.label} {p.class_prob:.2f} box {p.box}"
                if args.task == "localize"
                else f"points {p.points}"
            )
            print(f"{p.path}: {what}", flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def cmd_data_builtin(args: argparse.Namespace) -> int:
    from cnnkit.data import builtin

    writers = {
        "classify": lambda: builtin.write_classification(args.out, seed=args.seed, limit=args.limit),
        "segment": lambda: builtin.write_segmentation(args.out, seed=args.seed),
        "localize": lambda: builtin.write_localization(args.out, seed=args.seed),
        "landmarks": lambda: builtin.write_landmarks(args.out, seed=args.seed),
        "detect": lambda: builtin.write_detection(args.out, seed=args.seed),
    }
    out = writers[args.task]()
    print(f"wrote {args.task} data to {out}", file=sys.stderr)
    return 0


def add_commands(sub: Any) -> None:
    """Register ``train``, ``val``, ``predict`` and ``data`` on the top-level subparsers."""
    train = sub.add_parser("train", help="train a model").add_subparsers(dest="task", required=True)
    p = train.add_parser("classify", help="image classification (class folders or a path,label CSV)")
    p.add_argument(
        "--data", help="dataset root (train/ and val/ class folders), a class-folder root, or a CSV"
    )
    p.add_argument("--val", help="explicit validation folder or CSV")
    p.add_argument("--val-fraction", type=float, default=0.2, help="seeded split when there is no val set")
    p.add_argument("--model", default="resnet18", help="a registered model name (cnnkit models)")
    p.add_argument("--model-args", help="JSON of builder arguments, e.g. '{\"width\": 0.5}'")
    p.add_argument("--pretrained", help="cnnkit/torchvision/timm weights, or 'torchvision' to download")
    p.add_argument("--freeze", action="store_true", help="freeze the base (BatchNorm in inference mode)")
    p.add_argument("--unfreeze-last", type=int, default=0, help="base blocks (from the end) to train too")
    p.add_argument("--trainable", nargs="*", default=[], help="base layers to train by name (e.g. stages.3)")
    p.add_argument("--fine-tune-epochs", type=int, default=0, help="stage 2 after the frozen stage 1")
    p.add_argument("--fine-tune-lr-factor", type=float, default=0.1)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--fliplr", type=float, default=0.5, help="horizontal flip probability")
    p.add_argument(
        "--crop-fraction", type=float, default=0.875, help="eval: centre crop of the resized image"
    )
    add_train_options(p)
    p.set_defaults(func=cmd_train_classify)

    p = train.add_parser("segment", help="semantic segmentation (image and mask folders, Pascal VOC)")
    p.add_argument("--data", help="dataset root (images/ + masks/, train/val splits, or VOC)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="seeded split when there is no val set")
    p.add_argument("--model", default="unet_same", help="unet, unet_same, unet_course, unet_<encoder>...")
    p.add_argument("--model-args", help='JSON of builder arguments, e.g. \'{"base": 16, "depth": 3}\'')
    p.add_argument("--pretrained", help="cnnkit weights of the same model")
    p.add_argument("--loss", choices=["ce", "dice", "focal", "ce+dice"], default="ce+dice")
    p.add_argument("--class-weights", type=float, nargs="*", help="cross-entropy weight of each class")
    p.add_argument("--binary", action="store_true", help="two classes as one sigmoid channel")
    p.add_argument("--fliplr", type=float, default=0.5)
    p.add_argument("--strict", action="store_true", help="stop at the first bad image/mask pair")
    add_train_options(p)
    p.set_defaults(func=cmd_train_segment)

    for task in ("localize", "landmarks"):
        help_text = "one main object: class + box (or none)" if task == "localize" else "K points per image"
        p = train.add_parser(task, help=help_text)
        p.add_argument(
            "--data", help="CSV/JSON, a folder with train.csv (+ val.csv), a YOLO data.yaml or VOC"
        )
        p.add_argument("--val-fraction", type=float, default=0.2)
        p.add_argument("--backbone", default="resnet18", help="a zoo classifier (cnnkit models)")
        p.add_argument("--backbone-args", help="JSON of backbone arguments, e.g. '{\"width\": 0.25}'")
        p.add_argument("--pretrained", help="backbone weights (a classifier's: its head is dropped)")
        p.add_argument(
            "--loss", choices=["l1", "smooth_l1", "wing"], default="smooth_l1", help="landmarks only"
        )
        p.add_argument(
            "--flip-pairs", nargs="*", help="landmarks: index pairs swapped by a flip, e.g. 1,3 36,45"
        )
        p.add_argument(
            "--norm-points",
            type=int,
            nargs=2,
            help="landmarks: the two points whose distance normalises NME (e.g. outer eye corners 36 45)",
        )
        add_train_options(p)
        p.set_defaults(func=cmd_train_localize)

    val = sub.add_parser("val", help="evaluate trained weights").add_subparsers(dest="task", required=True)
    p = val.add_parser("classify")
    p.add_argument("--weights", required=True)
    p.add_argument("--data", required=True, help="class folders, a dataset root (its val split) or a CSV")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--imgsz", type=int)
    p.add_argument("--device", default="auto")
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True, help=FAST_HELP)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_val_classify)

    p = val.add_parser("segment")
    p.add_argument("--weights", required=True)
    p.add_argument("--data", required=True, help="the dataset root; its validation split is used")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True, help=FAST_HELP)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_val_segment)

    predict = sub.add_parser("predict", help="run trained weights on images").add_subparsers(
        dest="task", required=True
    )
    p = predict.add_parser("classify")
    p.add_argument("--weights", required=True)
    p.add_argument("sources", nargs="+", help="image files, folders or globs")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True, help=FAST_HELP)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_predict_classify)

    p = predict.add_parser("segment")
    p.add_argument("--weights", required=True)
    p.add_argument("sources", nargs="+", help="image files, folders or globs")
    p.add_argument("--out", default="runs/predict/segment", help="where masks/ and overlays/ are written")
    p.add_argument("--device", default="auto")
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True, help=FAST_HELP)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_predict_segment)

    for task in ("localize", "landmarks"):
        p = val.add_parser(task)
        p.add_argument("--weights", required=True)
        p.add_argument("--data", help="default: the training data (its validation split)")
        p.add_argument("--device", default="auto")
        p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True, help=FAST_HELP)
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=cmd_val_localize)
        p = predict.add_parser(task)
        p.add_argument("--weights", required=True)
        p.add_argument("sources", nargs="+", help="image files, folders or globs")
        p.add_argument("--out", default=f"runs/predict/{task}", help="where the drawn images go")
        p.add_argument("--conf", type=float, default=0.5, help="localize: objectness threshold")
        p.add_argument("--device", default="auto")
        p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True, help=FAST_HELP)
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=cmd_predict_localize)

    from cnnkit.cli_detect import add_detect_commands

    add_detect_commands(sub, train, val, predict)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="action", required=True)
    p = data.add_parser("builtin", help="write a built-in dataset (from scikit-learn's digits) to disk")
    p.add_argument("name", choices=["digits"])
    p.add_argument(
        "--task", choices=["classify", "segment", "localize", "landmarks", "detect"], default="classify"
    )
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="use only the first N digits")
    p.set_defaults(func=cmd_data_builtin)
