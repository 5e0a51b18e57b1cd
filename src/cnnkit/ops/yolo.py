"""YOLO grid encoding (YOLOv2 parameterisation) and anchor clustering.

For cell ``(cx, cy)`` of an ``S x S`` grid and anchor ``(pw, ph)`` in cell units, a prediction
``(tx, ty, tw, th, to)`` decodes to ``bx = (sigmoid(tx) + cx) / S``, ``by = (sigmoid(ty) + cy) / S``,
``bw = pw * exp(tw) / S``, ``bh = ph * exp(th) / S`` (fractions of the image) and objectness
``sigmoid(to)``. An object is assigned to the cell holding its centre and to the anchor whose shape
overlaps its own best (IoU of the two boxes put on the same centre).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def shape_iou(wh1: torch.Tensor, wh2: torch.Tensor) -> torch.Tensor:
    """IoU of boxes that share a centre, from sizes only: ``[N, 2], [M, 2] -> [N, M]``."""
    inter = torch.minimum(wh1[:, None, 0], wh2[None, :, 0]) * torch.minimum(wh1[:, None, 1], wh2[None, :, 1])
    union = wh1[:, None].prod(-1) + wh2[None].prod(-1) - inter
    return inter / union.clamp(min=torch.finfo(wh1.dtype).tiny)


def decode(raw: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """``raw [B, S, S, A, 5 + C]`` (tx, ty, tw, th, to, class logits) -> ``[B, S, S, A, 5]`` decoded
    ``(bx, by, bw, bh, objectness)``, box centre and size as fractions of the image.

    ``anchors [A, 2]`` are ``(pw, ph)`` in cell units; the grid is ``raw.shape[1]`` (rows, y) by
    ``raw.shape[2]`` (columns, x).
    """
    s_y, s_x = raw.shape[1], raw.shape[2]
    gy, gx = torch.meshgrid(
        torch.arange(s_y, device=raw.device), torch.arange(s_x, device=raw.device), indexing="ij"
    )
    bx = (raw[..., 0].sigmoid() + gx[None, :, :, None]) / s_x
    by = (raw[..., 1].sigmoid() + gy[None, :, :, None]) / s_y
    bw = anchors[:, 0].to(raw) * raw[..., 2].exp() / s_x
    bh = anchors[:, 1].to(raw) * raw[..., 3].exp() / s_y
    return torch.stack([bx, by, bw, bh, raw[..., 4].sigmoid()], -1)


@dataclass(frozen=True)
class Encoded:
    target: torch.Tensor  # [S, S, A, 5]: tx, ty, tw, th (raw, as the network should output), object=1
    labels: torch.Tensor  # [S, S, A] class index, -1 where no object
    collisions: int  # objects that landed on an already taken (cell, anchor) and were dropped


def _logit(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    p = p.clamp(eps, 1 - eps)
    return torch.log(p / (1 - p))


def encode(
    boxes: torch.Tensor, labels: torch.Tensor, anchors: torch.Tensor, grid: int | tuple[int, int]
) -> Encoded:
    """Targets for one image: ``boxes [N, 4]`` normalised ``cxcywh``, ``labels [N]``, ``anchors [A, 2]``.

    Each object goes to the cell containing its centre and its best-overlapping anchor; the raw
    targets invert :func:`decode` (``decode`` of the target reproduces the boxes).
    """
    s_y, s_x = (grid, grid) if isinstance(grid, int) else grid
    a = anchors.shape[0]
    target = torch.zeros(s_y, s_x, a, 5, dtype=boxes.dtype)
    cls = torch.full((s_y, s_x, a), -1, dtype=torch.long)
    collisions = 0
    if boxes.numel() == 0:
        return Encoded(target, cls, 0)
    wh_cells = boxes[:, 2:] * torch.tensor([s_x, s_y], dtype=boxes.dtype)
    best = shape_iou(wh_cells, anchors.to(boxes)).argmax(1)
    for (cx, cy, _, _), label, k, wh in zip(boxes.tolist(), labels.tolist(), best.tolist(), wh_cells):
        gx, gy = min(int(cx * s_x), s_x - 1), min(int(cy * s_y), s_y - 1)
        if target[gy, gx, k, 4] > 0:
            collisions += 1
            continue
        target[gy, gx, k, 0] = _logit(torch.tensor(cx * s_x - gx))
        target[gy, gx, k, 1] = _logit(torch.tensor(cy * s_y - gy))
        target[gy, gx, k, 2:4] = torch.log(wh / anchors[k].to(boxes))
        target[gy, gx, k, 4] = 1.0
        cls[gy, gx, k] = int(label)
    return Encoded(target, cls, collisions)


@dataclass(frozen=True)
class AnchorFit:
    anchors: torch.Tensor  # [k, 2] (w, h), sorted by area, in the units of the input sizes
    mean_iou: float  # mean over boxes of the best shape IoU with an anchor


def kmeans_anchors(wh: torch.Tensor, k: int = 5, *, iters: int = 300, seed: int = 0) -> AnchorFit:
    """Cluster box sizes ``wh [N, 2]`` into ``k`` anchors with distance ``1 - IoU`` (YOLOv2's dimension
    clusters), k-means++ seeded. Each centre is the median size of its cluster (robust to outliers)."""
    wh = wh.double()
    if len(wh) < k:
        raise ValueError(f"need at least k={k} boxes to cluster, got {len(wh)}")
    g = torch.Generator().manual_seed(seed)
    centres = wh[torch.randint(len(wh), (1,), generator=g)]
    while len(centres) < k:  # k-means++: next centre far (in 1 - IoU) from the chosen ones
        dist = (1 - shape_iou(wh, centres)).min(1).values ** 2
        centres = torch.cat([centres, wh[torch.multinomial(dist + 1e-12, 1, generator=g)]])
    assign = torch.full((len(wh),), -1, dtype=torch.long)
    for _ in range(iters):
        new = shape_iou(wh, centres).argmax(1)
        if torch.equal(new, assign):
            break
        assign = new
        for j in range(k):
            members = wh[assign == j]
            if len(members):
                centres[j] = members.median(0).values
    order = centres.prod(1).argsort()
    centres = centres[order]
    mean_iou = float(shape_iou(wh, centres).max(1).values.mean())
    return AnchorFit(centres.float(), mean_iou)


def decode_pixels(
    raw: torch.Tensor, anchors: torch.Tensor, stride: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One scale of a YOLO head in input pixels: ``raw [B, S_y, S_x, A, 5 + C]``, ``anchors [A, 2]``
    (pixels) -> ``(boxes [B, S_y*S_x*A, 4] xyxy, objectness logits [B, N], class logits [B, N, C])``.

    Same parameterisation as :func:`decode`: centre ``(sigmoid(t_xy) + cell) * stride``, size
    ``anchor * exp(t_wh)``.
    """
    b, s_y, s_x, a, _ = raw.shape
    gy, gx = torch.meshgrid(
        torch.arange(s_y, device=raw.device, dtype=raw.dtype),
        torch.arange(s_x, device=raw.device, dtype=raw.dtype),
        indexing="ij",
    )
    grid = torch.stack([gx, gy], -1)[None, :, :, None]  # [1, S_y, S_x, 1, 2]
    centre = (raw[..., :2].sigmoid() + grid) * stride
    half = anchors.to(raw).view(1, 1, 1, a, 2) * raw[..., 2:4].exp() / 2
    boxes = torch.cat([centre - half, centre + half], -1).reshape(b, -1, 4)
    return boxes, raw[..., 4].reshape(b, -1), raw[..., 5:].reshape(b, s_y * s_x * a, -1)


def decode_outputs(
    outputs: Sequence[torch.Tensor], anchors: torch.Tensor, strides: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw YOLO grids (``[B, S_y, S_x, A, 5 + C]`` per scale, ``anchors [L, A, 2]`` pixels) -> every
    prediction of every scale: ``boxes [B, N, 4]`` xyxy input pixels and ``scores [B, N, C]``
    (objectness x class probability)."""
    boxes, scores = [], []
    for out, a, s in zip(outputs, anchors, strides):
        bx, obj, cls = decode_pixels(out, a, s)
        boxes.append(bx)
        scores.append(obj.sigmoid().unsqueeze(-1) * cls.sigmoid())
    return torch.cat(boxes, 1), torch.cat(scores, 1)
