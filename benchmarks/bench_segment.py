"""U-Net with zoo encoders vs segmentation_models_pytorch's Unet: training step and inference.

Target (issue 6): >= 1.0x for resnet34 and mobilenet_v2 encoders, same input. The decoders are alike
(nearest up-sampling, two 3x3 conv-BN-ReLU per level, channels 256-128-64-32-16) but not identical:
smp takes a stride-2 skip from ResNet's first conv, and uses MobileNetV2's final 1280-channel conv as
its deepest feature where cnnkit uses the 320-channel stage output; parameter counts are printed.
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any

import torch
import torch.nn.functional as F

import cnnkit
from benchmarks.harness import compare, header


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--imgsz", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=5)
    args = parser.parse_args(argv)
    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        print("segmentation_models_pytorch is not installed: pip install -e '.[bench]'")
        return
    print(header(f"segmentation_models_pytorch {smp.__version__} Unet", batch=args.batch,
                 input=f"{args.imgsz}x{args.imgsz}", classes=21))  # fmt: skip
    x = torch.randn(args.batch, 3, args.imgsz, args.imgsz)
    y = torch.randint(0, 21, (args.batch, args.imgsz, args.imgsz))
    for encoder in ("resnet34", "mobilenet_v2"):
        bench_encoder(encoder, x, y, args.pairs, smp)


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def bench_encoder(encoder: str, x: torch.Tensor, y: torch.Tensor, pairs: int, smp: Any) -> None:
    torch.manual_seed(0)
    ours = cnnkit.create_model(f"unet_{encoder}", num_classes=21)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer = smp.Unet(encoder, encoder_weights=None, classes=21)
    n_ours = sum(p.numel() for p in ours.parameters()) / 1e6
    n_peer = sum(p.numel() for p in peer.parameters()) / 1e6
    opt_ours = torch.optim.SGD(ours.parameters(), lr=1e-3, momentum=0.9)
    opt_peer = torch.optim.SGD(peer.parameters(), lr=1e-3, momentum=0.9)
    ours.train()
    peer.train()
    r = compare(
        f"unet {encoder} train step",
        lambda: step(ours, opt_ours, x, y),
        lambda: step(peer, opt_peer, x, y),
        pairs=pairs,
    )
    print(r.line(f"(target >= 1.0; params {n_ours:.1f}M vs {n_peer:.1f}M)"), flush=True)
    ours.eval()
    peer.eval()
    with torch.inference_mode():
        r = compare(f"unet {encoder} inference", lambda: ours(x), lambda: peer(x), pairs=pairs)
    print(r.line("(target >= 1.0)"), flush=True)


if __name__ == "__main__":
    main()
