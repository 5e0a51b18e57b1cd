"""The ``cnnkit`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from cnnkit.errors import CnnkitError
from cnnkit.io import why_not_written


def _imgsz(text: str) -> int | tuple[int, int]:
    """``224`` or ``HxW`` (e.g. ``480x352``)."""
    parts = text.lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size must be N or HxW, got {text!r}") from None
    if len(sizes) == 1:
        return sizes[0]
    if len(sizes) == 2:
        return sizes[0], sizes[1]
    raise argparse.ArgumentTypeError(f"image size must be N or HxW, got {text!r}")


def cmd_models(args: argparse.Namespace) -> int:
    from cnnkit import list_models
    from cnnkit.hub import list_pretrained

    for name in list_pretrained(args.pattern or "*") if args.pretrained else list_models(args.pattern):
        print(name)
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cnnkit import create_model
    from cnnkit.summary import summarize
    from cnnkit.weights import max_side, read_metadata

    if Path(args.model).is_file():  # a weights file: its model, classes and training size
        model = create_model(None, weights=args.model)
        trained = read_metadata(args.model).get("imgsz")
        imgsz = args.imgsz or (tuple(trained) if isinstance(trained, list) else max_side(trained)) or 224
        in_chans = int(getattr(model, "cnnkit_config", {}).get("args", {}).get("in_chans", 3))
    else:
        model = create_model(args.model, in_chans=args.in_chans, num_classes=args.num_classes)
        imgsz, in_chans = args.imgsz or getattr(model, "default_imgsz", 224), args.in_chans
    print(summarize(model, imgsz, in_chans).table())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from cnnkit.demo import run_demo

    return run_demo(args.out)


def cmd_export(args: argparse.Namespace) -> int:
    from cnnkit.export import export

    if args.int8 and (args.format != "onnx" or not args.calib):
        raise CnnkitError("--int8 quantizes the ONNX graph: it needs --format onnx and --calib DATA")
    result = export(
        args.weights,
        args.format,
        out=args.out,
        imgsz=args.imgsz,
        dynamic_batch=args.dynamic_batch,
        nms=args.nms,
        conf=args.conf,
        iou=args.iou,
        max_det=args.max_det,
        opset=args.opset,
        tolerance=args.tolerance,
    )
    print(
        f"{result.path} ({result.format}; outputs {', '.join(result.outputs)}): max difference from PyTorch "
        f"{result.max_diff:.2e} (tolerance {result.tolerance:.0e}), {result.seconds:.1f} s"
    )
    if args.int8:
        from cnnkit.workflows.int8 import export_int8

        print(export_int8(args.weights, result.path, args.calib, data=args.data).line())
    return 0


def cmd_import_keras(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cnnkit import import_keras

    out = Path(args.out or Path(args.file).name.split(".")[0]).with_suffix(".safetensors")
    model = import_keras(args.file, out=out, num_classes=args.num_classes)
    config: dict[str, Any] = model.cnnkit_config  # type: ignore[assignment]
    cfg: dict[str, Any] = model.pretrained_cfg  # type: ignore[assignment]
    mean, std = (", ".join(f"{v:.4g}" for v in cfg[k]) for k in ("mean", "std"))
    print(
        f"{out}: {config['name']} {config['args']} from {args.file}; input {cfg['imgsz']} px RGB in [0, 1], "
        f"normalised by mean ({mean}) and std ({std})"
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from cnnkit.serve import Limits, serve

    limits = Limits(max_bytes=args.max_bytes, max_pixels=args.max_pixels, max_images=args.max_images,
                    max_video_bytes=args.max_video_bytes, max_frames=args.max_frames)  # fmt: skip
    serve(args.weights, host=args.host, port=args.port, token=args.token, limits=limits, runs=args.runs,
          max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, device=args.device,
          backend=args.backend)  # fmt: skip
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    import torch

    from cnnkit.benchmark import benchmark

    if args.threads:
        torch.set_num_threads(args.threads)
    report = benchmark(args.model, imgsz=args.imgsz, batch=args.batch, repeats=args.repeats, onnx=args.onnx,
                       backends=args.backend)  # fmt: skip
    print(report.table())
    return 0


class _ShowDefaults(argparse.HelpFormatter):
    """Help that ends each option with its default, unless the help already says it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        quiet = action.default in (None, False, argparse.SUPPRESS) or action.option_strings == []
        if quiet or "default" in text or isinstance(action, argparse._StoreConstAction):
            return action.help
        shown = (
            " ".join(map(str, action.default)) if isinstance(action.default, list | tuple) else "%(default)s"
        )
        return f"{text} (default {shown})".strip()


class _Parser(argparse.ArgumentParser):
    """Every command's parser shows the defaults (sub-commands are made of the parent's class)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", _ShowDefaults)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]


def build_parser() -> argparse.ArgumentParser:
    from cnnkit import __version__, cli_arith, cli_tasks

    parser = _Parser(prog="cnnkit", description=__doc__)
    parser.add_argument("--version", action="version", version=f"cnnkit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the registered models")
    p.add_argument("pattern", nargs="?", help="glob, e.g. 'efficientnet*'")
    p.add_argument("--pretrained", action="store_true", help="list the pretrained weights' tags instead")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("summary", help="per-layer shapes, receptive fields, parameters and MACs")
    p.add_argument(
        "model", help="a registered model name, or a weights file (its model at its training size)"
    )
    p.add_argument("--imgsz", type=_imgsz, default=None, help="input size N or HxW (default: the model's)")
    p.add_argument("--in-chans", type=int, default=3, help="input channels")
    p.add_argument("--num-classes", type=int, default=1000, help="classes of the head")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("demo", help="run the main job end to end on built-in data")
    p.add_argument("--out", default="runs/demo", help="where the data and runs go (default runs/demo)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("export", help="export weights to ONNX or TorchScript, checked against PyTorch")
    p.add_argument("--weights", required=True, help="cnnkit weights (.safetensors)")
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx", help="the exported format")
    p.add_argument("--out", help="output file (default: beside the weights)")
    p.add_argument("--imgsz", type=int, help="input size (default: the training size)")
    p.add_argument(
        "--dynamic-batch",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="any batch size at run time",
    )
    p.add_argument("--nms", action="store_true", help="detection, ONNX: thresholds and NMS in the graph")
    p.add_argument("--conf", type=float, default=0.25, help="--nms score threshold")
    p.add_argument("--iou", type=float, default=0.45, help="--nms IoU threshold")
    p.add_argument("--max-det", type=int, default=100, help="--nms: boxes kept per class and image")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset version")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max difference relative to output scale")
    p.add_argument("--int8", action="store_true",
                   help="also write FILE.int8.onnx, quantized (static, per-channel), calibrated on --calib; "
                   "prints its validation metric beside fp32's and the speed-up")  # fmt: skip
    p.add_argument("--calib", metavar="DATA", help="--int8: images to calibrate on (a few hundred training)")
    p.add_argument("--data", help="--int8: validation data for the metric (default: what the weights record)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "serve", help="an HTTP API for trained models of any task (pip install 'cnnkit[serve]')"
    )
    p.add_argument(
        "--weights", action="append", required=True, help="PATH or NAME=PATH; repeat for more models"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--token", help="require 'Authorization: Bearer TOKEN' (or set CNNKIT_SERVE_TOKEN)")
    p.add_argument("--max-batch", type=int, default=16, help="images run together at most")
    p.add_argument(
        "--max-wait-ms", type=float, default=0.0,
        help="how long a batch waits for more requests (0: those arriving during a model run form the next)",
    )  # fmt: skip
    p.add_argument("--max-bytes", type=int, default=20_000_000, help="bytes per image")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="pixels per image")
    p.add_argument("--max-images", type=int, default=64, help="images per request")
    p.add_argument("--max-video-bytes", type=int, default=200_000_000, help="bytes per video")
    p.add_argument("--max-frames", type=int, default=600, help="frames taken from one video (at its ?fps=)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    cli_tasks.add_backend_flag(p)
    p.add_argument("--runs", help="a folder of training runs for the runs page (e.g. runs/)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "import-keras",
        help="a Keras Applications model (MobileNetV2, ResNet50, VGG16, EfficientNetB0...) as cnnkit weights",
    )
    p.add_argument("file", help=".keras, .h5 or .weights.h5 (a backbone alone or with one Dense classifier)")
    p.add_argument("--out", help="the cnnkit weights file to write (default: the file's name, .safetensors)")
    p.add_argument("--num-classes", type=int, help="a new classifier of this size (default: the file's)")
    p.set_defaults(func=cmd_import_keras)

    p = sub.add_parser(
        "benchmark", help="latency and throughput: PyTorch, fast path, TorchScript, ONNX Runtime"
    )
    p.add_argument("model", help="a registered model name (random weights) or a cnnkit weights file")
    p.add_argument("--imgsz", type=int, help="input size (default: the weights' training size, or 224)")
    p.add_argument("--batch", type=int, default=8, help="batch size of the throughput column")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per measurement")
    p.add_argument("--threads", type=int, help="torch threads (default: PyTorch's)")
    p.add_argument(
        "--onnx",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time ONNX Runtime too (when installed)",
    )
    p.add_argument("--backend", action="append", default=[], metavar="NAME",
                   help="also time this backend (auto, openvino, openvino-int8...; repeatable)")  # fmt: skip
    p.set_defaults(func=cmd_benchmark)

    cli_tasks.add_commands(sub)
    cli_arith.add_commands(sub)
    return parser


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # file names that are not UTF-8 print escaped, not crash
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    try:
        if getattr(args, "nproc", 1) > 1 and "WORLD_SIZE" not in os.environ:
            from cnnkit.engine.distributed import launch

            return launch(_without_nproc(list(sys.argv[1:] if argv is None else argv)), args.nproc)
        if "WORLD_SIZE" in os.environ:  # under torchrun: join the group before any work or logging
            from cnnkit.engine.distributed import setup

            setup(getattr(args, "device", None) or "auto")
        return int(args.func(args))
    except CnnkitError as exc:
        print(f"cnnkit: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`cnnkit models | head`): stop quietly, as `cat` does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's flush of stdout at exit would fail again
        return 1
    except OSError as exc:  # the file system said no (a missing file, a full disk): one line, not a traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"cnnkit: error: {where}{why_not_written(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cnnkit: interrupted", file=sys.stderr)
        return 130
