"""EfficientNet B0-B7 (Tan & Le 2019): MBConv stages scaled in width, depth and resolution together."""

from __future__ import annotations

import logging
import math
from functools import partial
from typing import Any

from torch import nn

from cnnkit.arithmetic.scaling import (
    EFFICIENTNET_B0,
    EFFICIENTNET_SCALING,
    SE_RATIO,
    STEM_CHANNELS,
    MBConvStage,
    Scaling,
    compound_scaling,
)
from cnnkit.layers import (
    ConvNormAct,
    InvertedResidual,
    SqueezeExcite,
    make_divisible,
    set_bn_eps,
    use_tf_padding,
)
from cnnkit.layers.conv import NormLayer
from cnnkit.models.base import ClassifierHead, ConvNet, FeatureInfo, NameMap
from cnnkit.models.mobilenet import inverted_residual_names
from cnnkit.registry import register_model

log = logging.getLogger(__name__)


# torchvision's B5-B7 weights were ported from TensorFlow with its BatchNorm epsilon; B0-B4 use PyTorch's.
TF_BN_VARIANTS = {"efficientnet_b5", "efficientnet_b6", "efficientnet_b7"}


class EfficientNet(ConvNet):
    """3x3/2 stem, MBConv stages (SE ratio 0.25, SiLU, drop-connect), 1x1 conv to 4x the last width.

    ``tf_padding`` and ``bn_eps`` (1e-3) build the Keras/TensorFlow original: its stride-2 convolutions
    pad the extra pixels bottom/right.
    """

    def __init__(
        self,
        scaling: Scaling,
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float | None = None,
        drop_path_rate: float = 0.2,
        norm: NormLayer = nn.BatchNorm2d,
        table: tuple[MBConvStage, ...] = EFFICIENTNET_B0,
        tf_padding: bool = False,
        bn_eps: float | None = None,
    ) -> None:
        super().__init__()
        self.scaling = scaling
        self.default_imgsz = scaling.resolution
        in_ch = make_divisible(STEM_CHANNELS * scaling.width)
        self.stem = ConvNormAct(in_chans, in_ch, 3, 2, norm=norm, act=nn.SiLU)
        repeats = [math.ceil(row.repeats * scaling.depth) for row in table]
        self.row_repeats = tuple(repeats)
        total = sum(repeats)
        stages: list[nn.Sequential] = []
        self.feature_info = []
        reduction, block_id = 2, 0
        for row, n in zip(table, repeats):
            out_ch = make_divisible(row.channels * scaling.width)
            blocks = []
            for i in range(n):
                se = partial(_se, squeeze=max(1, int(in_ch * SE_RATIO)))
                blocks.append(
                    InvertedResidual(
                        in_ch,
                        make_divisible(in_ch * row.expand),
                        out_ch,
                        kernel_size=row.kernel,
                        stride=row.stride if i == 0 else 1,
                        act=nn.SiLU,
                        norm=norm,
                        se=se,
                        drop_path=drop_path_rate * block_id / total,
                    )
                )
                in_ch = out_ch
                block_id += 1
            reduction *= row.stride
            if row.stride > 1 or not stages:
                stages.append(nn.Sequential(*blocks))
                self.feature_info.append(FeatureInfo(out_ch, reduction, f"stages.{len(stages) - 1}"))
            else:  # a stride-1 row continues the current resolution's stage
                stages[-1].extend(blocks)
                self.feature_info[-1] = FeatureInfo(out_ch, reduction, self.feature_info[-1].module)
        self.stages = nn.Sequential(*stages)
        self.final = ConvNormAct(in_ch, 4 * in_ch, 1, norm=norm, act=nn.SiLU)
        dropout = scaling.dropout if drop_rate is None else drop_rate
        self.head = ClassifierHead(4 * in_ch, num_classes, dropout=dropout)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)
        set_bn_eps(use_tf_padding(self) if tf_padding else self, bn_eps)

    def reference_names(self) -> NameMap:
        """torchvision's ``features.R.J.block`` (row R of the table, block J), ``features.8`` final."""
        refs = [f"features.{r + 1}.{j}.block" for r, n in enumerate(self.row_repeats) for j in range(n)]
        return inverted_residual_names(self, refs, f"features.{len(self.row_repeats) + 1}")


def _se(channels: int, squeeze: int) -> SqueezeExcite:
    return SqueezeExcite(channels, squeeze, act=nn.SiLU, gate=nn.Sigmoid)


def _make(name: str) -> None:
    scaling = EFFICIENTNET_SCALING[name]
    norm: NormLayer = (
        partial(nn.BatchNorm2d, eps=1e-3, momentum=0.01) if name in TF_BN_VARIANTS else nn.BatchNorm2d
    )

    @register_model(name)
    def builder(**kwargs: Any) -> EfficientNet:
        kwargs.setdefault("norm", norm)
        return EfficientNet(scaling, **kwargs)

    builder.__doc__ = (
        f"{name}: width x{scaling.width}, depth x{scaling.depth}, {scaling.resolution} px (Tan & Le 2019)."
    )
    builder.__name__ = name


for _name in EFFICIENTNET_SCALING:
    _make(_name)


@register_model("efficientnet")
def efficientnet(
    *, phi: float = 0.0, alpha: float = 1.2, beta: float = 1.1, gamma: float = 1.15, **kwargs: Any
) -> EfficientNet:
    """EfficientNet scaled from B0 by a custom compound coefficient ``phi`` (``alpha, beta, gamma``)."""
    scaling = compound_scaling(phi, alpha, beta, gamma)
    log.info(
        "efficientnet phi=%s: width x%.3f, depth x%.3f, resolution %d, dropout %.2f",
        phi,
        scaling.width,
        scaling.depth,
        scaling.resolution,
        scaling.dropout,
    )
    return EfficientNet(scaling, **kwargs)
