"""A YOLO detector on any zoo backbone: backbone stages -> light PAN neck -> one grid head per scale.

Each scale ``l`` (stride ``s_l``) predicts, for every cell of its ``S_y x S_x`` grid and each of its
``A`` anchors, ``(t_x, t_y, t_w, t_h, t_o, class logits)``: the YOLOv2/v3 parameterisation decoded by
:func:`cnnkit.ops.yolo.decode` (centre ``(sigmoid(t) + cell) * s``, size ``anchor * exp(t)``,
objectness ``sigmoid(t_o)``). ``forward`` always returns the raw grids; decoding, thresholds and NMS are
in :mod:`cnnkit.tasks.detect`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.errors import CnnkitError
from cnnkit.layers import ConvNormAct
from cnnkit.models.base import FeatureInfo
from cnnkit.ops.yolo import decode_outputs
from cnnkit.registry import register_model

#: YOLOv3's COCO anchors (pixels at 416 x 416), three per scale, for strides 8, 16 and 32.
YOLOV3_ANCHORS: dict[int, tuple[tuple[float, float], ...]] = {
    8: ((10, 13), (16, 30), (33, 23)),
    16: ((30, 61), (62, 45), (59, 119)),
    32: ((116, 90), (156, 198), (373, 326)),
}
Neck = Literal["pan", "fpn", "none"]


def _default_anchors(strides: Sequence[int]) -> list[list[list[float]]]:
    anchors = []
    for s in strides:
        base = YOLOV3_ANCHORS.get(s)
        anchors.append([[float(w), float(h)] for w, h in base] if base else [[4.0 * s, 4.0 * s]] * 3)
    return anchors


class PAN(nn.Module):
    """Top-down FPN (nearest up-sampling, add, 3x3 conv) then, for ``"pan"``, a bottom-up path (3x3
    stride-2 conv, add, 3x3 conv), on ``channels``-wide lateral projections of every input scale."""

    def __init__(self, in_channels: Sequence[int], channels: int, mode: Neck = "pan") -> None:
        super().__init__()
        self.mode = mode
        act = nn.SiLU
        self.lateral = nn.ModuleList(ConvNormAct(c, channels, 1, act=act) for c in in_channels)
        n = len(in_channels)
        self.top_down = nn.ModuleList(ConvNormAct(channels, channels, 3, act=act) for _ in range(n - 1))
        self.down = nn.ModuleList(ConvNormAct(channels, channels, 3, 2, act=act) for _ in range(n - 1))
        self.bottom_up = nn.ModuleList(ConvNormAct(channels, channels, 3, act=act) for _ in range(n - 1))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        p = [lat(f) for lat, f in zip(self.lateral, feats)]
        if self.mode == "none":
            return p
        for i in range(len(p) - 2, -1, -1):
            p[i] = self.top_down[i](p[i] + F.interpolate(p[i + 1], size=p[i].shape[-2:], mode="nearest"))
        if self.mode == "pan":
            for i in range(1, len(p)):
                down = self.down[i - 1](p[i - 1])
                if down.shape[-2:] != p[i].shape[-2:]:
                    down = F.interpolate(down, size=p[i].shape[-2:], mode="nearest")
                p[i] = self.bottom_up[i - 1](p[i] + down)
        return p


class YOLO(nn.Module):
    """YOLO detector: ``x [B, 3, H, W] -> [out_l [B, S_y, S_x, A, 5 + C] for each scale]``.

    Args:
        backbone: a registered classifier (its stages feed the neck through ``feature_info``).
        num_classes: C.
        strides: the backbone strides whose stages are used, e.g. ``(8, 16, 32)``.
        anchors: per scale, ``A`` anchor ``(w, h)`` pairs in input pixels (YOLOv3's by default; the
            training workflow fits them to the data with k-means).
        neck: ``"pan"`` (FPN + bottom-up path), ``"fpn"`` or ``"none"`` (independent scales).
        neck_channels: width of the neck and heads (default: the shallowest used stage's, 32..256).
        backbone_args, backbone_weights: the backbone builder's arguments and its (classifier) weights.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        *,
        num_classes: int = 80,
        in_chans: int = 3,
        strides: Sequence[int] = (8, 16, 32),
        anchors: Sequence[Sequence[Sequence[float]]] | None = None,
        neck: Neck = "pan",
        neck_channels: int | None = None,
        backbone_args: dict[str, Any] | None = None,
        backbone_weights: str | None = None,
    ) -> None:
        super().__init__()
        from cnnkit.registry import create_model

        if neck not in ("pan", "fpn", "none"):
            raise CnnkitError(f"neck must be 'pan', 'fpn' or 'none', got {neck!r}")
        full = create_model(backbone, num_classes=0, in_chans=in_chans, **(backbone_args or {}))
        info: list[FeatureInfo] = full.feature_info  # type: ignore[assignment]
        indices = []
        for s in strides:
            found = [i for i, f in enumerate(info) if f.stride == s]
            if not found:
                available = sorted({f.stride for f in info})
                raise CnnkitError(f"{backbone} has no stage at stride {s}; its strides are {available}")
            indices.append(found[-1])
        self.backbone = create_model(
            backbone,
            in_chans=in_chans,
            weights=backbone_weights,
            features_only=True,
            out_indices=tuple(indices),
            **(backbone_args or {}),
        )
        chans = [info[i].channels for i in indices]
        width = neck_channels or min(256, max(32, chans[0]))
        self.neck = PAN(chans, width, neck)
        anchor_list = [list(map(list, a)) for a in (anchors or _default_anchors(strides))]
        if len(anchor_list) != len(strides) or len({len(a) for a in anchor_list}) != 1:
            raise CnnkitError(
                f"anchors must give the same number of (w, h) pairs for each of the {len(strides)} scales"
            )
        self.register_buffer("anchors", torch.tensor(anchor_list, dtype=torch.float32), persistent=False)
        self.strides = tuple(int(s) for s in strides)
        self.num_classes = num_classes
        self.num_anchors = len(anchor_list[0])
        out = self.num_anchors * (5 + num_classes)
        self.heads = nn.ModuleList(
            nn.Sequential(ConvNormAct(width, width, 3, act=nn.SiLU), nn.Conv2d(width, out, 1))
            for _ in strides
        )
        self._init_bias()

    def _init_bias(self, prior: float = 0.01) -> None:
        """Start objectness at ``prior`` (most cells hold no object) and classes at ``1 / C``."""
        for head in self.heads:
            conv = list(head.children())[-1]
            assert isinstance(conv, nn.Conv2d) and conv.bias is not None
            b = conv.bias.data.view(self.num_anchors, 5 + self.num_classes)
            b.zero_()
            b[:, 4] = torch.logit(torch.tensor(prior))
            b[:, 5:] = torch.logit(torch.tensor(1.0 / max(2, self.num_classes)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for head, p in zip(self.heads, self.neck(self.backbone(x))):
            y = head(p)  # [B, A * (5 + C), S_y, S_x]
            b, _, sy, sx = y.shape
            outs.append(y.view(b, self.num_anchors, 5 + self.num_classes, sy, sx).permute(0, 3, 4, 1, 2))
        return outs

    def decode(self, outputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The detector-family contract (export, serving): raw outputs -> ``boxes [B, N, 4]`` xyxy input
        pixels and ``scores [B, N, C]`` (objectness x class probability), before thresholds and NMS."""
        anchors: torch.Tensor = self.anchors  # type: ignore[assignment]
        return decode_outputs(outputs, anchors, self.strides)


@register_model("yolo")
def yolo(**kwargs: Any) -> YOLO:
    """YOLO detector (anchor grids per scale, PAN neck) on a zoo backbone (``backbone="resnet18"``)."""
    return YOLO(**kwargs)
