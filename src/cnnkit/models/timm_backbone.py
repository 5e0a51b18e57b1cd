"""Any timm model as a cnnkit backbone: ``"timm/convnext_tiny"`` for classification, detection
(``--backbone timm/...``), segmentation (``unet_timm/...``) and localization (``pip install 'cnnkit[timm]'``).

timm builds the network with ``features_only=True`` (its ``feature_info`` gives each level's channels
and stride); cnnkit adds its own classifier head, so the wrapped model is a :class:`ConvNet` like the zoo's
families. The zoo's own families stay the documented, verified implementations; a timm backbone is the
escape hatch to the rest of timm's models, with timm's pretrained weights where the user has them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cnnkit.errors import CnnkitError
from cnnkit.models.base import ClassifierHead, ConvNet, FeatureInfo

PREFIX = "timm/"


class TimmBackbone(ConvNet):
    """timm's ``name`` (features only) + a cnnkit classifier head on its deepest level.

    ``pretrained``: timm's weights for it (downloaded by timm into its cache, or read from ``checkpoint``,
    a local file, through timm's ``pretrained_cfg_overlay``).
    """

    def __init__(
        self,
        name: str,
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        pretrained: bool = False,
        checkpoint: str | None = None,
        **timm_args: Any,
    ) -> None:
        super().__init__()
        try:
            import timm
        except ImportError:
            raise CnnkitError(f"{PREFIX}{name} needs timm: pip install 'cnnkit[timm]'") from None
        overlay: dict[str, Any] = {"pretrained_cfg_overlay": {"file": checkpoint}} if checkpoint else {}
        try:
            self.body = timm.create_model(
                name, features_only=True, pretrained=pretrained or bool(checkpoint), in_chans=in_chans,
                **overlay, **timm_args,
            )  # fmt: skip
        except (RuntimeError, OSError, ValueError) as exc:  # unknown name, no features, no download
            hint = (
                "; timm fetches its weights from the Hugging Face hub into its cache: offline, give a "
                "local file (weights=PATH)"
                if pretrained and not checkpoint
                else ""
            )
            raise CnnkitError(f"{PREFIX}{name}: {str(exc).splitlines()[0]}{hint}") from None
        info: Any = self.body.feature_info
        self.feature_info = [
            FeatureInfo(int(c), int(r), f"body.{i}")
            for i, (c, r) in enumerate(zip(info.channels(), info.reduction()))
        ]
        self.stem, self.final = nn.Identity(), nn.Identity()
        self.head = ClassifierHead(self.feature_info[-1].channels, num_classes, dropout=drop_rate)

    def forward_stages(self, x: torch.Tensor, indices: tuple[int, ...] | None = None) -> list[torch.Tensor]:
        self.check_input(x)
        feats = self.body(x)
        return list(feats) if indices is None else [feats[i] for i in indices]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(x)[-1]

    def features_of(self, indices: tuple[int, ...]) -> nn.Module:
        """The body returning the feature maps at ``indices`` (for :class:`FeatureExtractor`)."""
        return _Levels(self.body, indices)


class _Levels(nn.Module):
    def __init__(self, body: nn.Module, indices: tuple[int, ...]) -> None:
        super().__init__()
        self.body, self.indices = body, indices

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.body(x)
        return [feats[i] for i in self.indices]


def timm_builder(name: str) -> Any:
    """The builder of ``timm/NAME`` (a classifier/backbone) or ``unet_timm/NAME`` (a U-Net on it)."""
    if name.startswith("unet_" + PREFIX):
        from cnnkit.models.unet import EncoderUNet

        encoder = name.removeprefix("unet_")
        return lambda **kwargs: EncoderUNet(encoder, **kwargs)
    return lambda **kwargs: TimmBackbone(name.removeprefix(PREFIX), **kwargs)
