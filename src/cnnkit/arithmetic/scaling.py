"""EfficientNet's compound scaling as arithmetic: multipliers, the scaled stage table, and its cost.

Tan & Le (2019) scale depth by ``alpha**phi``, width by ``beta**phi`` and resolution by ``gamma**phi``
under ``alpha * beta**2 * gamma**2 ~= 2``: multiply-adds grow linearly with depth and quadratically with
width and resolution, so each unit of ``phi`` about doubles them. The stage table and the costs here are
those of the model :mod:`cnnkit.models.efficientnet` builds (tested against its forward pass).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never going more than 10% below it.

    This is the channel rounding of MobileNet/EfficientNet width multipliers.
    """
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


@dataclass(frozen=True)
class MBConvStage:
    kernel: int
    repeats: int
    channels: int
    expand: int
    stride: int


# EfficientNet-B0 (Table 1 of the paper): the base every variant scales.
EFFICIENTNET_B0 = (
    MBConvStage(3, 1, 16, 1, 1),
    MBConvStage(3, 2, 24, 6, 2),
    MBConvStage(5, 2, 40, 6, 2),
    MBConvStage(3, 3, 80, 6, 2),
    MBConvStage(5, 3, 112, 6, 1),
    MBConvStage(5, 4, 192, 6, 2),
    MBConvStage(3, 1, 320, 6, 1),
)
STEM_CHANNELS = 32
SE_RATIO = 0.25


@dataclass(frozen=True)
class Scaling:
    """Compound-scaling coefficients of one variant."""

    width: float
    depth: float
    resolution: int
    dropout: float


# The released B0-B7 (not exactly alpha**phi, see REFERENCE.md).
EFFICIENTNET_SCALING = {
    "efficientnet_b0": Scaling(1.0, 1.0, 224, 0.2),
    "efficientnet_b1": Scaling(1.0, 1.1, 240, 0.2),
    "efficientnet_b2": Scaling(1.1, 1.2, 260, 0.3),
    "efficientnet_b3": Scaling(1.2, 1.4, 300, 0.3),
    "efficientnet_b4": Scaling(1.4, 1.8, 380, 0.4),
    "efficientnet_b5": Scaling(1.6, 2.2, 456, 0.4),
    "efficientnet_b6": Scaling(1.8, 2.6, 528, 0.5),
    "efficientnet_b7": Scaling(2.0, 3.1, 600, 0.5),
}
# Table 2 of the paper: parameters and FLOPs (multiply-adds) of the released models, in millions.
PUBLISHED_COST = {
    "efficientnet_b0": (5.3, 390),
    "efficientnet_b1": (7.8, 700),
    "efficientnet_b2": (9.2, 1000),
    "efficientnet_b3": (12, 1800),
    "efficientnet_b4": (19, 4200),
    "efficientnet_b5": (30, 9900),
    "efficientnet_b6": (43, 19000),
    "efficientnet_b7": (66, 37000),
}


def compound_scaling(
    phi: float, alpha: float = 1.2, beta: float = 1.1, gamma: float = 1.15, base_resolution: int = 224
) -> Scaling:
    """Width ``beta**phi``, depth ``alpha**phi`` and resolution ``gamma**phi * base`` (rounded to 8 px).

    The paper constrains ``alpha * beta**2 * gamma**2 ~= 2`` so that each unit of ``phi`` about doubles
    the FLOPs. Dropout grows linearly from 0.2 at phi 0 to 0.5 at phi 7, as in the released models.
    """
    resolution = int(round(base_resolution * gamma**phi / 8) * 8)
    dropout = min(0.5, 0.2 + 0.3 * phi / 7)
    return Scaling(beta**phi, alpha**phi, resolution, round(dropout, 3))


def flops_factor(alpha: float, beta: float, gamma: float) -> float:
    """How much one unit of ``phi`` multiplies the cost: ``alpha * beta**2 * gamma**2`` (the paper: ~2)."""
    return alpha * beta**2 * gamma**2


@dataclass(frozen=True)
class StageRow:
    """One row of the scaled table: ``layers`` blocks of ``operator`` from ``resolution`` px input."""

    operator: str
    resolution: int  # input size of the row's first layer
    channels: int  # output channels
    layers: int
    params: int
    mults: int


def _conv(n_out: int, c_in: int, c_out: int, f: int = 1, groups: int = 1) -> tuple[int, int]:
    """(params, mults) of a bias-free convolution followed by BatchNorm (2 parameters per channel)."""
    weights = f * f * (c_in // groups) * c_out
    return weights + 2 * c_out, n_out * n_out * weights


def _mbconv(n: int, c_in: int, c_out: int, kernel: int, expand: int, stride: int) -> tuple[int, int]:
    """(params, mults) of one MBConv: [1x1 expand] -> kxk depthwise -> squeeze-excite -> 1x1 project."""
    hidden = make_divisible(c_in * expand)
    n_out = math.ceil(n / stride)
    parts = [_conv(n, c_in, hidden)] if hidden != c_in else []
    parts.append(_conv(n_out, hidden, hidden, kernel, groups=hidden))
    squeeze = max(1, int(c_in * SE_RATIO))
    se = hidden * squeeze  # two 1x1 convolutions with biases on the pooled 1x1 map
    parts.append((2 * se + squeeze + hidden, 2 * se))
    parts.append(_conv(n_out, hidden, c_out))
    return sum(p for p, _ in parts), sum(m for _, m in parts)


def efficientnet_table(
    scaling: Scaling,
    *,
    resolution: int | None = None,
    num_classes: int = 1000,
    in_chans: int = 3,
    table: tuple[MBConvStage, ...] = EFFICIENTNET_B0,
) -> list[StageRow]:
    """The stage table of an EfficientNet scaled by ``scaling`` (Table 1 of the paper, scaled):
    stem, the MBConv rows with ``ceil(repeats * depth)`` layers and ``make_divisible(channels * width)``
    channels, the 1x1 head conv to 4x the last width, and the pooled classifier."""
    n = resolution or scaling.resolution
    c = make_divisible(STEM_CHANNELS * scaling.width)
    n_out = math.ceil(n / 2)
    rows = [StageRow("Conv3x3", n, c, 1, *_conv(n_out, in_chans, c, 3))]
    n = n_out
    for stage in table:
        repeats = math.ceil(stage.repeats * scaling.depth)
        c_out = make_divisible(stage.channels * scaling.width)
        params = mults = 0
        size, c_in = n, c
        for i in range(repeats):
            stride = stage.stride if i == 0 else 1
            p, m = _mbconv(size, c_in, c_out, stage.kernel, stage.expand, stride)
            params, mults = params + p, mults + m
            size, c_in = math.ceil(size / stride), c_out
        name = f"MBConv{stage.expand}, k{stage.kernel}x{stage.kernel}"
        rows.append(StageRow(name, n, c_out, repeats, params, mults))
        n, c = size, c_out
    rows.append(StageRow("Conv1x1", n, 4 * c, 1, *_conv(n, c, 4 * c)))
    fc = 4 * c * num_classes
    rows.append(StageRow("Pool & FC", n, num_classes, 1, fc + num_classes, fc))
    return rows
