"""Non-maximum suppression: greedy, class-aware (batched) and soft-NMS.

Greedy NMS keeps the highest-scoring box, drops every remaining box that overlaps it by more than
``iou_threshold``, and repeats; it dispatches to torchvision's kernel. Soft-NMS (Bodla et al. 2017)
decays the scores of overlapping boxes instead of dropping them.
"""

from __future__ import annotations

from typing import Literal

import torch
from torchvision.ops import boxes as tv_boxes

from cnnkit.ops.boxes import box_iou


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
    offset = classes.to(boxes.dtype)[:, None] * (boxes.max() - boxes.min() + 1)
    return nms(boxes + offset, scores, iou_threshold, max_det)


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
