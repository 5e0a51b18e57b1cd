"""Reusable building blocks of convolutional networks."""

from cnnkit.layers.blocks import (
    BasicBlock,
    Bottleneck,
    DepthwiseSeparable,
    DropPath,
    InvertedResidual,
    SqueezeExcite,
)
from cnnkit.layers.conv import Conv2dSame, ConvNormAct, make_divisible, set_bn_eps, use_tf_padding
from cnnkit.layers.frozen_bn import FrozenBatchNorm2d, freeze_batchnorm

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "Conv2dSame",
    "ConvNormAct",
    "DepthwiseSeparable",
    "DropPath",
    "FrozenBatchNorm2d",
    "InvertedResidual",
    "SqueezeExcite",
    "freeze_batchnorm",
    "make_divisible",
    "set_bn_eps",
    "use_tf_padding",
]
