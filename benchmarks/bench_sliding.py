"""Convolutional sliding windows: one fully convolutional sweep vs classifying every crop.

Expected (issue 5): the sweep >= 10x faster at the same stride, with the same scores. The gain is
bounded by how much work neighbouring windows share: the convolutional trunk is computed once per
image instead of once per window (an overlap of (window / stride)^2), while the converted FC layers
still run once per window. The notes' 14x14 network is mostly FC, so it gains least; a network with a
deeper convolutional trunk (second row) gains far more.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import cnnkit
from benchmarks.harness import compare, header
from cnnkit.sliding import to_fully_convolutional


def conv_trunk_net() -> nn.Sequential:
    """A 32x32 classifier whose work is mostly convolutional (valid padding, a small FC head)."""
    layers: list[nn.Module] = []
    ch = 3
    for out in (32, 32, 64, 64):
        layers += [nn.Conv2d(ch, out, 3), nn.ReLU()]
        ch = out
    layers += [nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 12 * 12, 64), nn.ReLU(), nn.Linear(64, 4)]
    return nn.Sequential(*layers).eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--imgsz", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    image = torch.randn(1, 3, args.imgsz, args.imgsz)
    for name, model, window in (
        ("tinyconvnet (notes, 14 px)", cnnkit.create_model("tinyconvnet", num_classes=4).eval(), 14),
        ("conv-trunk net (32 px)", conv_trunk_net(), 32),
    ):
        bench(name, model, window, image, args.pairs)


def bench(name: str, model: nn.Module, window: int, image: torch.Tensor, pairs: int) -> None:
    fcn = to_fully_convolutional(model, window)
    stride = fcn.stride

    def crops() -> torch.Tensor:
        # every 14x14 window at the FCN's stride, classified as one batch
        patches = image.unfold(2, window, stride).unfold(3, window, stride)  # [1, 3, H', W', 14, 14]
        n_h, n_w = patches.shape[2:4]
        batch = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, window, window)
        return model(batch).view(n_h, n_w, -1).permute(2, 0, 1)

    with torch.inference_mode():
        sweep = fcn(image)[0]
        diff = (sweep - crops()).abs().max().item()
        n = sweep.shape[1] * sweep.shape[2]
        print(
            header(
                "classifying each crop (one batch)",
                model=name,
                image=image.shape[-1],
                window=window,
                stride=stride,
                windows=n,
            )
        )
        r = compare("sliding windows: one sweep vs crops", lambda: fcn(image), crops, pairs=pairs, repeat=3)
    print(r.line(f"(expect >= 10x; max |score diff| {diff:.1e})"))


if __name__ == "__main__":
    main()
