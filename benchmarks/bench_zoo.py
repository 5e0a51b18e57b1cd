"""Inference throughput of cnnkit's architectures vs torchvision's, same weights, same input.

Target: a speed ratio >= 0.97 for each model (the operations are the same).
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch
import torchvision

import cnnkit
from benchmarks.harness import compare, header

MODELS = ("resnet50", "mobilenet_v2", "efficientnet_b0", "googlenet", "vgg16")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--imgsz", type=int, default=224)
    parser.add_argument("--pairs", type=int, default=5)
    args = parser.parse_args(argv)
    print(
        header("torchvision models", batch=args.batch, input=f"{args.imgsz}x{args.imgsz}", mode="eval fp32")
    )
    x = torch.randn(args.batch, 3, args.imgsz, args.imgsz)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tv = torchvision.models.get_model(name, weights=None).eval()
            path = Path(tmp) / f"{name}.pth"
            torch.save(tv.state_dict(), path)
            ours = cnnkit.create_model(name, weights=path).eval()
            with torch.inference_mode():
                diff = (ours(x[:1]) - tv(x[:1])).abs().max().item()
                result = compare(name, lambda m=ours: m(x), lambda m=tv: m(x), pairs=args.pairs)
            print(result.line(f"(target >= 0.97; max |diff| {diff:.1e})"), flush=True)


if __name__ == "__main__":
    main()
