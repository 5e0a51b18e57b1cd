"""Export trained weights to ONNX (checked in onnxruntime) or TorchScript, with a numerical check.

Every export runs the exported model on a sample batch and compares it with PyTorch; the largest
difference (relative to the output's scale) is reported and the export fails above ``tolerance``.
BatchNorm is folded into the convolutions first (exact up to rounding; smaller, faster graphs).

Detectors export their decoded predictions: ``boxes [B, N, 4]`` (xyxy, input pixels) and ``scores
[B, N, C]`` (objectness x class probability); with ``nms=True`` the ONNX graph also holds the
thresholding and per-class NMS (ONNX ``NonMaxSuppression``) and returns ``detections [K, 7]`` rows of
``(image index, x1, y1, x2, y2, score, class)``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torchvision.ops import boxes as tv_boxes

from cnnkit.api import create_model
from cnnkit.errors import CnnkitError
from cnnkit.inference import fold_batchnorm
from cnnkit.io import atomic_path
from cnnkit.weights import max_side, raw_metadata, read_metadata, task_of

log = logging.getLogger("cnnkit")
ExportFormat = Literal["onnx", "torchscript"]


@dataclass(frozen=True)
class ExportResult:
    path: Path
    format: str
    max_diff: float  # largest |exported - PyTorch| relative to max(1, |PyTorch|), over all outputs
    tolerance: float
    outputs: tuple[str, ...]
    seconds: float


def require_onnx() -> tuple[Any, Any]:
    """``(onnx, onnxruntime)``, or a clear error saying how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise CnnkitError(
            "ONNX export needs onnx and onnxruntime: pip install 'cnnkit[export]' "
            "(or pip install onnx onnxruntime onnxscript)"
        ) from None
    return onnx, onnxruntime


class DecodedDetector(nn.Module):
    """Any detector with a ``decode`` (the family contract; YOLO is one) whose output is decoded:
    ``x -> (boxes [B, N, 4] xyxy input pixels, scores [B, N, C])``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not callable(getattr(model, "decode", None)):
            raise CnnkitError(
                f"{type(model).__name__} has no decode(outputs) -> (boxes, scores); cannot export it"
            )
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.decode(self.model(x))  # type: ignore[operator,no-any-return]


class _NonMaxSuppression(torch.autograd.Function):
    """Per image and class NMS with ONNX ``NonMaxSuppression``'s contract: ``boxes [B, N, 4]``, ``scores
    [B, C, N]`` -> selected ``[K, 3]`` (image, class, box), by image, class, then decreasing score."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, boxes: torch.Tensor, scores: torch.Tensor, max_per_class: int, iou: float, conf: float
    ) -> torch.Tensor:
        rows = []
        for b in range(boxes.shape[0]):
            for c in range(scores.shape[1]):
                idx = (scores[b, c] > conf).nonzero(as_tuple=True)[0]
                keep = idx[tv_boxes.nms(boxes[b, idx], scores[b, c, idx], iou)][:max_per_class]
                fill = torch.full_like(keep, b), torch.full_like(keep, c)
                rows.append(torch.stack([fill[0], fill[1], keep], 1))
        return torch.cat(rows) if rows else torch.zeros(0, 3, dtype=torch.long)

    @staticmethod
    def symbolic(g: Any, boxes: Any, scores: Any, max_per_class: int, iou: float, conf: float) -> Any:
        return g.op(
            "NonMaxSuppression",
            boxes,
            scores,
            g.op("Constant", value_t=torch.tensor([max_per_class], dtype=torch.long)),
            g.op("Constant", value_t=torch.tensor([iou], dtype=torch.float)),
            g.op("Constant", value_t=torch.tensor([conf], dtype=torch.float)),
        )


class DetectorWithNMS(nn.Module):
    """``x -> detections [K, 7]``: ``(image index, x1, y1, x2, y2, score, class)``."""

    def __init__(self, model: nn.Module, conf: float, iou: float, max_per_class: int) -> None:
        super().__init__()
        self.decoded = DecodedDetector(model)
        self.conf, self.iou, self.max_per_class = conf, iou, max_per_class

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        boxes, scores = self.decoded(x)
        scores_cn = scores.transpose(1, 2).contiguous()
        sel = _NonMaxSuppression.apply(boxes, scores_cn, self.max_per_class, self.iou, self.conf)
        b, c, i = sel[:, 0], sel[:, 1], sel[:, 2]
        return torch.cat(
            [b.unsqueeze(1).float(), boxes[b, i], scores_cn[b, c, i].unsqueeze(1), c.unsqueeze(1).float()], 1
        )


def _exportable(model: nn.Module, task: str, nms: bool, conf: float, iou: float, max_det: int) -> nn.Module:
    if task == "detect":
        return DetectorWithNMS(model, conf, iou, max_det) if nms else DecodedDetector(model)
    if nms:
        raise CnnkitError(f"--nms is for detection models; this is a {task} model")
    return model


def _outputs(y: Any) -> list[torch.Tensor]:
    return [t.detach().float() for t in (y if isinstance(y, list | tuple) else [y])]


def _diff(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    worst = 0.0
    for a, b in zip(ours, ref, strict=True):
        if a.shape != b.shape:
            raise CnnkitError(f"exported output has shape {tuple(a.shape)}, PyTorch gives {tuple(b.shape)}")
        if b.numel():
            worst = max(worst, float((a - b).abs().max()) / max(1.0, float(b.abs().max())))
    return worst


def export(
    weights: str | os.PathLike[str],
    format: ExportFormat = "onnx",
    *,
    out: str | os.PathLike[str] | None = None,
    imgsz: int | None = None,
    dynamic_batch: bool = True,
    nms: bool = False,
    conf: float = 0.25,
    iou: float = 0.45,
    max_det: int = 100,
    opset: int = 18,
    tolerance: float = 1e-4,
    sample: torch.Tensor | None = None,
) -> ExportResult:
    """Export cnnkit weights and check the result against PyTorch on ``sample`` (random by default).

    Args:
        format: ``"onnx"`` (run in onnxruntime for the check) or ``"torchscript"`` (traced).
        out: the output file (default: next to the weights, ``.onnx`` / ``.torchscript``).
        imgsz: input size (default: the training size in the weights' metadata).
        dynamic_batch: ONNX: any batch size (checked with a batch of 2 after exporting with 1).
        nms: detection, ONNX only: thresholds and NMS inside the graph (``max_det`` per class).
        tolerance: the largest allowed difference relative to the output's scale.
    """
    start = time.perf_counter()
    meta = read_metadata(weights)
    if "model" not in meta:
        raise CnnkitError(f"{weights}: no cnnkit metadata naming the model; export needs cnnkit weights")
    task = task_of(meta)
    size = int(imgsz or max_side(meta.get("imgsz")) or 224)
    model, folded = fold_batchnorm(create_model(None, weights=weights))
    net = _exportable(model, task, nms, conf, iou, max_det).eval()
    in_chans = int(meta.get("args", {}).get("in_chans", 3)) if isinstance(meta.get("args"), dict) else 3
    example = torch.randn(1, in_chans, size, size)
    check = sample if sample is not None else torch.randn(2 if dynamic_batch else 1, in_chans, size, size)
    suffix = ".onnx" if format == "onnx" else ".torchscript"
    path = Path(out) if out is not None else Path(weights).with_suffix(suffix)
    if path.resolve() == Path(weights).resolve():
        raise CnnkitError(f"{path}: --out is the input weights file; exporting there would overwrite it")
    with torch.no_grad():
        reference = _outputs(net(check))
    names = ("detections",) if nms else ("boxes", "scores") if task == "detect" else ("output",)
    if format == "onnx":
        ours = _export_onnx(net, example, check, path, names, dynamic_batch, nms, opset)
        _store_metadata(path, {**raw_metadata(weights), "cnnkit.onnx_outputs": json.dumps(list(names))})
    elif format == "torchscript":
        if nms:
            raise CnnkitError("--nms needs --format onnx (TorchScript tracing would freeze the NMS loop)")
        ours = _export_torchscript(net, example, check, path)
    else:
        raise CnnkitError(f"format must be 'onnx' or 'torchscript', got {format!r}")
    diff = _diff(ours, reference)
    result = ExportResult(path, format, diff, tolerance, names, time.perf_counter() - start)
    log.debug(  # the command line prints the result once
        "exported %s (%d BatchNorms folded) to %s; max difference %.2e", meta["model"], folded, path, diff
    )
    if diff > tolerance:
        raise CnnkitError(
            f"{path}: exported model differs from PyTorch by {diff:.2e} (relative), above the tolerance "
            f"{tolerance:.0e}; the file is kept for inspection"
        )
    return result


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Silence the ONNX exporter's progress chatter: its prints, warnings and the INFO logs of its graph
    passes ("No unused functions to remove"...); its errors still raise."""
    loggers = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def _export_onnx(
    net: nn.Module,
    example: torch.Tensor,
    check: torch.Tensor,
    path: Path,
    names: tuple[str, ...],
    dynamic_batch: bool,
    nms: bool,
    opset: int,
) -> list[torch.Tensor]:
    _, ort = require_onnx()
    path.parent.mkdir(parents=True, exist_ok=True)
    with quiet_exporter():
        if nms:  # a custom op symbolic: the TorchScript-based exporter
            axes = {"images": {0: "batch"}, "detections": {0: "detections"}} if dynamic_batch else None
            torch.onnx.export(
                net,
                (example,),
                str(path),
                dynamo=False,
                opset_version=max(opset, 11),
                input_names=["images"],
                output_names=list(names),
                dynamic_axes=axes,
            )
        else:
            batch = torch.export.Dim("batch", min=1, max=4096)
            shapes = ({0: batch},) if dynamic_batch else None  # by position: any forward argument name
            program = torch.onnx.export(
                net,
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=["images"],
                output_names=list(names),
                dynamic_shapes=shapes,
                verbose=False,
            )
            assert program is not None
            program.save(str(path), external_data=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(o).float() for o in session.run(None, {"images": check.numpy()})]


def _store_metadata(path: Path, properties: dict[str, str]) -> None:
    """The weights' cnnkit metadata (task, class names, input size, normalisation, model arguments) as
    the graph's metadata properties, so ``cnnkit.load(model.onnx)`` and other runtimes know how to feed
    it and name its outputs."""
    onnx, _ = require_onnx()
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, properties)
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))


def _export_torchscript(
    net: nn.Module, example: torch.Tensor, check: torch.Tensor, path: Path
) -> list[torch.Tensor]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(net, example, check_trace=False)
        traced.save(str(path))  # type: ignore[no-untyped-call]
        loaded = torch.jit.load(str(path))
        return _outputs(loaded(check))
