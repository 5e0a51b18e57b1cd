"""Non-maximum suppression: greedy, class-aware (batched) and soft-NMS.

Greedy NMS keeps the highest-scoring box, drops every remaining box that overlaps it by more than
``iou_threshold``, and repeats; it dispatches to torchvision's kernel. Soft-NMS (Bodla et al. 2017)
decays the scores of overlapping boxes instead of dropping them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torchvision.ops import boxes as tv_boxes

from cnnkit.ops.boxes import BoxFormat, box_iou, convert


def nms(
    boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float = 0.5, max_det: int | None = None
) -> torch.Tensor:
    """Indices of the kept boxes, by decreasing score: ``boxes: [N, 4] xyxy, scores: [N] -> [K]``."""
    keep = tv_boxes.nms(boxes.float(), scores.float(), iou_threshold)
    return keep[:max_det] if max_det is not None else keep


def batched_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    classes: torch.Tensor,
    iou_threshold: float = 0.5,
    *,
    agnostic: bool = False,
    max_det: int | None = None,
) -> torch.Tensor:
    """Class-aware NMS (boxes of different classes never suppress each other) unless ``agnostic``.

    ``boxes: [N, 4] xyxy, scores: [N], classes: [N] -> kept indices [K]`` by decreasing score.
    Implemented, like torchvision's, by offsetting each class's boxes so classes cannot overlap.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    if agnostic:
        return nms(boxes, scores, iou_threshold, max_det)
    if boxes.shape[0] > _PER_CLASS_ABOVE and boxes.device.type == "cpu":
        return _nms_per_class(boxes, scores, classes, iou_threshold, max_det)
    lo, hi = torch.aminmax(boxes)
    offset = classes.to(boxes.dtype)[:, None] * (hi - lo + 1)
    return nms(boxes + offset, scores, iou_threshold, max_det)


# Past this many boxes on CPU, one NMS per class beats one quadratic NMS over offset boxes.
_PER_CLASS_ABOVE = 2000


def _nms_per_class(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    classes: torch.Tensor,
    iou_threshold: float,
    max_det: int | None,
) -> torch.Tensor:
    """Group the boxes by class with one sort, run NMS on each contiguous group, merge by score."""
    order = torch.argsort(classes, stable=True)
    counts = torch.bincount(classes[order]).tolist()
    kept = []
    start = 0
    for n in counts:
        if n:
            idx = order[start : start + n]
            kept.append(idx[tv_boxes.nms(boxes[idx].float(), scores[idx].float(), iou_threshold)])
        start += n
    keep = torch.cat(kept)
    keep = keep[scores[keep].float().sort(descending=True, stable=True).indices]
    return keep[:max_det] if max_det is not None else keep


@dataclass(frozen=True)
class Detections:
    """One image's detections: ``boxes [K, 4]`` xyxy, ``scores [K]``, ``labels [K]``, best first."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.scores.shape[0]


@dataclass(frozen=True)
class Candidates:
    """Decoded boxes pooled from several views (models of an ensemble, flipped or rescaled inputs):
    ``boxes [B, N, 4]`` xyxy input pixels, ``scores [B, N, C]``, and ``view [N]``, which of the ``views``
    each box came from. :func:`multiclass_nms` fuses them (weighted box fusion)."""

    boxes: torch.Tensor
    scores: torch.Tensor
    view: torch.Tensor
    views: int


def multiclass_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    *,
    conf: float = 0.25,
    iou: float = 0.45,
    max_det: int = 300,
    multi_label: bool = False,
    agnostic: bool = False,
    max_candidates: int = 30000,
    box_format: BoxFormat = BoxFormat.XYXY,
    view: torch.Tensor | None = None,
    views: int = 1,
) -> list[Detections]:
    """Threshold and NMS for a batch of dense predictions: ``boxes [B, N, 4]`` xyxy, ``scores [B, N, C]``
    (already ``objectness x class probability``; any strides, e.g. a transposed ``[B, C, N]`` view).

    A box becomes one candidate per class above ``conf`` with ``multi_label`` (what mAP evaluation
    wants), else one candidate for its best class. At most ``max_candidates`` candidates (best first)
    enter class-aware NMS (``agnostic``: classes suppress each other); ``max_det`` are kept per image.
    Boxes are only gathered (and converted from ``box_format`` to ``xyxy``) after thresholding, so
    the cost follows the candidates, not ``N``. An anchor-free head's ``[B, 4 + C, N]`` output
    (ultralytics' layout) goes in as ``boxes=pred[:, :4].transpose(1, 2)``,
    ``scores=pred[:, 4:].transpose(1, 2)``, ``box_format=BoxFormat.CXCYWH``: no copy of the dense tensor.

    Boxes pooled from several ``views`` (``view [N]``: each box's view; see :class:`Candidates`) are
    fused, as weighted box fusion does (Solovyev et al. 2019): each box NMS keeps becomes the
    score-weighted mean of the candidates of its class overlapping it by more than ``iou``, scored by the
    mean over views of each view's best score among them (a view that missed the object counts 0).
    """
    out = []
    for b in range(boxes.shape[0]):
        s = scores[b]
        # Rows with any class above conf first: amax is ~10x cheaper than max-with-indices over N x C.
        rows = (s.amax(1) > conf).nonzero(as_tuple=True)[0]
        cand = s[rows]  # [K, C], contiguous
        if multi_label:
            r, j = (cand > conf).nonzero(as_tuple=True)
            i, sc = rows[r], cand[r, j]
        else:
            sc, j = cand.max(1)
            i = rows
        if sc.numel() > max_candidates:
            top = sc.topk(max_candidates).indices
            i, j, sc = i[top], j[top], sc[top]
        bx = boxes[b, i]
        if box_format is BoxFormat.CXCYWH:
            half = bx[:, 2:] / 2
            bx = torch.cat([bx[:, :2] - half, bx[:, :2] + half], 1)
        elif box_format is not BoxFormat.XYXY:
            bx = convert(bx, box_format, BoxFormat.XYXY)
        keep = batched_nms(bx, sc, j, iou, agnostic=agnostic, max_det=max_det)
        if view is not None and views > 1 and len(keep):
            fused, fused_scores = _fuse(bx, sc, j, view[i], keep, iou, views, agnostic)
            order = fused_scores.argsort(descending=True)
            out.append(Detections(fused[order], fused_scores[order], j[keep][order]))
        else:
            out.append(Detections(bx[keep], sc[keep], j[keep]))
    return out


def _fuse(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    classes: torch.Tensor,
    view: torch.Tensor,
    keep: torch.Tensor,
    iou: float,
    views: int,
    agnostic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept boxes fused with the candidates that overlap them (see :func:`multiclass_nms`)."""
    overlaps = box_iou(boxes[keep].float(), boxes.float()) > iou  # [K, M]
    if not agnostic:
        overlaps &= classes[keep][:, None] == classes[None, :]
    # each candidate joins one cluster: the first kept box (best first) it overlaps, the one that
    # suppressed it; joining every overlapping cluster would lend an object's score to its neighbours
    found = overlaps.any(0)
    member = torch.zeros_like(overlaps)
    member[overlaps.int().argmax(0)[found], found.nonzero(as_tuple=True)[0]] = True
    weights = member * scores.float()[None, :]
    fused = (weights @ boxes.float()) / weights.sum(1, keepdim=True)
    best = weights.new_zeros(len(keep), views)
    best.scatter_reduce_(1, view.expand(len(keep), -1), weights, reduce="amax")
    return fused.to(boxes.dtype), best.sum(1) / views


def soft_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    *,
    method: Literal["linear", "gaussian"] = "gaussian",
    sigma: float = 0.5,
    iou_threshold: float = 0.3,
    score_threshold: float = 0.001,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-NMS: ``(kept indices [K], their decayed scores [K])`` in the order they were selected.

    Linear: ``s *= 1 - IoU`` where IoU > ``iou_threshold``; Gaussian: ``s *= exp(-IoU^2 / sigma)``.
    Boxes whose score falls below ``score_threshold`` are dropped.
    """
    scores = scores.clone().float()
    iou = box_iou(boxes.float(), boxes.float())
    alive = torch.ones_like(scores, dtype=torch.bool)
    kept, kept_scores = [], []
    while bool(alive.any()):
        masked = torch.where(alive, scores, torch.tensor(-1.0, device=scores.device))
        i = int(masked.argmax())
        if scores[i] < score_threshold:
            break
        kept.append(i)
        kept_scores.append(float(scores[i]))
        alive[i] = False
        overlap = iou[i]
        if method == "linear":
            decay = torch.where(overlap > iou_threshold, 1 - overlap, torch.ones_like(overlap))
        else:
            decay = torch.exp(-(overlap**2) / sigma)
        scores = torch.where(alive, scores * decay, scores)
        alive &= scores >= score_threshold
    return torch.tensor(kept, dtype=torch.long), torch.tensor(kept_scores)
