"""Object localization (``[p_c, b_x, b_y, b_h, b_w, c_1..c_n]``) and landmark detection: losses and metrics.

Localization loss, per image: ``BCE(p_c, object)`` always; when an object is present also
``box_weight * L1(box)`` (centre and size as fractions of the image) and ``CE(classes)``. Without an
object only the objectness term counts: the box and class outputs are "don't care", as in the notes.

Landmark losses act on visible points only, in pixels of the network input (coordinates x ``imgsz``):
``l1``, ``smooth_l1`` (Huber, beta 1 px) or ``wing`` (Feng et al. 2018, w = 10 px, epsilon = 2 px,
which amplifies small and medium errors).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from cnnkit.ops.boxes import BoxFormat, convert, elementwise_iou
from cnnkit.tasks.base import ImageTask, Logs, mean_logits, mean_sigmoid_logits, to_uint8
from cnnkit.viz import Shown

LandmarkLoss = Literal["l1", "smooth_l1", "wing"]


def loc_boxes_xyxy(out: torch.Tensor) -> torch.Tensor:
    """``[B, 5 + C]`` localizer output -> ``[B, 4]`` normalised xyxy boxes (output order: bx, by, bh, bw)."""
    bx, by, bh, bw = out[:, 1], out[:, 2], out[:, 3], out[:, 4]
    return convert(torch.stack([bx, by, bw, bh], 1), BoxFormat.CXCYWH, BoxFormat.XYXY)


class LocalizationTask(ImageTask):
    name = "localize"
    fitness = "acc_iou50"

    def __init__(self, num_classes: int, box_weight: float = 5.0) -> None:
        self.num_classes = num_classes
        self.box_weight = box_weight

    def loss(self, outputs: torch.Tensor, batch: Any) -> tuple[torch.Tensor, Logs]:
        target = batch[1]  # [B, 6]: object, bx, by, bh, bw, class
        out = outputs.float()
        obj = target[:, 0]
        obj_loss = F.binary_cross_entropy_with_logits(out[:, 0], obj)
        present = obj > 0.5
        if not present.any():
            return obj_loss, {"obj": obj_loss.item(), "box": 0.0, "cls": 0.0}
        box_loss = F.l1_loss(out[present, 1:5], target[present, 1:5])
        cls_loss = (
            F.cross_entropy(out[present, 5:], target[present, 5].long())
            if self.num_classes > 1
            else out.sum() * 0
        )
        total = obj_loss + self.box_weight * box_loss + cls_loss
        return total, {"obj": obj_loss.item(), "box": box_loss.item(), "cls": cls_loss.item()}

    def evaluator(self) -> LocalizationEvaluator:
        return LocalizationEvaluator(self.num_classes)

    def average(self, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Objectness and classes as probabilities (returned as logits), the box (fractions) averaged."""
        stacked = torch.stack([o.float() for o in outputs])
        obj = mean_sigmoid_logits(stacked[..., :1])
        classes = mean_logits(list(stacked[..., 5:])) if stacked.shape[-1] > 5 else stacked[0, :, 5:]
        return torch.cat([obj, stacked[..., 1:5].mean(0), classes], -1)

    def unflip(self, outputs: torch.Tensor) -> torch.Tensor:
        back = outputs.clone()
        back[:, 1] = 1 - back[:, 1]  # b_x, a fraction of the width
        return back

    def to_size(self, outputs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return outputs  # fractions of the input's size

    def show(self, batch: Any, outputs: Any = None) -> list[Shown]:
        """Each input with its box and class (none drawn without an object), or the predicted ones
        where the object is predicted present."""
        images = to_uint8(batch[0])
        rows = (batch[1] if outputs is None else outputs).detach().float().cpu()
        h, w = images.shape[-2:]
        boxes = loc_boxes_xyxy(rows) * torch.tensor([w, h, w, h])
        present = rows[:, 0] > (0.5 if outputs is None else 0.0)
        if outputs is None:
            classes = rows[:, 5].long()
            scores: list[float | None] = [None] * len(rows)
        else:
            prob = rows[:, 5:].softmax(1) if self.num_classes > 1 else torch.ones(len(rows), 1)
            top, classes = prob.max(1)
            scores = (torch.sigmoid(rows[:, 0]) * top).tolist()
        return [
            Shown(im, [int(k)], b[None], None if s is None else [s]) if p else Shown(im, caption="no object")
            for im, p, k, b, s in zip(images, present.tolist(), classes.tolist(), boxes, scores)
        ]


class LocalizationEvaluator:
    """Object/no-object accuracy; on images with an object: class accuracy, mean IoU, and accuracy at
    IoU >= 0.5 (class right and box IoU >= 0.5, counted only when the object was also detected)."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.sums = torch.zeros(6, dtype=torch.float64)  # obj_correct, n, cls_correct, iou_sum, hit50, n_obj

    def update(self, outputs: torch.Tensor, batch: Any) -> None:
        target = batch[1].float()
        out = outputs.float()
        obj = target[:, 0] > 0.5
        pred_obj = out[:, 0] > 0
        self.sums[0] += (pred_obj == obj).sum().item()
        self.sums[1] += len(obj)
        if obj.any():
            iou = elementwise_iou(loc_boxes_xyxy(out[obj]), loc_boxes_xyxy(target[obj]))
            cls_ok = (
                out[obj, 5:].argmax(1) == target[obj, 5].long()
                if self.num_classes > 1
                else torch.ones_like(iou, dtype=torch.bool)
            )
            self.sums[2] += cls_ok.sum().item()
            self.sums[3] += iou.sum().item()
            self.sums[4] += (cls_ok & (iou >= 0.5) & pred_obj[obj]).sum().item()
            self.sums[5] += int(obj.sum())

    def state(self) -> dict[str, torch.Tensor]:
        return {"sums": self.sums}

    def compute(self) -> dict[str, float]:
        s = self.sums.tolist()
        n_obj = max(s[5], 1)
        return {
            "obj_acc": s[0] / max(s[1], 1),
            "cls_acc": s[2] / n_obj,
            "miou": s[3] / n_obj,
            "acc_iou50": s[4] / n_obj,
        }


def wing_loss(err: torch.Tensor, w: float = 10.0, eps: float = 2.0) -> torch.Tensor:
    """Wing loss of absolute errors: ``w ln(1 + |x|/eps)`` below ``w``, ``|x| - C`` above (continuous)."""
    c = w - w * math.log(1 + w / eps)
    return torch.where(err < w, w * torch.log1p(err / eps), err - c)


class LandmarkTask(ImageTask):
    name = "landmarks"
    fitness = "pck"

    def __init__(
        self,
        num_points: int,
        loss: LandmarkLoss = "smooth_l1",
        imgsz: int = 64,
        norm_points: tuple[int, int] | None = None,
        pck_threshold: float = 0.1,
    ) -> None:
        if loss not in ("l1", "smooth_l1", "wing"):
            raise ValueError(f"landmark loss must be l1, smooth_l1 or wing, got {loss!r}")
        self.num_points = num_points
        self.loss_name = loss
        self.imgsz = imgsz
        self.norm_points = norm_points
        self.pck_threshold = pck_threshold

    def loss(self, outputs: torch.Tensor, batch: Any) -> tuple[torch.Tensor, Logs]:
        points, visible = batch[1], batch[2]
        pred = outputs.float() * self.imgsz
        target = points.float() * self.imgsz
        vis = visible.bool()
        if not vis.any():
            return pred.sum() * 0, {}
        diff = (pred - target)[vis]  # [V, 2]
        if self.loss_name == "l1":
            loss = diff.abs().mean()
        elif self.loss_name == "smooth_l1":
            loss = F.smooth_l1_loss(pred[vis], target[vis], beta=1.0)
        else:
            loss = wing_loss(diff.norm(dim=-1)).mean()
        return loss, {}

    def evaluator(self) -> LandmarkEvaluator:
        return LandmarkEvaluator(self.norm_points, self.pck_threshold)

    def average(self, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack([o.float() for o in outputs]).mean(0)

    def to_size(self, outputs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return outputs  # fractions of the input's size

    def show(self, batch: Any, outputs: Any = None) -> list[Shown]:
        """Each input with its visible points, or with every predicted point."""
        images = to_uint8(batch[0])
        h, w = images.shape[-2:]
        points = (batch[1] if outputs is None else outputs).detach().float().cpu() * torch.tensor([w, h])
        visible = batch[2].bool().cpu() if outputs is None else torch.ones(points.shape[:2], dtype=torch.bool)
        return [Shown(im, points=p, visible=v) for im, p, v in zip(images, points, visible)]


class LandmarkEvaluator:
    """NME (mean point error over a normalising distance) and PCK (fraction of points within
    ``threshold`` x that distance). The distance is between the two ``norm_points`` (e.g. the outer eye
    corners) when given, else the diagonal of the ground-truth points' bounding box."""

    def __init__(self, norm_points: tuple[int, int] | None = None, threshold: float = 0.1) -> None:
        self.norm_points = norm_points
        self.threshold = threshold
        self.sums = torch.zeros(3, dtype=torch.float64)  # error/d sum, within threshold, visible points

    def update(self, outputs: torch.Tensor, batch: Any) -> None:
        pred, points, visible = outputs.float(), batch[1].float(), batch[2].bool()
        d = normalizing_distance(points, visible, self.norm_points)  # [B]
        err = (pred - points).norm(dim=-1) / d[:, None].clamp(min=1e-6)  # [B, K]
        self.sums[0] += err[visible].sum().item()
        self.sums[1] += (err[visible] <= self.threshold).sum().item()
        self.sums[2] += visible.sum().item()

    def state(self) -> dict[str, torch.Tensor]:
        return {"sums": self.sums}

    def compute(self) -> dict[str, float]:
        n = max(self.sums[2].item(), 1)
        return {"nme": self.sums[0].item() / n, "pck": self.sums[1].item() / n}


def normalizing_distance(
    points: torch.Tensor, visible: torch.Tensor, norm_points: tuple[int, int] | None = None
) -> torch.Tensor:
    """``[B, K, 2], [B, K] -> [B]``: distance between ``norm_points``, else the points' box diagonal."""
    if norm_points is not None:
        a, b = norm_points
        return (points[:, a] - points[:, b]).norm(dim=-1)
    big = torch.finfo(points.dtype).max
    vis = visible[..., None]
    lo = torch.where(vis, points, big).amin(1)
    hi = torch.where(vis, points, -big).amax(1)
    return (hi - lo).clamp(min=0).norm(dim=-1)
