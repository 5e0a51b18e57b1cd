"""``cnnkit benchmark``: latency (batch 1) and throughput (batch N) of one model run four ways -- PyTorch
fp32 eager, the fast path (:mod:`cnnkit.inference`), TorchScript and ONNX Runtime -- with the achieved
GFLOP/s set against this machine's matrix-multiply peak, timed in the same run.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnkit.api import create_model
from cnnkit.backends import build, choose, precision
from cnnkit.export import DecodedDetector, quiet_exporter
from cnnkit.inference import fold_batchnorm, prepare
from cnnkit.summary import summarize

log = logging.getLogger("cnnkit")


@dataclass(frozen=True)
class Row:
    runtime: str
    latency_ms: tuple[float, float, float]  # batch 1: min, median, max over the repeats
    throughput: float  # images/s at the batch size (median batch time)
    gflops: float  # achieved at the batch size (2 x multiply-adds per image x images/s)
    reduced: bool = False  # runs in bf16/fp16: set against the bf16 peak where measured


@dataclass(frozen=True)
class BenchReport:
    model: str
    imgsz: int
    batch: int
    threads: int
    gmacs: float  # per image
    gemm_fp32: float  # GFLOP/s of a large fp32 matrix multiply on this machine, now
    gemm_bf16: float | None
    rows: list[Row]

    def peak_of(self, row: Row) -> tuple[float, str]:
        """The matmul peak a runtime is set against: bf16's for a reduced-precision one, if measured."""
        if row.reduced and self.gemm_bf16:
            return self.gemm_bf16, "bf16"
        return self.gemm_fp32, "fp32"

    def table(self) -> str:
        lines = [
            f"{self.model} at {self.imgsz}x{self.imgsz}, batch {self.batch}, {self.threads} threads; "
            f"{self.gmacs:.3f} GMACs per image",
            f"matmul peak (same run): fp32 {self.gemm_fp32:.0f} GFLOP/s"
            + (f", bf16 {self.gemm_bf16:.0f} GFLOP/s" if self.gemm_bf16 else ""),
            f"{'runtime':<22}{'latency b=1 median (min-max)':>32}{'throughput':>16}{'GFLOP/s':>10}"
            f"{'of peak':>14}",
        ]
        above = False
        for r in self.rows:
            lo, mid, hi = r.latency_ms
            peak, kind = self.peak_of(r)
            share = 100 * r.gflops / peak
            above |= share > 100
            mark = "*" if share > 100 else " "
            lines.append(
                f"{r.runtime:<22}{f'{mid:.2f} ms ({lo:.2f}-{hi:.2f})':>32}{r.throughput:>11.1f} img/s"
                f"{r.gflops:>10.0f}{f'{share:.0f}% {kind}{mark}':>14}"
            )
        if above:
            lines.append(
                "* above the matmul peak: GFLOP/s count the convolutions' nominal multiply-adds, and a "
                "3x3 convolution computed by Winograd's algorithm (oneDNN, ONNX Runtime) does fewer "
                "multiplications than that"
            )
        return "\n".join(lines)


def _times(fn: Callable[[], object], repeats: int) -> list[float]:
    """Seconds per call over ``repeats`` calls, after a pause (ONNX Runtime's threads spin for a while
    after its runs and would slow the next runtime down) and two warm-up calls."""
    time.sleep(0.1)
    fn()
    fn()
    times: list[float] = []
    while len(times) < repeats:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    return statistics.median(_times(fn, repeats))


def matmul_peak(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of an ``n x n`` matrix multiply (``2 n^3`` flops) on the CPU, median of ``repeats``."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return 2 * n**3 / _median_time(lambda: torch.mm(a, b), repeats) / 1e9


def _load(model: str, imgsz: int | None) -> tuple[str, nn.Module, int]:
    if Path(model).is_file():
        from cnnkit.weights import max_side, read_metadata

        meta = read_metadata(model)
        net = create_model(None, weights=model).eval()
        if meta.get("task") == "detect":
            net = DecodedDetector(net)
        return str(meta.get("model", model)), net, int(imgsz or max_side(meta.get("imgsz")) or 224)
    return model, create_model(model).eval(), int(imgsz or 224)


def benchmark(
    model: str,
    *,
    imgsz: int | None = None,
    batch: int = 8,
    repeats: int = 10,
    onnx: bool = True,
    backends: Sequence[str] = (),
) -> BenchReport:
    """Time ``model`` (a registered name, random weights, or a cnnkit weights file) every way; plus each
    of ``backends`` (:mod:`cnnkit.backends`; ``auto`` names its choice; int8 calibrated on random
    inputs: a speed, not an accuracy)."""
    name, net, size = _load(model, imgsz)
    cpu = torch.device("cpu")
    x1, xb = torch.randn(1, 3, size, size), torch.randn(batch, 3, size, size)
    gmacs = summarize(net.model if isinstance(net, DecodedDetector) else net, size).macs / 1e9
    runners: dict[str, Callable[[torch.Tensor], object]] = {}

    def eager(x: torch.Tensor) -> object:
        with torch.inference_mode():
            return net(x)

    runners["pytorch fp32"] = eager
    runners["fast path fp32"] = prepare(net, cpu, True, reduced=False)
    fast = prepare(net, cpu, True)
    reduced = set()
    if fast.dtype is not None:
        reduced.add(f"fast path {str(fast.dtype).split('.')[-1]}")
        runners[f"fast path {str(fast.dtype).split('.')[-1]}"] = fast
    folded, _ = fold_batchnorm(net)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        scripted = torch.jit.freeze(torch.jit.trace(folded, x1, check_trace=False))  # type: ignore[no-untyped-call]

    def torchscript(x: torch.Tensor) -> object:
        with torch.inference_mode():
            return scripted(x)

    runners["torchscript (frozen)"] = torchscript
    if onnx:
        session = _onnx_session(folded, x1)
        if session is not None:
            runners["onnxruntime"] = lambda x: session.run(None, {"images": x.numpy()})
    for backend in backends:
        label, ran_by, fast_model = _backend(net, backend, xb)
        runners[label] = fast_model
        if precision(ran_by, cpu) == "reduced":
            reduced.add(label)
    rows = []
    for label, run in runners.items():
        latency = sorted(t * 1e3 for t in _times(lambda r=run: r(x1), repeats))  # type: ignore[misc]
        per_batch = _median_time(lambda r=run: r(xb), max(3, repeats // 2))  # type: ignore[misc]
        throughput = batch / per_batch
        spread = (latency[0], statistics.median(latency), latency[-1])
        rows.append(Row(label, spread, throughput, 2 * gmacs * throughput, label in reduced))
    bf16 = matmul_peak(torch.bfloat16) if fast.dtype is torch.bfloat16 else None
    return BenchReport(name, size, batch, torch.get_num_threads(), gmacs, matmul_peak(), bf16, rows)


def _backend(net: nn.Module, name: str, example: torch.Tensor) -> tuple[str, str, Any]:
    """``(row label, the backend that runs it, the prepared model)``: ``auto`` names its choice."""
    cpu = torch.device("cpu")
    if name == "auto":
        run, choice = choose(net, cpu, example)
        return f"backend {choice.backend} (auto)", choice.backend, run
    calib = [torch.randn_like(example) for _ in range(4)] if name.endswith("-int8") else []
    return f"backend {name}", name, build(net, cpu, name, example, calib)


def _onnx_session(net: nn.Module, example: torch.Tensor) -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    path = Path(tempfile.mkdtemp()) / "model.onnx"
    shapes = ({0: torch.export.Dim("batch", min=1, max=1024)},)  # by position: any forward argument name
    with quiet_exporter():
        try:
            program = torch.onnx.export(
                net, (example,), dynamo=True, input_names=["images"], dynamic_shapes=shapes, verbose=False
            )
        except Exception as exc:  # an architecture the exporter cannot handle: report, time the rest
            log.warning("onnxruntime left out: the ONNX export failed (%s)", str(exc).splitlines()[0])
            return None
        assert program is not None
        program.save(str(path), external_data=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
