"""Fast inference path vs torchvision eager fp32, ONNX Runtime beside it, and fp32 efficiency against
this machine's matrix-multiply peak.

Run: ``python -m benchmarks.bench_export`` (part of ``make bench``). Throughput at batch 8, 224 x 224.
"""

from __future__ import annotations

import torch
import torchvision

from benchmarks.harness import compare, header
from cnnkit.api import create_model
from cnnkit.benchmark import _onnx_session, matmul_peak
from cnnkit.inference import fold_batchnorm, prepare
from cnnkit.summary import summarize

BATCH, SIZE = 8, 224


def main(argv: list[str] | None = None) -> None:
    print(header("torchvision eager fp32 (torch.no_grad)", batch=BATCH, imgsz=SIZE))
    x = torch.randn(BATCH, 3, SIZE, SIZE)
    cpu = torch.device("cpu")
    peak = matmul_peak()
    for name in ("resnet50", "mobilenet_v2"):
        tv = getattr(torchvision.models, name)().eval()
        ours = create_model(name).eval()
        fast = prepare(ours, cpu, True)
        fp32 = prepare(ours, cpu, True, reduced=False)

        def peer(m: torch.nn.Module = tv) -> None:
            with torch.no_grad():
                m(x)

        label = f"fast path ({str(fast.dtype).split('.')[-1] if fast.dtype else 'fp32'})"
        c = compare(f"{name} {label}", lambda f=fast: f(x), peer, pairs=5)
        print(c.line("(target >= 2x)"))
        c32 = compare(f"{name} fast path fp32", lambda f=fp32: f(x), peer, pairs=5)
        print(c32.line())
        session = _onnx_session(fold_batchnorm(ours)[0], x[:1])
        if session is not None:
            cort = compare(
                f"{name} onnxruntime fp32",
                lambda s=session: s.run(None, {"images": x.numpy()}),
                peer,
                pairs=5,
            )
            print(cort.line())
        gflop = 2 * summarize(ours, SIZE).macs / 1e9 * BATCH
        best32 = min(c32.ours_s, cort.ours_s if session is not None else c32.ours_s)
        print(
            f"{name}: fp32 {gflop / c32.ours_s:.0f} GFLOP/s (fast path), "
            f"{gflop / c32.peer_s:.0f} (torchvision), "
            f"best fp32 {gflop / best32:.0f} = {100 * gflop / best32 / peak:.0f}% of the {peak:.0f} GFLOP/s "
            "fp32 matmul peak measured now (target for resnet50 >= 70%; onnxruntime's Winograd convolutions "
            "do fewer multiplies than the nominal count, so it can exceed 100%)"
        )


if __name__ == "__main__":
    main()
