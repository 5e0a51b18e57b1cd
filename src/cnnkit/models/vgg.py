"""VGG (Simonyan & Zisserman 2014): stacks of 3x3 'same' convolutions, 2x2 max-pool between stages."""

from __future__ import annotations

from typing import Any

from torch import nn

from cnnkit.layers import ConvNormAct
from cnnkit.models.base import ClassifierHead, ConvNet, FeatureInfo, NameMap
from cnnkit.registry import register_model

# Convolutions per stage; stage widths are 64, 128, 256, 512, 512 and every stage ends in a max-pool.
VGG_DEPTHS = {
    "vgg11": (1, 1, 2, 2, 2),
    "vgg13": (2, 2, 2, 2, 2),
    "vgg16": (2, 2, 3, 3, 3),
    "vgg19": (2, 2, 4, 4, 4),
}
VGG_WIDTHS = (64, 128, 256, 512, 512)


class VGG(ConvNet):
    """Five stages of 3x3 convolutions (+ optional BatchNorm) and max-pool, then 4096-4096-classes."""

    min_input_size = 32

    def __init__(
        self,
        depths: tuple[int, ...],
        *,
        batch_norm: bool = False,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.5,
    ) -> None:
        super().__init__()
        self.stem = nn.Identity()
        norm = nn.BatchNorm2d if batch_norm else None
        stages = []
        self.feature_info = []
        in_ch = in_chans
        for i, (width, depth) in enumerate(zip(VGG_WIDTHS, depths)):
            layers: list[nn.Module] = []
            for _ in range(depth):
                # VGG keeps the conv bias even when BatchNorm follows.
                layers.append(ConvNormAct(in_ch, width, 3, norm=norm, bias=True))
                in_ch = width
            layers.append(nn.MaxPool2d(2, 2))
            stages.append(nn.Sequential(*layers))
            self.feature_info.append(FeatureInfo(width, 2 ** (i + 1), f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.final = nn.Identity()
        self.head = ClassifierHead(512, num_classes, dropout=drop_rate, hidden=(4096, 4096), pool_size=7)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def reference_names(self) -> NameMap:
        """torchvision's flat ``features.N`` (conv, [bn], relu per layer, a max-pool per stage) and
        ``classifier``."""
        names, n = self.head.reference_names(), 0
        for s, stage in enumerate(self.stages):
            for j, layer in enumerate(stage.children()):
                for child, _ in layer.named_children() if isinstance(layer, ConvNormAct) else [("", layer)]:
                    if child:
                        names[f"features.{n}"] = f"stages.{s}.{j}.{child}"
                    n += 1
        return names


def _make(name: str, batch_norm: bool) -> None:
    depths = VGG_DEPTHS[name]
    full = f"{name}_bn" if batch_norm else name

    @register_model(full)
    def builder(**kwargs: Any) -> VGG:
        return VGG(depths, batch_norm=batch_norm, **kwargs)

    builder.__doc__ = f"{full}: {sum(depths)} conv layers{' with BatchNorm' if batch_norm else ''} + 3 FC."
    builder.__name__ = full


for _name in VGG_DEPTHS:
    _make(_name, batch_norm=False)
    _make(_name, batch_norm=True)
