"""Task heads on zoo backbones: object localization, landmark regression, and a small valid-padding
classifier for convolutional sliding windows."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cnnkit.errors import CnnkitError
from cnnkit.models.base import ConvNet
from cnnkit.registry import register_model


def _backbone(name: str, args: dict[str, Any] | None, weights: str | None, in_chans: int) -> ConvNet:
    from cnnkit.registry import create_model

    model = create_model(name, num_classes=0, in_chans=in_chans, weights=weights, **(args or {}))
    if not isinstance(model, ConvNet):
        raise CnnkitError(f"{name} is not a classifier backbone (see cnnkit.list_models())")
    return model


class Localizer(nn.Module):
    """One main object per image: ``x -> [p_c, b_x, b_y, b_h, b_w, c_1 .. c_n]`` (the notes' vector).

    ``p_c`` and the class scores are logits; the box is the object's centre, height and width as
    fractions of the image (a sigmoid keeps them in [0, 1]).
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        *,
        num_classes: int = 1,
        in_chans: int = 3,
        backbone_args: dict[str, Any] | None = None,
        backbone_weights: str | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.backbone = _backbone(backbone, backbone_args, backbone_weights, in_chans)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.backbone.num_features, 5 + num_classes)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.dropout(self.backbone(x)))
        return torch.cat([out[:, :1], out[:, 1:5].sigmoid(), out[:, 5:]], 1)


class Landmarker(nn.Module):
    """``x -> [B, K, 2]``: K points (x, y) as fractions of the image width and height."""

    def __init__(
        self,
        backbone: str = "resnet18",
        *,
        num_points: int = 4,
        in_chans: int = 3,
        backbone_args: dict[str, Any] | None = None,
        backbone_weights: str | None = None,
        num_classes: int = 0,  # unused: accepted so every builder takes num_classes
    ) -> None:
        super().__init__()
        del num_classes
        self.backbone = _backbone(backbone, backbone_args, backbone_weights, in_chans)
        self.head = nn.Linear(self.backbone.num_features, 2 * num_points)
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, 0.5)  # start every point at the image centre
        self.num_points = num_points

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)).view(x.shape[0], self.num_points, 2)


@register_model("localizer")
def localizer(**kwargs: Any) -> Localizer:
    """Object localization head ``[p_c, box, classes]`` on a zoo backbone (``backbone="resnet18"``)."""
    return Localizer(**kwargs)


@register_model("landmarker")
def landmarker(**kwargs: Any) -> Landmarker:
    """Landmark regression head (``num_points`` (x, y) pairs) on a zoo backbone."""
    return Landmarker(**kwargs)


class TinyConvNet(nn.Sequential):
    """The notes' sliding-window classifier: 14x14x3 -> 5x5 conv 16 -> 2x2 max-pool -> FC 400 -> FC 400 ->
    FC classes. Valid padding throughout, so its fully convolutional form scores every window of a
    larger image exactly as the classifier scores that crop."""

    def __init__(
        self, *, num_classes: int = 4, in_chans: int = 3, width: int = 16, hidden: int = 400
    ) -> None:
        super().__init__(
            nn.Conv2d(in_chans, width, 5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(1),
            nn.Linear(width * 5 * 5, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )
        self.num_classes = num_classes
        self.default_imgsz = 14


@register_model("tinyconvnet")
def tinyconvnet(**kwargs: Any) -> TinyConvNet:
    """The 14x14 sliding-window classifier of the notes (valid convolutions, FC head)."""
    return TinyConvNet(**kwargs)
