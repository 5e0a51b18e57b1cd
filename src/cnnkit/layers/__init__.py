"""Reusable building blocks of convolutional networks."""

from cnnkit.layers.blocks import (
    BasicBlock,
    Bottleneck,
    DepthwiseSeparable,
    DropPath,
    InvertedResidual,
    SqueezeExcite,
)
from cnnkit.layers.conv import Conv2dSame, ConvNormAct, make_divisible

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "Conv2dSame",
    "ConvNormAct",
    "DepthwiseSeparable",
    "DropPath",
    "InvertedResidual",
    "SqueezeExcite",
    "make_divisible",
]
