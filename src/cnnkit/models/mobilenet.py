"""MobileNet v1 (depthwise separable), v2 (inverted residuals) and v3 (with squeeze-excite, h-swish)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import nn

from cnnkit.layers import (
    ConvNormAct,
    DepthwiseSeparable,
    InvertedResidual,
    SqueezeExcite,
    make_divisible,
    set_bn_eps,
    use_tf_padding,
)
from cnnkit.models.base import ClassifierHead, ConvNet, FeatureInfo, NameMap, conv_norm_names
from cnnkit.registry import register_model


def _group_by_stride(
    blocks: Sequence[tuple[nn.Module, int, int]], stem_stride: int
) -> tuple[list[nn.Module], list[FeatureInfo]]:
    """Split ``(block, stride, out_channels)`` triples into stages: a strided block starts a new stage."""
    stages: list[list[nn.Module]] = []
    widths: list[int] = []
    reductions: list[int] = []
    reduction = stem_stride
    for block, stride, out_ch in blocks:
        if stride > 1 or not stages:
            reduction *= stride
            stages.append([])
            widths.append(out_ch)
            reductions.append(reduction)
        stages[-1].append(block)
        widths[-1] = out_ch
    info = [FeatureInfo(c, r, f"stages.{i}") for i, (c, r) in enumerate(zip(widths, reductions))]
    return [nn.Sequential(*s) for s in stages], info


def inverted_residual_names(
    model: ConvNet, block_refs: Sequence[str], final: str, *, split_project: bool = False
) -> NameMap:
    """torchvision's names of a MobileNetV2/V3 or EfficientNet: ``features.0`` the stem, ``block_refs``
    the inverted residuals in order (their layers numbered: ``i.0`` conv, ``i.1`` norm, squeeze-excite
    ``fc1/fc2``; V2 keeps the projection as two flat entries, ``split_project``), ``final`` the last
    1x1 conv, then the classifier."""
    names = model.head.reference_names()
    conv_norm_names(names, "features.0", "stem")
    blocks = [
        (f"stages.{s}.{b}", block)
        for s, stage in enumerate(model.stages)
        for b, block in enumerate(stage.children())
    ]
    for ref, (own, block) in zip(block_refs, blocks, strict=True):
        layers = [name for name, _ in block.block.named_children()]  # type: ignore[union-attr]
        for i, name in enumerate(layers):
            if name == "se":
                names[f"{ref}.{i}.fc1"], names[f"{ref}.{i}.fc2"] = (
                    f"{own}.block.se.reduce",
                    f"{own}.block.se.expand",
                )
            elif name == "project" and split_project:
                names[f"{ref}.{i}"], names[f"{ref}.{i + 1}"] = (
                    f"{own}.block.project.conv",
                    f"{own}.block.project.bn",
                )
            else:
                conv_norm_names(names, f"{ref}.{i}", f"{own}.block.{name}")
    conv_norm_names(names, final, "final")
    return names


# ---------------------------------------------------------------------------------------- MobileNet v1
# (output channels, stride) of the 13 depthwise-separable blocks (Howard et al. 2017, Table 1).
MOBILENET_V1 = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)  # fmt: skip


class MobileNetV1(ConvNet):
    """3x3/2 conv stem, 13 depthwise separable blocks, global pool, dropout, linear."""

    def __init__(
        self, *, num_classes: int = 1000, in_chans: int = 3, width: float = 1.0, drop_rate: float = 0.001
    ) -> None:
        super().__init__()
        in_ch = int(32 * width)
        self.stem = ConvNormAct(in_chans, in_ch, 3, 2)
        blocks = []
        for channels, stride in MOBILENET_V1:
            out_ch = int(channels * width)
            blocks.append((DepthwiseSeparable(in_ch, out_ch, stride), stride, out_ch))
            in_ch = out_ch
        stages, self.feature_info = _group_by_stride(blocks, stem_stride=2)
        self.stages = nn.Sequential(*stages)
        self.final = nn.Identity()
        self.head = ClassifierHead(in_ch, num_classes, dropout=drop_rate)
        _init_weights(self)


@register_model("mobilenet_v1")
def mobilenet_v1(**kwargs: Any) -> MobileNetV1:
    """MobileNet v1 (Howard et al. 2017): depthwise separable convolutions, width multiplier ``width``."""
    return MobileNetV1(**kwargs)


# ---------------------------------------------------------------------------------------- MobileNet v2
@dataclass(frozen=True)
class InvertedResidualStage:
    expand: int  # t: expansion factor of the first 1x1 conv
    channels: int  # c: output channels of the projection 1x1 conv
    repeats: int  # n
    stride: int  # s: stride of the first block of the stage


MOBILENET_V2 = (
    InvertedResidualStage(1, 16, 1, 1),
    InvertedResidualStage(6, 24, 2, 2),
    InvertedResidualStage(6, 32, 3, 2),
    InvertedResidualStage(6, 64, 4, 2),
    InvertedResidualStage(6, 96, 3, 1),
    InvertedResidualStage(6, 160, 3, 2),
    InvertedResidualStage(6, 320, 1, 1),
)


class MobileNetV2(ConvNet):
    """32-channel 3x3/2 stem, the ``(t, c, n, s)`` inverted-residual table, 1x1 conv to 1280, classifier.

    ``tf_padding`` and ``bn_eps`` (1e-3) build Keras' MobileNetV2: its stride-2 convolutions pad the
    extra pixel bottom/right only.
    """

    def __init__(
        self,
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        width: float = 1.0,
        drop_rate: float = 0.2,
        drop_path_rate: float = 0.0,
        table: Sequence[InvertedResidualStage] = MOBILENET_V2,
        tf_padding: bool = False,
        bn_eps: float | None = None,
    ) -> None:
        super().__init__()
        in_ch = make_divisible(32 * width)
        last_ch = make_divisible(1280 * max(1.0, width))
        self.stem = ConvNormAct(in_chans, in_ch, 3, 2, act=nn.ReLU6)
        blocks: list[tuple[nn.Module, int, int]] = []
        total = sum(s.repeats for s in table)
        for row in table:
            out_ch = make_divisible(row.channels * width)
            for i in range(row.repeats):
                stride = row.stride if i == 0 else 1
                block = InvertedResidual(
                    in_ch,
                    round(in_ch * row.expand),
                    out_ch,
                    stride=stride,
                    act=nn.ReLU6,
                    drop_path=drop_path_rate * len(blocks) / total,
                )
                blocks.append((block, stride, out_ch))
                in_ch = out_ch
        stages, self.feature_info = _group_by_stride(blocks, stem_stride=2)
        self.stages = nn.Sequential(*stages)
        self.final = ConvNormAct(in_ch, last_ch, 1, act=nn.ReLU6)
        self.head = ClassifierHead(last_ch, num_classes, dropout=drop_rate)
        _init_weights(self)
        set_bn_eps(use_tf_padding(self) if tf_padding else self, bn_eps)

    def reference_names(self) -> NameMap:
        count = sum(len(list(stage.children())) for stage in self.stages)
        refs = [f"features.{k}.conv" for k in range(1, count + 1)]
        return inverted_residual_names(self, refs, f"features.{count + 1}", split_project=True)


@register_model("mobilenet_v2")
def mobilenet_v2(**kwargs: Any) -> MobileNetV2:
    """MobileNetV2 (Sandler et al. 2018): inverted residuals with linear bottlenecks."""
    return MobileNetV2(**kwargs)


# ---------------------------------------------------------------------------------------- MobileNet v3
@dataclass(frozen=True)
class BneckRow:
    kernel: int
    expanded: int
    channels: int
    se: bool
    hswish: bool  # activation: h-swish (True) or ReLU (False)
    stride: int


def _rows(*rows: tuple[int, int, int, bool, bool, int]) -> tuple[BneckRow, ...]:
    return tuple(BneckRow(*r) for r in rows)


# Howard et al. 2019, Tables 1 and 2: (kernel, expanded, out, SE, h-swish, stride).
MOBILENET_V3_LARGE = _rows(
    (3, 16, 16, False, False, 1), (3, 64, 24, False, False, 2), (3, 72, 24, False, False, 1),
    (5, 72, 40, True, False, 2), (5, 120, 40, True, False, 1), (5, 120, 40, True, False, 1),
    (3, 240, 80, False, True, 2), (3, 200, 80, False, True, 1), (3, 184, 80, False, True, 1),
    (3, 184, 80, False, True, 1), (3, 480, 112, True, True, 1), (3, 672, 112, True, True, 1),
    (5, 672, 160, True, True, 2), (5, 960, 160, True, True, 1), (5, 960, 160, True, True, 1),
)  # fmt: skip
MOBILENET_V3_SMALL = _rows(
    (3, 16, 16, True, False, 2), (3, 72, 24, False, False, 2), (3, 88, 24, False, False, 1),
    (5, 96, 40, True, True, 2), (5, 240, 40, True, True, 1), (5, 240, 40, True, True, 1),
    (5, 120, 48, True, True, 1), (5, 144, 48, True, True, 1), (5, 288, 96, True, True, 2),
    (5, 576, 96, True, True, 1), (5, 576, 96, True, True, 1),
)  # fmt: skip


class MobileNetV3(ConvNet):
    """h-swish stem, bneck table (inverted residuals with optional SE), 1x1 conv, pooled MLP head."""

    def __init__(
        self,
        table: Sequence[BneckRow],
        last_channels: int,
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        width: float = 1.0,
        drop_rate: float = 0.2,
        drop_path_rate: float = 0.0,
        bn_eps: float = 0.001,
    ) -> None:
        super().__init__()
        # torchvision's weights use TensorFlow's epsilon; timm's use PyTorch's (set when loading them)
        norm = partial(nn.BatchNorm2d, eps=bn_eps, momentum=0.01)
        in_ch = make_divisible(16 * width)
        self.stem = ConvNormAct(in_chans, in_ch, 3, 2, norm=norm, act=nn.Hardswish)
        blocks = []
        for i, row in enumerate(table):
            out_ch = make_divisible(row.channels * width)
            expanded = make_divisible(row.expanded * width)
            se = _v3_se if row.se else None
            block = InvertedResidual(
                in_ch,
                expanded,
                out_ch,
                kernel_size=row.kernel,
                stride=row.stride,
                act=nn.Hardswish if row.hswish else nn.ReLU,
                norm=norm,
                se=se,
                drop_path=drop_path_rate * i / len(table),
            )
            blocks.append((block, row.stride, out_ch))
            in_ch = out_ch
        stages, self.feature_info = _group_by_stride(blocks, stem_stride=2)
        self.stages = nn.Sequential(*stages)
        self.final = ConvNormAct(in_ch, 6 * in_ch, 1, norm=norm, act=nn.Hardswish)
        self.head = ClassifierHead(
            6 * in_ch,
            num_classes,
            dropout=drop_rate,
            hidden=(make_divisible(last_channels * width),),
            act=nn.Hardswish,
        )
        _init_weights(self)

    def reference_names(self) -> NameMap:
        count = sum(len(list(stage.children())) for stage in self.stages)
        refs = [f"features.{k}.block" for k in range(1, count + 1)]
        return inverted_residual_names(self, refs, f"features.{count + 1}")


def _v3_se(channels: int) -> SqueezeExcite:
    return SqueezeExcite(channels, make_divisible(channels // 4), act=nn.ReLU, gate=nn.Hardsigmoid)


@register_model("mobilenet_v3_large")
def mobilenet_v3_large(**kwargs: Any) -> MobileNetV3:
    """MobileNetV3-Large (Howard et al. 2019)."""
    return MobileNetV3(MOBILENET_V3_LARGE, 1280, **kwargs)


@register_model("mobilenet_v3_small")
def mobilenet_v3_small(**kwargs: Any) -> MobileNetV3:
    """MobileNetV3-Small (Howard et al. 2019)."""
    return MobileNetV3(MOBILENET_V3_SMALL, 1024, **kwargs)


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
