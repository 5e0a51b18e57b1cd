"""Semantic segmentation: per-pixel losses (cross-entropy, Dice, focal, CE + Dice) and the metrics
people report (per-class IoU, mean IoU, Dice/F1, pixel accuracy), all with an ignore index."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from cnnkit.data.segment import fit_within
from cnnkit.tasks.base import ImageTask, Logs, mean_logits, to_uint8
from cnnkit.viz import Shown, plot_confusion

SegLoss = Literal["ce", "dice", "focal", "ce+dice"]


def dice_loss(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255, eps: float = 1.0
) -> torch.Tensor:
    """Soft Dice loss averaged over classes present in the batch (ground truth or prediction).

    ``logits: [B, C, H, W]`` (``C == 1``: binary, sigmoid), ``target: [B, H, W]`` class indices.
    ``1 - (2 sum(p g) + eps) / (sum(p) + sum(g) + eps)`` per class, pixels at ``ignore_index`` left out.
    """
    valid = target != ignore_index
    if logits.shape[1] == 1:
        probs = torch.cat([1 - logits.sigmoid(), logits.sigmoid()], 1)
        classes = 2
    else:
        probs = logits.softmax(1)
        classes = logits.shape[1]
    onehot = F.one_hot(torch.where(valid, target, 0), classes).permute(0, 3, 1, 2).to(probs.dtype)
    mask = valid.unsqueeze(1).to(probs.dtype)
    probs, onehot = probs * mask, onehot * mask
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    total = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + eps) / (total + eps)
    present = onehot.sum(dims) > 0
    return (1 - dice)[present].mean() if present.any() else (1 - dice).mean()


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    ignore_index: int = 255,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Focal loss (Lin et al. 2017): cross-entropy scaled by ``(1 - p_t) ** gamma``, averaged over valid
    pixels."""
    if logits.shape[1] == 1:
        valid = target != ignore_index
        t = torch.where(valid, target, 0).float().unsqueeze(1)
        ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
        pt = torch.exp(-ce)
        loss = ((1 - pt) ** gamma * ce).squeeze(1)
        return loss[valid].mean() if valid.any() else loss.sum() * 0
    ce = F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index, reduction="none")
    valid = target != ignore_index
    pt = torch.exp(-F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none"))
    loss = (1 - pt) ** gamma * ce
    return loss[valid].mean() if valid.any() else loss.sum() * 0


class SegmentationTask(ImageTask):
    """Per-pixel classification. ``num_classes == 1`` is binary segmentation (sigmoid, BCE)."""

    name = "segment"
    fitness = "miou"

    def __init__(
        self,
        num_classes: int,
        loss: SegLoss = "ce",
        ignore_index: int = 255,
        class_weights: Sequence[float] | None = None,
        dice_weight: float = 1.0,
        rect: bool = False,
    ) -> None:
        if loss not in ("ce", "dice", "focal", "ce+dice"):
            raise ValueError(f"loss must be ce, dice, focal or ce+dice, got {loss!r}")
        self.num_classes = num_classes
        self.loss_name = loss
        self.ignore_index = ignore_index
        self.class_weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.dice_weight = dice_weight
        self.rect = rect  # evaluation inputs keep their aspect ratio (see SegmentationTransform)

    def _ce(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] == 1:
            valid = target != self.ignore_index
            t = torch.where(valid, target, 0).float()
            ce = F.binary_cross_entropy_with_logits(logits[:, 0], t, reduction="none")
            return ce[valid].mean() if valid.any() else ce.sum() * 0
        weight = self.class_weights.to(logits.device) if self.class_weights is not None else None
        return F.cross_entropy(logits, target, weight=weight, ignore_index=self.ignore_index)

    def loss(self, outputs: torch.Tensor, batch: Any) -> tuple[torch.Tensor, Logs]:
        logits, target = outputs.float(), batch[1]
        if self.loss_name == "ce":
            return self._ce(logits, target), {}
        if self.loss_name == "focal":
            weight = self.class_weights.to(logits.device) if self.class_weights is not None else None
            return focal_loss(logits, target, ignore_index=self.ignore_index, weight=weight), {}
        dice = dice_loss(logits, target, self.ignore_index)
        if self.loss_name == "dice":
            return dice, {}
        ce = self._ce(logits, target)
        return ce + self.dice_weight * dice, {"ce": ce.item(), "dice": dice.item()}

    def evaluator(self) -> SegmentationEvaluator:
        return SegmentationEvaluator(max(self.num_classes, 2), self.ignore_index, rect=self.rect)

    def average(self, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        return mean_logits(outputs)

    def unflip(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.flip(-1)

    def to_size(self, outputs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Logits of a rescaled input brought to the input's size (bilinear, as the model upsamples)."""
        return torch.nn.functional.interpolate(
            outputs.float(), size=size, mode="bilinear", align_corners=False
        )

    def show(self, batch: Any, outputs: Any = None) -> list[Shown]:
        """Each image with its mask or the predicted one; masks kept at full resolution (evaluation of
        images of their own sizes) are drawn over the image brought to that size."""
        images, target = batch[0].detach().float(), batch[1]
        if isinstance(target, torch.Tensor) and target.shape[-2:] == images.shape[-2:]:
            pairs = list(zip(images, target.cpu()))
            if outputs is not None:
                pairs = list(zip(images, predict_classes(outputs.detach().float()).cpu()))
        else:
            pairs = [(up[0], mask) for up, mask in full_size(images, target, self.rect)]
            if outputs is not None:
                logits = full_size(outputs.detach().float(), target, self.rect)
                pred = [predict_classes(up)[0] for up, _ in logits]
                pairs = [(im, p) for (im, _), p in zip(pairs, pred)]
        return [Shown(to_uint8(im[None])[0], mask=m.cpu().numpy()) for im, m in pairs]

    def val_loss(self, outputs: torch.Tensor, batch: Any) -> float:
        """The training loss at each mask's own resolution (logits cropped of their padding and upsampled,
        as the metrics are computed), averaged over the images."""
        target = batch[1]
        if isinstance(target, torch.Tensor) and target.shape[-2:] == outputs.shape[-2:]:
            return float(self.loss(outputs, batch)[0])
        losses = [
            float(self.loss(up, (None, mask[None].long()))[0])
            for up, mask in full_size(outputs, target, self.rect)
        ]
        return sum(losses) / max(1, len(losses))


def full_size(
    logits: torch.Tensor, masks: Sequence[torch.Tensor], rect: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Each image's ``[1, C, h, w]`` logits at its mask's own size (the padding of a ``rect`` input cropped
    off first), with its mask."""
    for one, mask in zip(logits, masks):
        if rect:
            h, w = mask.shape[-2:]
            nh, nw = fit_within(int(h), int(w), one.shape[-2:])
            one = one[:, :nh, :nw]
        yield (
            F.interpolate(one[None], size=tuple(mask.shape[-2:]), mode="bilinear", align_corners=False),
            mask,
        )


def predict_classes(logits: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` logits to ``[B, H, W]`` class indices (``C == 1``: threshold at 0)."""
    return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)


class SegmentationEvaluator:
    """A confusion matrix over valid pixels; IoU, Dice and accuracies derive from it."""

    def __init__(self, num_classes: int, ignore_index: int = 255, rect: bool = False) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.rect = rect  # inputs were letterboxed (long side, padded bottom/right): crop before upsampling
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)

    def update(self, logits: torch.Tensor, batch: Any) -> None:
        """``batch[1]``: masks at the logits' size, or at each image's own size (a tensor or a list):
        then each image's logits are upsampled to its mask before the argmax."""
        target = batch[1]
        if isinstance(target, torch.Tensor) and target.shape[-2:] == logits.shape[-2:]:
            self.update_classes(predict_classes(logits), target)
            return
        for up, mask in full_size(logits, target, self.rect):
            self.update_classes(predict_classes(up)[0], mask)

    def update_classes(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        valid = target != self.ignore_index
        idx = target[valid] * self.num_classes + pred[valid]
        self.confusion += torch.bincount(idx.cpu(), minlength=self.num_classes**2).view(self.num_classes, -1)

    def state(self) -> dict[str, torch.Tensor]:
        return {"confusion": self.confusion}

    def per_class(self) -> dict[str, torch.Tensor]:
        """IoU, Dice and accuracy (recall) of each class; NaN where a class is absent from both."""
        cm = self.confusion.double()
        tp = cm.diag()
        fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
        union = tp + fp + fn
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        return {
            "iou": torch.where(union > 0, tp / union.clamp(min=1), nan),
            "dice": torch.where(union > 0, 2 * tp / (2 * tp + fp + fn).clamp(min=1), nan),
            "acc": torch.where(cm.sum(1) > 0, tp / cm.sum(1).clamp(min=1), nan),
        }

    def compute(self) -> dict[str, float]:
        """``miou``/``mdice``: means over classes present in the ground truth or the predictions; a binary
        task adds the foreground's ``fg_iou``/``fg_dice``."""
        per = self.per_class()
        total = self.confusion.sum()
        out = {
            "miou": float(per["iou"].nanmean()) if total else 0.0,
            "mdice": float(per["dice"].nanmean()) if total else 0.0,
            "pixel_acc": float(self.confusion.diag().sum().double() / total.clamp(min=1)),
            "mean_acc": float(per["acc"].nanmean()) if total else 0.0,
        }
        if self.num_classes == 2:  # a binary task: the foreground's own numbers (class 1)
            out["fg_iou"] = float(per["iou"][1].nan_to_num(0.0))
            out["fg_dice"] = float(per["dice"][1].nan_to_num(0.0))
        return out

    def save_plots(self, run_dir: Path, class_names: Sequence[str] | None = None) -> Path:
        note = "pixels; void pixels left out" if self.ignore_index is not None else "pixels"
        return plot_confusion(self.confusion, run_dir / "confusion_matrix.png", class_names, note)
