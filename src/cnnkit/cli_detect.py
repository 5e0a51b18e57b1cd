"""``cnnkit train|val|predict detect`` and ``cnnkit anchors``: argument parsing (see workflows/detect)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from cnnkit.cli_tasks import FAST_HELP, _report, add_train_options, train_config


def _anchors_arg(text: str | None) -> tuple[tuple[tuple[float, float], ...], ...] | None:
    """``"10,13 16,30 33,23; 30,61 62,45 59,119"`` (scales separated by ``;``) -> nested tuples."""
    if not text:
        return None
    levels = []
    for level in text.split(";"):
        pairs = []
        for pair in level.split():
            w, h = (float(v) for v in pair.split(","))
            pairs.append((w, h))
        levels.append(tuple(pairs))
    return tuple(levels)


def cmd_train_detect(args: argparse.Namespace) -> int:
    from cnnkit.workflows import detect

    if args.resume:
        result = detect.train(".", resume=args.resume)
    else:
        if not args.data:
            raise SystemExit("cnnkit train detect: --data is required (or --resume)")
        augment = detect.DetAugment(
            scale=tuple(args.scale),  # type: ignore[arg-type]
            translate=args.translate,
            hflip=args.fliplr,
            jitter=args.jitter,
            mosaic=args.mosaic,
        )
        opts = detect.DetectOptions(
            backbone=args.backbone,
            backbone_args=json.loads(args.backbone_args) if args.backbone_args else {},
            strides=tuple(args.strides),
            anchors_per_scale=args.anchors_per_scale,
            anchors=_anchors_arg(args.anchors),
            neck=args.neck,
            neck_channels=args.neck_channels,
            box_loss=args.box_loss,
            augment=augment,
            strict=args.strict,
        )
        result = detect.train(
            args.data,
            val=args.val,
            opts=opts,
            pretrained=args.pretrained,
            cfg=train_config(args),
            val_fraction=args.val_fraction,
            project=args.project,
            name=args.name,
        )
    _report(result, "mAP")
    return 0


def cmd_val_detect(args: argparse.Namespace) -> int:
    from cnnkit.weights import read_metadata
    from cnnkit.workflows import detect

    metrics, evaluator = detect.val(
        args.weights,
        args.data,
        val_data=args.val,
        batch=args.batch,
        device=args.device,
        conf=args.conf,
        iou=args.iou,
        fast=args.fast,
    )
    names = read_metadata(args.weights).get("class_names")
    rows = evaluator.per_class(names)
    coco = evaluator.result.stats if evaluator.result else {}
    if args.json:
        print(json.dumps({"metrics": metrics, "coco": coco, "per_class": rows}, indent=2))
        return 0
    print("  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    print("  ".join(f"{k} {v:.3f}" for k, v in coco.items()))
    for r in rows:
        ap50 = "-" if r["AP50"] is None else f"{r['AP50']:.3f}"
        ap = "-" if r["AP"] is None else f"{r['AP']:.3f}"
        print(f"  {r['class']:<20} AP50 {ap50}  AP {ap}  n {r['support']}")
    return 0


def cmd_predict_detect(args: argparse.Namespace) -> int:
    from cnnkit.workflows import detect

    preds = detect.predict(
        args.weights,
        args.sources,
        out=args.out if args.save_img else None,
        conf=args.conf,
        iou=args.iou,
        max_det=args.max_det,
        agnostic=args.agnostic,
        device=args.device,
        fast=args.fast,
    )
    collected = []
    for p in preds:
        if args.json:
            collected.append(p)
            continue
        found = ", ".join(
            f"{lab} {s:.2f} {[round(v, 1) for v in b]}" for b, s, lab in zip(p.boxes, p.scores, p.labels)
        )
        drawn = f" -> {p.drawn}" if p.drawn else ""
        print(f"{p.path}: {len(p.boxes)} objects{': ' + found if found else ''}{drawn}", flush=True)
    if args.json:
        print(json.dumps(detect.coco_results(collected), indent=2))
    return 0


def cmd_anchors(args: argparse.Namespace) -> int:
    from cnnkit.workflows import detect

    fit = detect.anchors(args.data, args.k, imgsz=args.imgsz, seed=args.seed)
    print(f"{args.k} anchors (w x h pixels at {args.imgsz}), mean best IoU {fit.mean_iou:.3f}:")
    print("  " + "  ".join(f"{w:.1f},{h:.1f}" for w, h in fit.anchors.tolist()))
    return 0


def add_detect_commands(sub: Any, train: Any, val: Any, predict: Any) -> None:
    """Register ``train detect``, ``val detect``, ``predict detect`` and ``anchors``."""
    p = train.add_parser("detect", help="object detection (YOLO data.yaml, COCO JSON, Pascal VOC)")
    p.add_argument("--data", help="a YOLO data.yaml (or its folder), a COCO instances JSON, or a VOC root")
    p.add_argument("--val", help="COCO: the validation JSON")
    p.add_argument("--val-fraction", type=float, default=0.2, help="seeded split when there is no val set")
    p.add_argument("--backbone", default="resnet18", help="a zoo classifier (cnnkit models)")
    p.add_argument("--backbone-args", help="JSON of backbone arguments, e.g. '{\"width\": 0.25}'")
    p.add_argument("--pretrained", help="backbone weights (a classifier's: its head is dropped)")
    p.add_argument(
        "--strides", type=int, nargs="+", default=[8, 16, 32], help="backbone strides to detect at"
    )
    p.add_argument("--anchors", help="'w,h w,h ...; w,h ...' per scale in input pixels (default: k-means)")
    p.add_argument("--anchors-per-scale", type=int, default=3)
    p.add_argument("--neck", choices=["pan", "fpn", "none"], default="pan")
    p.add_argument("--neck-channels", type=int)
    p.add_argument("--box-loss", choices=["ciou", "mse"], default="ciou")
    p.add_argument("--scale", type=float, nargs=2, default=[0.6, 1.4], help="random zoom range")
    p.add_argument("--translate", type=float, default=0.1)
    p.add_argument("--fliplr", type=float, default=0.5)
    p.add_argument("--jitter", type=float, default=0.3)
    p.add_argument("--mosaic", type=float, default=0.0, help="probability of a 4-image mosaic")
    p.add_argument("--strict", action="store_true", help="stop at the first bad annotation")
    add_train_options(p)
    p.set_defaults(func=cmd_train_detect)

    p = val.add_parser("detect")
    p.add_argument("--weights", required=True)
    p.add_argument("--data", help="default: the training data (its validation split)")
    p.add_argument("--val", help="COCO: the validation JSON")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--conf", type=float, default=0.001)
    p.add_argument("--iou", type=float, default=0.6)
    p.add_argument("--device", default="auto")
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True, help=FAST_HELP)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_val_detect)

    p = predict.add_parser("detect")
    p.add_argument("--weights", required=True)
    p.add_argument("sources", nargs="+", help="image files, folders or globs")
    p.add_argument("--conf", type=float, default=0.25)
    p.add_argument("--iou", type=float, default=0.45)
    p.add_argument("--max-det", type=int, default=300)
    p.add_argument("--agnostic", action="store_true", help="class-agnostic NMS")
    p.add_argument("--save-img", action="store_true", help="write the images with boxes drawn to --out")
    p.add_argument("--out", default="runs/predict/detect")
    p.add_argument("--device", default="auto")
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True, help=FAST_HELP)
    p.add_argument("--json", action="store_true", help="COCO-style results on stdout")
    p.set_defaults(func=cmd_predict_detect)

    p = sub.add_parser("anchors", help="k-means (1 - IoU) anchor boxes of a detection dataset")
    p.add_argument("--data", required=True)
    p.add_argument("-k", type=int, default=9)
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_anchors)
