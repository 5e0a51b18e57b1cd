"""ResNet (He et al. 2015): residual blocks with identity and projection shortcuts."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from torch import nn

from cnnkit.layers import BasicBlock, Bottleneck, ConvNormAct, set_bn_eps
from cnnkit.models.base import ClassifierHead, ConvNet, FeatureInfo, NameMap, conv_norm_names
from cnnkit.registry import register_model

Block = type[BasicBlock] | type[Bottleneck]


@dataclass(frozen=True)
class ResNetSpec:
    block: Block
    repeats: tuple[int, int, int, int]  # blocks per stage; stage widths are 64, 128, 256, 512 x width


RESNETS = {
    "resnet18": ResNetSpec(BasicBlock, (2, 2, 2, 2)),
    "resnet34": ResNetSpec(BasicBlock, (3, 4, 6, 3)),
    "resnet50": ResNetSpec(Bottleneck, (3, 4, 6, 3)),
    "resnet101": ResNetSpec(Bottleneck, (3, 4, 23, 3)),
    "resnet152": ResNetSpec(Bottleneck, (3, 8, 36, 3)),
}


class ResNet(ConvNet):
    """7x7/2 conv stem and 3x3/2 max-pool, four stages of residual blocks, global pool and a linear layer.

    The first block of stages 2-4 halves the resolution; its shortcut is a 1x1 projection (``W_s``).
    ``stride_in_1x1`` and ``bn_eps`` build Keras' ResNet50 (v1: the stride on the first 1x1, epsilon
    1.001e-5) instead of torchvision's v1.5.
    """

    def __init__(
        self,
        spec: ResNetSpec,
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        zero_init_residual: bool = False,
        width: float = 1.0,
        stride_in_1x1: bool = False,
        bn_eps: float | None = None,
    ) -> None:
        super().__init__()
        if stride_in_1x1 and spec.block is not Bottleneck:
            raise ValueError("stride_in_1x1 applies to bottleneck ResNets (resnet50 and deeper)")
        extra = {"stride_in_1x1": True} if stride_in_1x1 else {}
        widths = [max(int(c * width), 1) for c in (64, 128, 256, 512)]
        self.stem = nn.Sequential(
            OrderedDict(
                conv=ConvNormAct(in_chans, widths[0], 7, 2, 3),
                pool=nn.MaxPool2d(3, 2, 1),
            )
        )
        total = sum(spec.repeats)
        block_id = 0
        in_ch = widths[0]
        stages: list[nn.Module] = []
        self.feature_info = []
        for i, (channels, repeats) in enumerate(zip(widths, spec.repeats)):
            blocks = []
            for j in range(repeats):
                stride = 2 if (i > 0 and j == 0) else 1
                drop_path = drop_path_rate * block_id / max(total - 1, 1)
                blocks.append(spec.block(in_ch, channels, stride, drop_path, **extra))
                in_ch = channels * spec.block.expansion
                block_id += 1
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(FeatureInfo(in_ch, 4 * 2**i, f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.final = nn.Identity()
        self.head = ClassifierHead(in_ch, num_classes, dropout=drop_rate)
        _init_weights(self, zero_init_residual)
        set_bn_eps(self, bn_eps)

    def reference_names(self) -> NameMap:
        """torchvision's (and timm's) ``conv1/bn1``, ``layerN.B.convK/bnK``, ``downsample``, ``fc``."""
        names = {"conv1": "stem.conv.conv", "bn1": "stem.conv.bn", "fc": "head.fc"}
        for s, stage in enumerate(self.stages):
            for b, block in enumerate(stage.children()):
                ref, own = f"layer{s + 1}.{b}", f"stages.{s}.{b}"
                for k in (1, 2, 3):
                    if hasattr(block, f"conv{k}"):
                        names[f"{ref}.conv{k}"] = f"{own}.conv{k}.conv"
                        names[f"{ref}.bn{k}"] = f"{own}.conv{k}.bn"
                conv_norm_names(names, f"{ref}.downsample", f"{own}.shortcut")
        return names


def _init_weights(model: nn.Module, zero_init_residual: bool) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:  # each block starts as the identity (Goyal et al. 2017)
        for m in model.modules():
            last = getattr(m, "conv3", None) if isinstance(m, Bottleneck) else getattr(m, "conv2", None)
            if isinstance(m, BasicBlock | Bottleneck) and last is not None:
                nn.init.zeros_(last.bn.weight)


def _make(name: str) -> None:
    spec = RESNETS[name]

    @register_model(name)
    def builder(**kwargs: Any) -> ResNet:
        return ResNet(spec, **kwargs)

    builder.__doc__ = f"{name}: {spec.block.__name__} blocks {spec.repeats} (He et al. 2015)."
    builder.__name__ = name


for _name in RESNETS:
    _make(_name)
