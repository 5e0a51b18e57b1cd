"""Box formats, areas and the IoU family. Boxes are float tensors ``[..., 4]``.

Formats (:class:`BoxFormat`): ``XYXY`` corners ``(x1, y1, x2, y2)``; ``XYWH`` top-left corner and
size; ``CXCYWH`` centre and size. Pixel or normalised coordinates alike: the maths is the same.
"""

from __future__ import annotations

import math
from enum import Enum

import torch


class BoxFormat(str, Enum):
    XYXY = "xyxy"
    XYWH = "xywh"
    CXCYWH = "cxcywh"


def convert(boxes: torch.Tensor, src: BoxFormat | str, dst: BoxFormat | str) -> torch.Tensor:
    """Convert ``boxes: [..., 4]`` from format ``src`` to ``dst``."""
    src, dst = BoxFormat(src), BoxFormat(dst)
    if src == dst:
        return boxes.clone()
    a, b, c, d = boxes.unbind(-1)
    if src == BoxFormat.XYWH:
        x1, y1, x2, y2 = a, b, a + c, b + d
    elif src == BoxFormat.CXCYWH:
        x1, y1, x2, y2 = a - c / 2, b - d / 2, a + c / 2, b + d / 2
    else:
        x1, y1, x2, y2 = a, b, c, d
    if dst == BoxFormat.XYXY:
        return torch.stack([x1, y1, x2, y2], -1)
    if dst == BoxFormat.XYWH:
        return torch.stack([x1, y1, x2 - x1, y2 - y1], -1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], -1)


def clip(boxes: torch.Tensor, height: float, width: float) -> torch.Tensor:
    """Clip ``xyxy`` boxes ``[..., 4]`` to the image ``[0, width] x [0, height]``."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([x1.clamp(0, width), y1.clamp(0, height), x2.clamp(0, width), y2.clamp(0, height)], -1)


def area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of ``xyxy`` boxes: ``[..., 4] -> [...]`` (0 for degenerate boxes)."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _inter_union(b1: torch.Tensor, b2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lt = torch.maximum(b1[..., :2], b2[..., :2])
    rb = torch.minimum(b1[..., 2:], b2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter, area(b1) + area(b2) - inter


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU: ``boxes1: [N, 4] xyxy, boxes2: [M, 4] xyxy -> [N, M]``.

    Boxes that only touch (at an edge or a corner) have IoU 0; two empty boxes have IoU 0.
    """
    inter, union = _inter_union(boxes1[:, None, :], boxes2[None, :, :])
    return inter / union.clamp(min=torch.finfo(inter.dtype).tiny)


def elementwise_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of matching rows: ``[..., 4], [..., 4] -> [...]`` (xyxy)."""
    inter, union = _inter_union(boxes1, boxes2)
    return inter / union.clamp(min=torch.finfo(inter.dtype).tiny)


def _enclosing(b1: torch.Tensor, b2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lt = torch.minimum(b1[..., :2], b2[..., :2])
    rb = torch.maximum(b1[..., 2:], b2[..., 2:])
    return lt, rb


def generalized_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Elementwise GIoU (Rezatofighi et al. 2019): ``IoU - (C - U) / C`` with C the enclosing box's area."""
    inter, union = _inter_union(boxes1, boxes2)
    iou = inter / (union + eps)
    lt, rb = _enclosing(boxes1, boxes2)
    enclosing = (rb - lt).clamp(min=0).prod(-1)
    return iou - (enclosing - union) / (enclosing + eps)


def distance_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Elementwise DIoU (Zheng et al. 2020): ``IoU - d^2 / c^2`` (centre distance, enclosing diagonal)."""
    return _diou_ciou(boxes1, boxes2, eps, complete=False)


def complete_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Elementwise CIoU: DIoU minus ``alpha * v``, ``v`` measuring aspect-ratio disagreement."""
    return _diou_ciou(boxes1, boxes2, eps, complete=True)


def _diou_ciou(b1: torch.Tensor, b2: torch.Tensor, eps: float, complete: bool) -> torch.Tensor:
    inter, union = _inter_union(b1, b2)
    iou = inter / (union + eps)
    lt, rb = _enclosing(b1, b2)
    diag = ((rb - lt) ** 2).sum(-1) + eps
    c1 = (b1[..., :2] + b1[..., 2:]) / 2
    c2 = (b2[..., :2] + b2[..., 2:]) / 2
    diou = iou - ((c1 - c2) ** 2).sum(-1) / diag
    if not complete:
        return diou
    w1, h1 = b1[..., 2] - b1[..., 0], b1[..., 3] - b1[..., 1]
    w2, h2 = b2[..., 2] - b2[..., 0], b2[..., 3] - b2[..., 1]
    v = (4 / math.pi**2) * (torch.atan(w1 / (h1 + eps)) - torch.atan(w2 / (h2 + eps))) ** 2
    with torch.no_grad():
        alpha = v / (1 - iou + v + eps)
    return diou - alpha * v
