"""GoogLeNet / Inception v1 (Szegedy et al. 2014) and Inception v3 (Szegedy et al. 2015).

An inception module runs parallel branches (1x1; 1x1 -> 3x3; 1x1 -> 5x5; pool -> 1x1) on the same
input and concatenates their outputs along channels. The 1x1 convolutions before the larger kernels
are bottlenecks: they shrink the channels the expensive convolutions see.

(One file of ~420 lines, on purpose: both versions share the concatenation, the side classifiers and
their training/transfer logic in ``AuxConvNet``, and the torchvision key maps sit with the modules
they name.)
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Any, ClassVar

import torch
from torch import nn

from cnnkit.layers import ConvNormAct
from cnnkit.models.base import ClassifierHead, ConvNet, FeatureInfo, NameMap
from cnnkit.registry import register_model

# Both networks use BatchNorm with TensorFlow's epsilon in front of every ReLU.
conv_bn = partial(ConvNormAct, norm=partial(nn.BatchNorm2d, eps=0.001))


class Concat(nn.Module):
    """Run each branch on the same input and concatenate the results along channels."""

    def __init__(self, *branches: nn.Module) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], 1)


class InceptionV1Module(Concat):
    """1x1 | 1x1 -> 3x3 | 1x1 -> 5x5 | 3x3 max-pool -> 1x1, concatenated.

    ``wide_kernel`` is 5 in the paper; torchvision's GoogLeNet (and its ImageNet weights) uses 3 there,
    so 3 is the default to stay weight-compatible (pytorch/vision#906).
    """

    def __init__(
        self,
        in_ch: int,
        ch1x1: int,
        ch3x3red: int,
        ch3x3: int,
        ch5x5red: int,
        ch5x5: int,
        pool_proj: int,
        wide_kernel: int = 3,
    ) -> None:
        super().__init__(
            conv_bn(in_ch, ch1x1, 1),
            nn.Sequential(conv_bn(in_ch, ch3x3red, 1), conv_bn(ch3x3red, ch3x3, 3)),
            nn.Sequential(conv_bn(in_ch, ch5x5red, 1), conv_bn(ch5x5red, ch5x5, wide_kernel)),
            nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), conv_bn(in_ch, pool_proj, 1)),
        )
        self.out_channels = ch1x1 + ch3x3 + ch5x5 + pool_proj


class GoogLeNetAux(nn.Module):
    """Side-branch classifier: 4x4 average pool, 1x1 conv to 128, FC 1024, dropout 0.7, FC classes."""

    def __init__(self, in_ch: int, num_classes: int, dropout: float = 0.7) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.conv = conv_bn(in_ch, 128, 1)
        self.fc1 = nn.Linear(128 * 16, 1024)
        self.act = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.conv(self.pool(x)), 1)
        return self.fc2(self.dropout(self.act(self.fc1(x))))


# (in, 1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj) of the paper's Table 1.
GOOGLENET_MODULES = {
    "inception3a": (192, 64, 96, 128, 16, 32, 32),
    "inception3b": (256, 128, 128, 192, 32, 96, 64),
    "inception4a": (480, 192, 96, 208, 16, 48, 64),
    "inception4b": (512, 160, 112, 224, 24, 64, 64),
    "inception4c": (512, 128, 128, 256, 24, 64, 64),
    "inception4d": (512, 112, 144, 288, 32, 64, 64),
    "inception4e": (528, 256, 160, 320, 32, 128, 128),
    "inception5a": (832, 256, 160, 320, 32, 128, 128),
    "inception5b": (832, 384, 192, 384, 48, 128, 128),
}


def _transform_input(x: torch.Tensor) -> torch.Tensor:
    """Map ImageNet-normalised RGB to the ``(x - 0.5) / 0.5`` scaling of the Google-ported weights."""
    mean = x.new_tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = x.new_tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x * std + mean - 0.5) / 0.5


class AuxConvNet(ConvNet):
    """A ConvNet with auxiliary side-branch classifiers fed from inside its stages."""

    aux: nn.ModuleDict
    transform_input: bool
    #: (stage index, child name) after which each aux head (same order as ``aux``) reads the features.
    aux_taps: tuple[tuple[int, str], ...]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.transform_input:
            x = _transform_input(x)
        return super().forward_features(x)

    def forward_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Main logits and the auxiliary logits (empty when the model has no aux heads)."""
        if len(self.aux) == 0:
            return self.forward(x), []
        self.check_input(x)
        if self.transform_input:
            x = _transform_input(x)
        taps = dict(zip(self.aux_taps, self.aux.values()))
        aux_logits = []
        x = self.stem(x)
        for i, stage in enumerate(self.stages):
            for name, layer in stage.named_children():
                x = layer(x)
                if (i, name) in taps:
                    aux_logits.append(taps[(i, name)](x))
        return self.forward_head(self.final(x)), aux_logits

    @property
    def classifier_modules(self) -> tuple[str, ...]:  # type: ignore[override]
        last = {name: ".fc2" if isinstance(m, GoogLeNetAux) else ".fc" for name, m in self.aux.items()}
        return ("head.fc", *(f"aux.{name}{suffix}" for name, suffix in last.items()))

    def reset_classifier(self, num_classes: int) -> None:
        """New main and auxiliary classifiers; ``num_classes=0`` removes the aux heads altogether."""
        super().reset_classifier(num_classes)
        if num_classes == 0:
            self.aux = nn.ModuleDict()
        for aux in self.aux.values():
            fc_name = "fc2" if isinstance(aux, GoogLeNetAux) else "fc"
            setattr(aux, fc_name, nn.Linear(getattr(aux, fc_name).in_features, num_classes))

    #: torchvision's names of the side classifiers -> ours
    reference_aux: ClassVar[dict[str, str]] = {}

    def reference_names(self) -> NameMap:
        """torchvision keeps every layer at the top level under the same name (ours add ``stages.S.``);
        an inception module's branches are renamed by :meth:`reference_branches`."""
        names = {"fc": "head.fc", **self.reference_aux}
        for s, stage in enumerate(self.stages):
            for top, _ in stage.named_children():
                names[top] = f"stages.{s}.{top}"
                for ref, own in self.reference_branches(top).items():
                    names[f"{top}.{ref}"] = f"stages.{s}.{top}.branches.{own}"
        return names

    def reference_branches(self, module: str) -> dict[str, str]:
        """torchvision's branch names inside inception module ``module`` -> ours (under ``branches``)."""
        return {}


class GoogLeNet(AuxConvNet):
    """GoogLeNet: conv stem, nine inception modules in three resolutions, aux heads after 4a and 4d."""

    min_input_size = 15

    def __init__(
        self,
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        aux_logits: bool = True,
        drop_rate: float = 0.2,
        aux_drop_rate: float = 0.7,
        wide_kernel: int = 3,
        transform_input: bool = False,
    ) -> None:
        super().__init__()
        self.transform_input = transform_input
        mods = {k: InceptionV1Module(*v, wide_kernel=wide_kernel) for k, v in GOOGLENET_MODULES.items()}

        def pool(k: int = 3) -> nn.MaxPool2d:
            return nn.MaxPool2d(k, 2, ceil_mode=True)

        self.stem = nn.Identity()
        self.stages = nn.Sequential(
            nn.Sequential(OrderedDict(conv1=conv_bn(in_chans, 64, 7, 2, 3))),
            nn.Sequential(OrderedDict(maxpool1=pool(), conv2=conv_bn(64, 64, 1), conv3=conv_bn(64, 192, 3))),
            nn.Sequential(
                OrderedDict(maxpool2=pool(), **{k: mods[k] for k in ("inception3a", "inception3b")})
            ),
            nn.Sequential(
                OrderedDict(maxpool3=pool(), **{k: mods[k] for k in mods if k.startswith("inception4")})
            ),
            nn.Sequential(
                OrderedDict(maxpool4=pool(2), **{k: mods[k] for k in ("inception5a", "inception5b")})
            ),
        )
        self.feature_info = [
            FeatureInfo(c, s, f"stages.{i}")
            for i, (c, s) in enumerate(zip((64, 192, 480, 832, 1024), (2, 4, 8, 16, 32)))
        ]
        self.aux_taps = ((3, "inception4a"), (3, "inception4d"))
        self.aux = nn.ModuleDict()
        if aux_logits:
            self.aux["aux1"] = GoogLeNetAux(512, num_classes, aux_drop_rate)
            self.aux["aux2"] = GoogLeNetAux(528, num_classes, aux_drop_rate)
        self.final = nn.Identity()
        self.head = ClassifierHead(1024, num_classes, dropout=drop_rate)
        _init_weights(self)

    reference_aux: ClassVar[dict[str, str]] = {"aux1": "aux.aux1", "aux2": "aux.aux2"}

    def reference_branches(self, module: str) -> dict[str, str]:
        return {f"branch{i + 1}": str(i) for i in range(4)} if module.startswith("inception") else {}


@register_model("googlenet")
def googlenet(**kwargs: Any) -> GoogLeNet:
    """GoogLeNet / Inception v1 (Szegedy et al. 2014) with its two auxiliary classifiers."""
    return GoogLeNet(**kwargs)


# torchvision's Inception v3 branch names -> ours, by module type (A: 35x35, B: to 17x17, C: 17x17
# factorised 7x7, D: to 8x8, E: 8x8 with split 1x3/3x1 heads).
V3_BRANCHES = {
    "A": {"branch1x1": "0", "branch5x5_1": "1.0", "branch5x5_2": "1.1", "branch3x3dbl_1": "2.0",
          "branch3x3dbl_2": "2.1", "branch3x3dbl_3": "2.2", "branch_pool": "3.1"},
    "B": {"branch3x3": "0", "branch3x3dbl_1": "1.0", "branch3x3dbl_2": "1.1", "branch3x3dbl_3": "1.2"},
    "C": {"branch1x1": "0", "branch7x7_1": "1.0", "branch7x7_2": "1.1", "branch7x7_3": "1.2",
          **{f"branch7x7dbl_{k}": f"2.{k - 1}" for k in range(1, 6)}, "branch_pool": "3.1"},
    "D": {"branch3x3_1": "0.0", "branch3x3_2": "0.1",
          **{f"branch7x7x3_{k}": f"1.{k - 1}" for k in range(1, 5)}},
    "E": {"branch1x1": "0", "branch3x3_1": "1.pre", "branch3x3_2a": "1.heads.0", "branch3x3_2b": "1.heads.1",
          "branch3x3dbl_1": "2.pre.0", "branch3x3dbl_2": "2.pre.1", "branch3x3dbl_3a": "2.heads.0",
          "branch3x3dbl_3b": "2.heads.1", "branch_pool": "3.1"},
}  # fmt: skip
V3_MODULE_TYPES = {
    **dict.fromkeys(("Mixed_5b", "Mixed_5c", "Mixed_5d"), "A"), "Mixed_6a": "B",
    **dict.fromkeys(("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"), "C"), "Mixed_7a": "D",
    **dict.fromkeys(("Mixed_7b", "Mixed_7c"), "E"),
}  # fmt: skip


# ------------------------------------------------------------------------------------------ Inception v3
class SplitBranch(nn.Module):
    """A branch whose last step splits into parallel convolutions (1x3 and 3x1) that are concatenated."""

    def __init__(self, pre: nn.Module, *heads: nn.Module) -> None:
        super().__init__()
        self.pre = pre
        self.heads = nn.ModuleList(heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        return torch.cat([h(x) for h in self.heads], 1)


def _avgpool_proj(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.AvgPool2d(3, 1, 1), conv_bn(in_ch, out_ch, 1))


def inception_a(in_ch: int, pool_features: int) -> Concat:
    """35x35 module: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg-pool -> 1x1."""
    return Concat(
        conv_bn(in_ch, 64, 1),
        nn.Sequential(conv_bn(in_ch, 48, 1), conv_bn(48, 64, 5)),
        nn.Sequential(conv_bn(in_ch, 64, 1), conv_bn(64, 96, 3), conv_bn(96, 96, 3)),
        _avgpool_proj(in_ch, pool_features),
    )


def inception_b(in_ch: int) -> Concat:
    """Grid reduction 35 -> 17: 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | max-pool/2."""
    return Concat(
        conv_bn(in_ch, 384, 3, 2, 0),
        nn.Sequential(conv_bn(in_ch, 64, 1), conv_bn(64, 96, 3), conv_bn(96, 96, 3, 2, 0)),
        nn.MaxPool2d(3, 2),
    )


def inception_c(in_ch: int, c7: int) -> Concat:
    """17x17 module with factorised 7x7 convolutions (1x7 then 7x1)."""
    return Concat(
        conv_bn(in_ch, 192, 1),
        nn.Sequential(conv_bn(in_ch, c7, 1), conv_bn(c7, c7, (1, 7)), conv_bn(c7, 192, (7, 1))),
        nn.Sequential(
            conv_bn(in_ch, c7, 1),
            conv_bn(c7, c7, (7, 1)),
            conv_bn(c7, c7, (1, 7)),
            conv_bn(c7, c7, (7, 1)),
            conv_bn(c7, 192, (1, 7)),
        ),
        _avgpool_proj(in_ch, 192),
    )


def inception_d(in_ch: int) -> Concat:
    """Grid reduction 17 -> 8: 1x1 -> 3x3/2 | 1x1 -> 1x7 -> 7x1 -> 3x3/2 | max-pool/2."""
    return Concat(
        nn.Sequential(conv_bn(in_ch, 192, 1), conv_bn(192, 320, 3, 2, 0)),
        nn.Sequential(
            conv_bn(in_ch, 192, 1),
            conv_bn(192, 192, (1, 7)),
            conv_bn(192, 192, (7, 1)),
            conv_bn(192, 192, 3, 2, 0),
        ),
        nn.MaxPool2d(3, 2),
    )


def inception_e(in_ch: int) -> Concat:
    """8x8 module with expanded filter banks: the 3x3 branches end in parallel 1x3 and 3x1 convs."""
    return Concat(
        conv_bn(in_ch, 320, 1),
        SplitBranch(conv_bn(in_ch, 384, 1), conv_bn(384, 384, (1, 3)), conv_bn(384, 384, (3, 1))),
        SplitBranch(
            nn.Sequential(conv_bn(in_ch, 448, 1), conv_bn(448, 384, 3)),
            conv_bn(384, 384, (1, 3)),
            conv_bn(384, 384, (3, 1)),
        ),
        _avgpool_proj(in_ch, 192),
    )


class InceptionV3Aux(nn.Module):
    """Side-branch classifier on the 17x17 grid: 5x5/3 avg-pool, 1x1 conv 128, 5x5 conv 768, FC."""

    def __init__(self, in_ch: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(5, 3)
        self.conv0 = conv_bn(in_ch, 128, 1)
        self.conv1 = conv_bn(128, 768, 5, padding=0)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gap(self.conv1(self.conv0(self.pool(x))))
        return self.fc(torch.flatten(x, 1))


class InceptionV3(AuxConvNet):
    """Inception v3 at 299x299: valid-conv stem, 3x A, B, 4x C, D, 2x E, optional aux head after C."""

    min_input_size = 75

    def __init__(
        self,
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        aux_logits: bool = False,
        drop_rate: float = 0.5,
        transform_input: bool = False,
    ) -> None:
        super().__init__()
        self.transform_input = transform_input
        self.default_imgsz = 299
        self.stem = nn.Identity()
        self.stages = nn.Sequential(
            nn.Sequential(
                OrderedDict(
                    Conv2d_1a_3x3=conv_bn(in_chans, 32, 3, 2, 0),
                    Conv2d_2a_3x3=conv_bn(32, 32, 3, padding=0),
                    Conv2d_2b_3x3=conv_bn(32, 64, 3),
                )
            ),
            nn.Sequential(
                OrderedDict(
                    maxpool1=nn.MaxPool2d(3, 2),
                    Conv2d_3b_1x1=conv_bn(64, 80, 1),
                    Conv2d_4a_3x3=conv_bn(80, 192, 3, padding=0),
                )
            ),
            nn.Sequential(
                OrderedDict(
                    maxpool2=nn.MaxPool2d(3, 2),
                    Mixed_5b=inception_a(192, 32),
                    Mixed_5c=inception_a(256, 64),
                    Mixed_5d=inception_a(288, 64),
                )
            ),
            nn.Sequential(
                OrderedDict(
                    Mixed_6a=inception_b(288),
                    Mixed_6b=inception_c(768, 128),
                    Mixed_6c=inception_c(768, 160),
                    Mixed_6d=inception_c(768, 160),
                    Mixed_6e=inception_c(768, 192),
                )
            ),
            nn.Sequential(
                OrderedDict(Mixed_7a=inception_d(768), Mixed_7b=inception_e(1280), Mixed_7c=inception_e(2048))
            ),
        )
        self.feature_info = [
            FeatureInfo(c, s, f"stages.{i}")
            for i, (c, s) in enumerate(zip((64, 192, 288, 768, 2048), (2, 4, 8, 16, 32)))
        ]
        self.aux_taps = ((3, "Mixed_6e"),)
        self.aux = nn.ModuleDict()
        if aux_logits:
            self.aux["aux"] = InceptionV3Aux(768, num_classes)
        self.final = nn.Identity()
        self.head = ClassifierHead(2048, num_classes, dropout=drop_rate)
        _init_weights(self)

    reference_aux: ClassVar[dict[str, str]] = {"AuxLogits": "aux.aux"}

    def reference_branches(self, module: str) -> dict[str, str]:
        return V3_BRANCHES[V3_MODULE_TYPES[module]] if module in V3_MODULE_TYPES else {}


@register_model("inception_v3")
def inception_v3(**kwargs: Any) -> InceptionV3:
    """Inception v3 (Szegedy et al. 2015) at 299x299; ``aux_logits=True`` adds the side classifier."""
    return InceptionV3(**kwargs)


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2, b=2)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
