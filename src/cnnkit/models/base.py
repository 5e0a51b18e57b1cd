"""The surface every cnnkit backbone shares: stem -> stages -> final -> head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cnnkit.errors import CnnkitError

#: Module names of a reference implementation (torchvision's) -> this model's: a family's explicit key
#: map for loading foreign weights (the longest matching prefix of a tensor name is replaced).
NameMap = dict[str, str]


def rename_key(names: NameMap, key: str) -> str | None:
    """``key`` in this model's naming, by the longest prefix of it that ``names`` maps; None if none."""
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in names:
            return names[prefix] + key[len(prefix) :]
    return None


def conv_norm_names(names: NameMap, ref: str, own: str) -> None:
    """torchvision's ``Conv2dNormActivation`` (``ref.0`` conv, ``ref.1`` norm) -> a :class:`ConvNormAct`."""
    names[f"{ref}.0"] = f"{own}.conv"
    names[f"{ref}.1"] = f"{own}.bn"


@dataclass(frozen=True)
class FeatureInfo:
    """One stage's output: its channel count, its stride w.r.t. the input, and its module name."""

    channels: int
    stride: int
    module: str


class ClassifierHead(nn.Module):
    """Global average pool -> flatten -> dropout -> linear; ``num_classes=0`` keeps the pooled features.

    ``hidden`` adds fully connected layers before the last one (VGG's 4096-4096, MobileNetV3's 1280),
    each followed by ``act`` and dropout. ``pool_size`` > 1 flattens a small pooled grid (VGG's 7x7).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        dropout: float = 0.0,
        hidden: tuple[int, ...] = (),
        pool_size: int = 1,
        act: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        self.flatten = nn.Flatten(1)
        layers: list[nn.Module] = []
        width = in_features * pool_size * pool_size
        for h in hidden:
            layers += [nn.Linear(width, h), act()]
            layers.append(nn.Dropout(dropout))
            width = h
        self.mlp = nn.Sequential(*layers)
        self.num_features = width
        self.dropout = nn.Dropout(dropout) if not hidden else nn.Identity()
        self.fc: nn.Module = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()

    @property
    def num_classes(self) -> int:
        return self.fc.out_features if isinstance(self.fc, nn.Linear) else 0

    def reference_names(self, ref: str = "classifier") -> NameMap:
        """torchvision's ``classifier`` Sequential: the hidden layers where ours are, then the last
        linear layer (after a dropout when there are no hidden layers)."""
        if len(self.mlp) == 0:
            return {f"{ref}.1": "head.fc"}
        names = {f"{ref}.{i}": f"head.mlp.{i}" for i, m in enumerate(self.mlp) if isinstance(m, nn.Linear)}
        names[f"{ref}.{len(self.mlp)}"] = "head.fc"
        return names

    def reset(self, num_classes: int) -> None:
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.mlp(self.flatten(self.pool(x)))
        if pre_logits:
            return x
        return self.fc(self.dropout(x))


class ConvNet(nn.Module):
    """Base class of the zoo's classifiers.

    Subclasses set ``stem``, ``stages`` (a sequence of modules, each one resolution), ``final`` (applied
    after the last stage, e.g. EfficientNet's 1x1 conv to 1280 channels) and ``head``
    (a :class:`ClassifierHead`), and fill ``feature_info`` with one entry per stage.
    """

    stem: nn.Module
    stages: nn.Sequential
    final: nn.Module
    head: ClassifierHead
    feature_info: list[FeatureInfo]
    #: Names (prefixes) of modules whose weights depend on the number of classes.
    classifier_modules: tuple[str, ...] = ("head.fc",)
    #: The smallest input side the network takes (unpadded convolutions and pools shrink the maps).
    min_input_size: int = 1

    def check_input(self, x: torch.Tensor) -> None:
        """Refuse an input too small for the network, naming the size it takes (instead of a kernel-size
        error from deep inside)."""
        h, w = x.shape[-2:]
        if min(h, w) < self.min_input_size:
            name = getattr(self, "cnnkit_config", {}).get("name", type(self).__name__)
            raise CnnkitError(
                f"{name}: an input of {h}x{w} px is too small; it takes {self.min_input_size} px and more"
            )

    def forward_stages(self, x: torch.Tensor, indices: tuple[int, ...] | None = None) -> list[torch.Tensor]:
        """Feature maps at the output of each stage (or of the stages in ``indices``), shallow to deep."""
        self.check_input(x)
        wanted = set(range(len(self.stages))) if indices is None else set(indices)
        outs = []
        x = self.stem(x)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in wanted:
                outs.append(x)
            if i >= max(wanted):
                break
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map, before pooling: ``[B, C_in, H, W] -> [B, num_features, H/32, W/32]``."""
        self.check_input(x)
        return self.final(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool and classify a feature map: ``[B, C, h, w] -> [B, num_classes]`` (or pooled features)."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Main logits and the logits of auxiliary side classifiers (none for most models).

        Training code calls this to add the side-branch losses; ``forward`` always returns the main
        logits only.
        """
        return self.forward(x), []

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def num_features(self) -> int:
        return self.head.num_features

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the last linear layer by a freshly initialised one with ``num_classes`` outputs."""
        self.head.reset(num_classes)

    def reference_names(self) -> NameMap:
        """The family's explicit key map from torchvision's module names (timm's ResNets name alike);
        empty when the family has none, and loaders fall back to pairing tensors by position."""
        return {}

    def get_classifier(self) -> nn.Module:
        return self.head.fc


class FeatureExtractor(nn.Module):
    """A backbone without its head that returns the feature maps of the chosen stages.

    The Keras ``include_top=False`` habit, generalised to several scales (for U-Net encoders and
    detection necks): ``forward(x) -> [stage_i(x) for i in out_indices]``.
    """

    def __init__(self, model: ConvNet, out_indices: tuple[int, ...] | None = None) -> None:
        super().__init__()
        n = len(model.feature_info)
        self.out_indices = tuple(range(n)) if out_indices is None else tuple(i % n for i in out_indices)
        self.feature_info = [model.feature_info[i] for i in self.out_indices]
        features_of = getattr(model, "features_of", None)
        if features_of is not None:  # a wrapped backbone (timm's) returns its levels itself
            self.levels: nn.Module | None = features_of(self.out_indices)
            return
        self.levels = None
        self.stem = model.stem
        self.stages = nn.Sequential(*list(model.stages)[: max(self.out_indices) + 1])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.levels is not None:
            return self.levels(x)  # type: ignore[no-any-return]
        outs = []
        x = self.stem(x)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                outs.append(x)
        return outs
