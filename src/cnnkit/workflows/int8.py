"""``cnnkit export --int8``: an exported ONNX graph quantized to int8 (calibrated on given images), and
what it costs: the validation metric of int8 next to fp32, and the speed-up, measured on the same data
and machine (:mod:`cnnkit.backends` runs both)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from cnnkit.backends import build, choose, installed, quantize_onnx, time_ms
from cnnkit.engine.device import select_device
from cnnkit.errors import CnnkitError
from cnnkit.weights import read_metadata, task_of
from cnnkit.workflows.common import calibration_batches, load_task_model
from cnnkit.workflows.run import val

log = logging.getLogger("cnnkit")
#: the metric each task is judged by, and whether higher is better
HEADLINE = {"top1": True, "mAP50": True, "miou": True, "nme": False}


@dataclass(frozen=True)
class Int8Report:
    path: Path
    metric: str | None  # the task's headline metric, None when no validation data was given or recorded
    fp32: float | None  # ONNX Runtime fp32
    int8: float | None  # the faster int8 runtime
    int8_backend: str
    best_backend: str  # cnnkit's fastest fp32/bf16 backend on this machine (auto's choice)
    speedup: float  # best fp32/bf16 time / int8 time, at the batch timed
    batch: int

    def line(self) -> str:
        speed = (f"{self.int8_backend} {self.speedup:.2f}x the speed of the fastest fp32/bf16 backend "
                 f"({self.best_backend}) at batch {self.batch}")  # fmt: skip
        if self.metric is None or self.fp32 is None or self.int8 is None:
            return f"{self.path} (int8): {speed}; no validation data to measure the metric on (pass --data)"
        higher = HEADLINE[self.metric]
        scale, unit = (100, " points") if higher else (1, ", lower is better")
        change = (self.int8 - self.fp32) * scale
        return (f"{self.path} (int8): {self.metric} {self.int8:.4f} vs {self.fp32:.4f} in fp32 "
                f"({change:+.2f}{unit}), {speed}")  # fmt: skip


def export_int8(
    weights: str | os.PathLike[str],
    graph: str | os.PathLike[str],
    calib: str | os.PathLike[str],
    *,
    data: str | os.PathLike[str] | None = None,
    batch: int = 8,
) -> Int8Report:
    """``graph`` (the ONNX file ``cnnkit export`` wrote from ``weights``) quantized to ``GRAPH.int8.onnx``,
    calibrated on images under ``calib``; the speed of the faster int8 runtime (ONNX Runtime, OpenVINO)
    against cnnkit's fastest fp32/bf16 backend, and the headline metric on ``data`` (default: the
    validation data the weights record) in int8 and in fp32 (both ONNX Runtime graphs)."""
    graph = Path(graph)
    model, meta = load_task_model(weights, task_of(read_metadata(weights)))
    batches = calibration_batches(calib, meta)
    out = graph.with_suffix(".int8.onnx")
    quantize_onnx(graph, out, batches)
    x = torch.cat(batches)[:batch]
    cpu = select_device("cpu")
    best, choice = choose(model, cpu, x)
    runtimes = [r for r in ("onnxruntime-int8", "openvino-int8") if installed(r.removesuffix("-int8"))]
    int8_ms = {r: time_ms(build(model, cpu, r, x, batches), x, 2.0) for r in runtimes}
    fastest = min(int8_ms, key=int8_ms.__getitem__)
    speedup = time_ms(best, x, 2.0) / int8_ms[fastest]
    metric = before = after = None
    if data is not None or meta.get("data"):
        try:
            fp32_report = val(weights, data, backend="onnxruntime", workers=0)
            int8_report = val(weights, data, backend=fastest, calib=calib, workers=0)
        except (CnnkitError, OSError) as exc:
            log.warning("int8: the validation data could not be read (%s); the metric is not measured", exc)
        else:
            metric = next((m for m in HEADLINE if m in fp32_report.metrics), None)
            if metric is not None:
                before, after = fp32_report.metrics[metric], int8_report.metrics[metric]
    return Int8Report(out, metric, before, after, fastest, choice.backend, speedup, len(x))
