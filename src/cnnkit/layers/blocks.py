"""Reusable blocks of the classic architectures: residual, depthwise-separable, inverted residual."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from cnnkit.layers.conv import ActLayer, ConvNormAct, NormLayer


class DropPath(nn.Module):
    """Stochastic depth: zero a residual branch for a random subset of samples while training.

    Surviving samples are scaled by ``1 / (1 - p)`` so the expectation is unchanged (as torchvision's
    ``StochasticDepth(p, "row")``).
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop-path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: global pool, 1x1 reduce, act, 1x1 expand, gate, rescale channels."""

    def __init__(
        self,
        channels: int,
        squeeze_channels: int,
        act: ActLayer = nn.ReLU,
        gate: ActLayer = nn.Sigmoid,
    ) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, squeeze_channels, 1)
        self.act = act()
        self.expand = nn.Conv2d(squeeze_channels, channels, 1)
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.gate(self.expand(self.act(self.reduce(self.pool(x)))))
        return x * scale


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions plus a shortcut.

    The shortcut is the identity when shapes match, else a projection ``W_s`` (1x1 conv + BN).
    """

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1, drop_path: float = 0.0) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = ConvNormAct(in_channels, channels, 3, stride)
        self.conv2 = ConvNormAct(channels, out_channels, 3, act=None)
        self.shortcut = _shortcut(in_channels, out_channels, stride)
        self.drop_path = DropPath(drop_path)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        return self.act(self.drop_path(out) + self.shortcut(x))


class Bottleneck(nn.Module):
    """ResNet bottleneck: 1x1 reduce, 3x3 (carrying the stride, as in "ResNet v1.5"), 1x1 expand x4.

    ``stride_in_1x1``: the original paper's placement (Caffe's and Keras' ResNets), the stride on the
    first 1x1 convolution, which skips three quarters of the pixels before any 3x3 sees them.
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        drop_path: float = 0.0,
        stride_in_1x1: bool = False,
    ) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = ConvNormAct(in_channels, channels, 1, s1)
        self.conv2 = ConvNormAct(channels, channels, 3, s3)
        self.conv3 = ConvNormAct(channels, out_channels, 1, act=None)
        self.shortcut = _shortcut(in_channels, out_channels, stride)
        self.drop_path = DropPath(drop_path)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv3(self.conv2(self.conv1(x)))
        return self.act(self.drop_path(out) + self.shortcut(x))


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Identity when the shape is unchanged, else the projection shortcut ``W_s a`` (1x1 conv + BN)."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return ConvNormAct(in_channels, out_channels, 1, stride, act=None)


class DepthwiseSeparable(nn.Sequential):
    """MobileNet v1 block: 3x3 depthwise convolution (one filter per channel) then 1x1 pointwise.

    Costs ``k^2 * C + C * C'`` multiply-adds per pixel instead of ``k^2 * C * C'``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        norm: NormLayer = nn.BatchNorm2d,
        act: ActLayer = nn.ReLU,
    ) -> None:
        super().__init__(
            OrderedDict(
                depthwise=ConvNormAct(
                    in_channels, in_channels, 3, stride, groups=in_channels, norm=norm, act=act
                ),
                pointwise=ConvNormAct(in_channels, out_channels, 1, norm=norm, act=act),
            )
        )


class InvertedResidual(nn.Module):
    """Inverted residual with linear bottleneck (MobileNetV2/V3, and EfficientNet's MBConv).

    ``1x1 expansion (x t) -> kxk depthwise -> [squeeze-excite] -> linear 1x1 projection``, with a
    residual connection when the stride is 1 and the channel count is unchanged. The expansion is
    skipped when ``expanded == in_channels``.
    """

    def __init__(
        self,
        in_channels: int,
        expanded: int,
        out_channels: int,
        *,
        kernel_size: int = 3,
        stride: int = 1,
        act: ActLayer = nn.ReLU6,
        norm: NormLayer = nn.BatchNorm2d,
        se: Callable[[int], nn.Module] | None = None,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if expanded != in_channels:
            layers["expand"] = ConvNormAct(in_channels, expanded, 1, norm=norm, act=act)
        layers["depthwise"] = ConvNormAct(
            expanded, expanded, kernel_size, stride, groups=expanded, norm=norm, act=act
        )
        if se is not None:
            layers["se"] = se(expanded)
        layers["project"] = ConvNormAct(expanded, out_channels, 1, norm=norm, act=None)
        self.block = nn.Sequential(layers)
        self.use_residual = stride == 1 and in_channels == out_channels
        self.drop_path = DropPath(drop_path) if self.use_residual else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if self.use_residual:
            out = self.drop_path(out) + x
        return out
