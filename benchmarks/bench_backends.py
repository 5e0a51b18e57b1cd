"""cnnkit's ``auto`` backend against the peers an expert would run, same machine, same run, batch 1 and 8:
torchvision eager fp32; torchvision as an expert runs it (bf16 autocast where the CPU has it, channels-last,
inference_mode); ONNX Runtime and OpenVINO with their documented defaults on the same exported graph.
Also cnnkit int8 (static, calibrated; speed only here: its accuracy is measured by ``cnnkit export
--int8``) against cnnkit's best fp32/bf16, achieved GFLOP/s against the fp32 and bf16 matmul peaks measured
now, and the bytes an image moves (each layer reading its input and weights and writing its output once,
fp32), which bounds the depthwise networks.

Run: ``python -m benchmarks.bench_backends [--models resnet50 ...] [--rounds 7]`` (part of ``make bench``).
Goals: auto >= 1.0x the best peer on every model and batch; int8 >= 1.5x cnnkit's best fp32/bf16.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torchvision
from torch import nn

from benchmarks.harness import header
from cnnkit import backends
from cnnkit.api import create_model
from cnnkit.benchmark import matmul_peak
from cnnkit.engine.device import amp_dtype, autocast
from cnnkit.summary import summarize

MODELS = {  # name -> (cnnkit model arguments, input size, torchvision's model or None)
    "resnet50": ({}, 224, "resnet50"),
    "mobilenet_v2": ({}, 224, "mobilenet_v2"),
    "efficientnet_b0": ({}, 224, "efficientnet_b0"),
    "yolo": ({"num_classes": 10}, 256, None),  # the demo's detector and segmenter, at a larger input
    "unet_same": ({"num_classes": 4}, 256, None),
}


def bytes_per_image(model: nn.Module, size: int) -> float:
    """fp32 bytes one image moves: every leaf layer reads its input and weights and writes its output."""
    total = 0
    hooks = []

    def count(module: nn.Module, inputs: Any, output: Any) -> None:
        nonlocal total
        tensors = [t for t in (*inputs, *(output if isinstance(output, list | tuple) else [output]))
                   if isinstance(t, torch.Tensor)]  # fmt: skip
        total += 4 * sum(t.numel() for t in tensors)
        total += 4 * sum(p.numel() for p in module.parameters(recurse=False))

    for m in model.modules():
        if not list(m.children()):
            hooks.append(m.register_forward_hook(count))
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, size, size))
    for h in hooks:
        h.remove()
    return float(total)


def timings(runners: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median milliseconds per call of each runner, rounds interleaved (each round in another order), each
    call after a pause of 0.1 s: ONNX Runtime's threads spin after a run by default and slow whatever runs
    next (an OpenVINO resnet50 run: 40 ms instead of 24)."""
    for run in runners.values():
        run()
        run()
    times: dict[str, list[float]] = {k: [] for k in runners}
    names = list(runners)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            time.sleep(0.1)
            t = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    os.environ["CNNKIT_CACHE"] = tempfile.mkdtemp()  # auto chooses afresh in this run
    cpu = torch.device("cpu")
    reduced = amp_dtype("auto", cpu)
    print(header("torchvision eager fp32 / expert (bf16, channels-last), ONNX Runtime, OpenVINO defaults"))
    peak32 = matmul_peak()
    peak16 = matmul_peak(torch.bfloat16) if reduced is torch.bfloat16 else None
    print(f"matmul peak now: fp32 {peak32:.0f} GFLOP/s" + (f", bf16 {peak16:.0f} GFLOP/s" if peak16 else ""))
    for name in args.models:
        kwargs, size, tv_name = MODELS[name]
        ours = create_model(name, **kwargs).eval()
        peer_model = getattr(torchvision.models, tv_name)().eval() if tv_name else ours
        macs = summarize(ours, size).macs
        moved = bytes_per_image(ours, size)
        print(f"\n{name} at {size} px: {2 * macs / 1e9:.2f} GFLOP and {moved / 2**20:.0f} MiB moved an image "
              f"({2 * macs / moved:.1f} FLOP per byte)")  # fmt: skip
        for batch in args.batches:
            one_batch(
                ours, peer_model, tv_name is not None, size, batch, macs, moved, (peak32, peak16), args.rounds
            )


def one_batch(ours: nn.Module, peer: nn.Module, torchvision_peer: bool, size: int, batch: int, macs: float,
              moved: float, peaks: tuple[float, float | None], rounds: int) -> None:  # fmt: skip
    cpu = torch.device("cpu")
    reduced = amp_dtype("auto", cpu)
    x = torch.randn(batch, 3, size, size)
    xn, xc = x.numpy(), x.contiguous(memory_format=torch.channels_last)
    expert = peer.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    graph = backends.onnx_graph(ours, x)
    ort = backends.require("onnxruntime").InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    ov = (
        backends.require("openvino").compile_model(str(graph), "CPU")
        if backends.installed("openvino")
        else None
    )
    auto, choice = backends.choose(ours, cpu, x)
    calib = [torch.randn(8, 3, size, size) for _ in range(4)]
    int8_name = "openvino-int8" if ov is not None else "onnxruntime-int8"
    int8 = backends.build(ours, cpu, int8_name, x, calib)

    def tv_fp32() -> object:
        with torch.no_grad():
            return peer(x)

    def tv_expert() -> object:
        with torch.inference_mode(), autocast(cpu, reduced):
            return expert(xc)

    who = "torchvision" if torchvision_peer else "pytorch"
    peers: dict[str, Callable[[], object]] = {f"{who} fp32": tv_fp32, f"{who} expert": tv_expert}
    peers["onnxruntime"] = lambda: ort.run(None, {"images": xn})
    if ov is not None:
        peers["openvino"] = lambda: ov(xn)
    ours_auto, ours_int8 = f"cnnkit auto ({choice.backend})", f"cnnkit {int8_name}"
    ms = timings({**peers, ours_auto: lambda: auto(x), ours_int8: lambda: int8(x)}, rounds)
    best_peer = min(peers, key=ms.__getitem__)
    print(f"  batch {batch} (ms): " + "  ".join(f"{k} {v:.1f}" for k, v in ms.items()))
    gflops = 2 * macs * batch / (ms[ours_auto] / 1e3) / 1e9
    peak32, peak16 = peaks
    bf16 = backends.precision(choice.backend, cpu) == "reduced" and peak16 is not None
    peak = peak16 if bf16 and peak16 else peak32
    print(f"  batch {batch}: auto {ms[best_peer] / ms[ours_auto]:.3f}x the best peer ({best_peer}; goal >= "
          f"1.0x); int8 {ms[ours_auto] / ms[ours_int8]:.2f}x auto (goal >= 1.5x); auto {gflops:.0f} GFLOP/s "
          f"= {100 * gflops / peak:.0f}% of the {'bf16' if bf16 else 'fp32'} matmul peak, "
          f"{moved * batch / (ms[ours_auto] / 1e3) / 1e9:.1f} GB/s moved")  # fmt: skip


if __name__ == "__main__":
    main()
