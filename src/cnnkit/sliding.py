"""Convolutional sliding windows: a classifier turned fully convolutional scores every window at once.

Running a classifier on each crop of a large image repeats most of the work, since neighbouring
windows share most of their pixels. Replacing the fully connected head by convolutions (the first FC
over an ``f x f`` feature map becomes an ``f x f`` convolution, later FCs become 1x1 convolutions)
gives a network that accepts larger inputs and outputs a map of class scores, one cell per window,
in a single forward pass (Sermanet et al., OverFeat). For networks without padding each cell equals
the classifier's output on its crop exactly; with padding the cells near crop borders see real
neighbours instead of zeros, so they differ slightly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cnnkit.errors import CnnkitError
from cnnkit.models.base import ConvNet
from cnnkit.ops.nms import batched_nms


def _linear_to_conv(fc: nn.Linear, channels: int, kh: int, kw: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, fc.out_features, (kh, kw), bias=fc.bias is not None)
    with torch.no_grad():
        conv.weight.copy_(fc.weight.view(fc.out_features, channels, kh, kw))
        if fc.bias is not None and conv.bias is not None:
            conv.bias.copy_(fc.bias)
    return conv.to(fc.weight.device)


def _convert_mlp(layers: list[nn.Module], channels: int, kh: int, kw: int) -> list[nn.Module]:
    """FC layers (with activations/dropout between) as convolutions: the first f x f, the rest 1x1."""
    out: list[nn.Module] = []
    first = True
    for layer in layers:
        if isinstance(layer, nn.Linear):
            out.append(
                _linear_to_conv(
                    layer, channels if first else layer.in_features, kh if first else 1, kw if first else 1
                )
            )
            first = False
        elif isinstance(layer, nn.Flatten | nn.Identity):
            continue
        else:
            out.append(layer)
    return out


class FullyConvolutional(nn.Module):
    """``features`` then a convolutional head: ``[B, C, H, W] -> [B, classes, H', W']`` class logits.

    ``window`` is the training input size (the window each cell sees) and ``stride`` the distance in
    input pixels between neighbouring cells.
    """

    def __init__(
        self, features: nn.Module, head: nn.Sequential, window: tuple[int, int], stride: int
    ) -> None:
        super().__init__()
        self.features = features
        self.head = head
        self.window = window
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def window_box(self, i: int, j: int) -> tuple[int, int, int, int]:
        """``(x1, y1, x2, y2)`` in input pixels of the window scored by output cell ``(i, j)``."""
        return (
            j * self.stride,
            i * self.stride,
            j * self.stride + self.window[1],
            i * self.stride + self.window[0],
        )


class _ConvNetFeatures(nn.Module):
    def __init__(self, model: ConvNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


@torch.no_grad()
def to_fully_convolutional(
    model: nn.Module, input_size: int | tuple[int, int], in_chans: int = 3
) -> FullyConvolutional:
    """Turn a trained classifier into an equivalent fully convolutional network.

    Works for ``nn.Sequential`` classifiers ending in ``Flatten -> Linear ...`` (e.g. ``tinyconvnet``)
    and for the zoo's :class:`~cnnkit.models.ConvNet` classifiers (VGG's 7x7 x 4096 FC head, and the
    pooled heads of ResNet, MobileNet, EfficientNet...). ``input_size`` is the size the classifier
    was trained at: at that size the converted network gives the same logits.
    """
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    was_training = model.training
    model.eval()
    probe = torch.zeros(1, in_chans, h, w, device=next(model.parameters()).device)
    features: nn.Module
    if isinstance(model, ConvNet):
        features = _ConvNetFeatures(model)
        fmap = features(probe)
        c, fh, fw = fmap.shape[1:]
        head_layers: list[nn.Module] = []
        pool: Any = model.head.pool.output_size
        p = int(pool if isinstance(pool, int) else pool[0])
        if p == 1:  # global average pooling over the window's f x f map
            head_layers.append(nn.AvgPool2d((fh, fw), stride=1))
            kh = kw = 1
        elif fh == p and fw == p:  # VGG at its training size: the adaptive pool is the identity
            kh, kw = fh, fw
        elif fh % p == 0 and fw % p == 0:
            head_layers.append(nn.AvgPool2d((fh // p, fw // p)))
            kh = kw = p
        else:
            raise CnnkitError(
                f"cannot convert a {p}x{p} adaptive pool over a {fh}x{fw} map; "
                f"use an input size whose feature map is a multiple of {p}"
            )
        mlp = [*model.head.mlp, model.head.dropout, model.head.fc]
        head_layers += _convert_mlp(mlp, c, kh, kw)
    elif isinstance(model, nn.Sequential):
        layers = list(model)
        cut = next((i for i, m in enumerate(layers) if isinstance(m, nn.Flatten)), None)
        if cut is None:
            raise CnnkitError("the classifier has no Flatten -> Linear head to convert")
        features = nn.Sequential(*layers[:cut])
        c, fh, fw = features(probe).shape[1:]
        head_layers = _convert_mlp(layers[cut:], c, fh, fw)
    else:
        raise CnnkitError(
            f"cannot convert {type(model).__name__}: expected a cnnkit ConvNet or an nn.Sequential"
        )
    fcn = FullyConvolutional(features, nn.Sequential(*head_layers), (h, w), stride=1)
    fcn.stride = _measure_stride(fcn, in_chans, h, w, probe.device)
    model.train(was_training)
    return fcn.train(was_training)


def _measure_stride(fcn: FullyConvolutional, in_chans: int, h: int, w: int, device: torch.device) -> int:
    """Input pixels per output cell: grow the input and count the extra cells."""
    grow = 64
    while True:
        out = fcn(torch.zeros(1, in_chans, h + grow, w, device=device)).shape[-2]
        if out > 1:
            return grow // (out - 1)
        grow *= 2


@dataclass(frozen=True)
class WindowDetections:
    boxes: torch.Tensor  # [K, 4] xyxy, input pixels
    scores: torch.Tensor  # [K]
    classes: torch.Tensor  # [K]
    score_map: torch.Tensor  # [classes, H', W'] probabilities


@torch.no_grad()
def detect_windows(
    fcn: FullyConvolutional,
    image: torch.Tensor,
    *,
    threshold: float = 0.5,
    iou_threshold: float = 0.3,
    background: int | None = None,
) -> WindowDetections:
    """Score every window of ``image [C, H, W]`` in one pass, keep windows above ``threshold`` (ignoring
    the ``background`` class, if any), and suppress overlapping windows per class with NMS."""
    fcn.eval()
    probs = fcn(image[None]).softmax(1)[0]
    if background is not None:
        probs_fg = probs.clone()
        probs_fg[background] = 0
    else:
        probs_fg = probs
    scores, classes = probs_fg.max(0)
    ii, jj = torch.nonzero(scores >= threshold, as_tuple=True)
    boxes = torch.tensor([fcn.window_box(int(i), int(j)) for i, j in zip(ii, jj)], dtype=torch.float32)
    boxes = boxes.view(-1, 4)
    s, c = scores[ii, jj], classes[ii, jj]
    keep = batched_nms(boxes, s, c, iou_threshold)
    return WindowDetections(boxes[keep], s[keep], c[keep], probs)


def save_heatmap(
    image: torch.Tensor, score_map: torch.Tensor, path: str | os.PathLike[str], alpha: float = 0.5
) -> Path:
    """Blend the per-window top score (a jet colour map) over ``image [3, H, W] uint8``; returns the path."""
    from matplotlib import colormaps
    from PIL import Image

    top = score_map.max(0).values[None, None].float()
    top_map = torch.nn.functional.interpolate(top, size=image.shape[-2:], mode="nearest")[0, 0].cpu().numpy()
    heat = np.asarray(colormaps["jet"](top_map))[..., :3] * 255
    rgb = image.permute(1, 2, 0).cpu().numpy().astype(np.float32)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(((1 - alpha) * rgb + alpha * heat).clip(0, 255).astype(np.uint8)).save(out)
    return out
