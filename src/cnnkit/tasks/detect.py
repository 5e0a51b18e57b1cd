"""Object detection with YOLO grids: target assignment, loss, postprocess and metrics.

A batch is ``(images [B, 3, H, W], targets [M, 6], info [B, 5])``: each target row is ``(image index,
class, x1, y1, x2, y2)`` in input pixels, each info row ``(height, width, scale, pad_x, pad_y)`` of
the letterbox that took the original image to the input (``input = original * scale + pad``).

**Assignment.** An object goes to the cell holding its centre, on every scale, with the anchor whose
shape overlaps its own best over all scales (YOLOv2/v3), and also with any other anchor whose shape
IoU reaches ``anchor_iou`` (YOLOv4's multiple anchors; 1.0 turns it off). Two objects on the same (cell,
anchor) both pull on that prediction.

**Loss** (per batch, summed over images; logged per image, without the ``B``)::

    loss = B * (box_gain * L_box + obj_gain * L_obj + cls_gain * L_cls)     # gains 1.0, 1.0, 0.5

* ``L_box``: mean over assigned predictions of ``1 - CIoU`` of the decoded box (``box_loss="ciou"``),
  or the course's squared error on ``(sigmoid(t_x), sigmoid(t_y), t_w, t_h)`` (``"mse"``).
* ``L_obj``: per scale, mean BCE of objectness over every (cell, anchor), target 1 where assigned; the
  unassigned ("no object") terms are down-weighted by ``noobj_weight`` (0.5); scales weighted 4, 1,
  0.4 (finest first, YOLOv5's balance).
* ``L_cls``: mean over assigned predictions of the BCE of the class logits against one-hot targets,
  summed over classes (a mean over classes would shrink the class signal by C and, measured on the
  built-in digits, leaves the classes unlearnt on coarse grids).

**Postprocess.** ``score = sigmoid(objectness) * sigmoid(class logit)``; candidates above ``conf``
go through class-aware NMS; boxes are mapped back through the letterbox to the original image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from cnnkit.ops.boxes import box_iou, clip, complete_iou
from cnnkit.ops.nms import Candidates, Detections, multiclass_nms
from cnnkit.ops.yolo import decode_outputs, shape_iou
from cnnkit.tasks.base import ImageTask, Logs, View, to_uint8
from cnnkit.tasks.coco_eval import RECALL_THRESHOLDS, CocoEvaluator, CocoResult
from cnnkit.viz import Shown, plot_confusion

BoxLoss = Literal["ciou", "mse"]
SCALE_BALANCE = (4.0, 1.0, 0.4, 0.1, 0.05)
CONFUSION_CONF, CONFUSION_IOU = 0.25, 0.45  # how the confusion matrix counts (as ultralytics does)


def postprocess(
    outputs: Sequence[torch.Tensor],
    anchors: torch.Tensor,
    strides: Sequence[int],
    *,
    conf: float = 0.25,
    iou: float = 0.45,
    max_det: int = 300,
    multi_label: bool = False,
    agnostic: bool = False,
) -> list[Detections]:
    """Raw YOLO grids (see :func:`decode_outputs`) -> per image :class:`Detections` in input pixels,
    after thresholding and NMS."""
    boxes, scores = decode_outputs([o.float() for o in outputs], anchors, strides)
    return multiclass_nms(
        boxes,
        scores,
        conf=conf,
        iou=iou,
        max_det=max_det,
        multi_label=multi_label,
        agnostic=agnostic,
    )


def unletterbox(boxes: torch.Tensor, info: torch.Tensor) -> torch.Tensor:
    """``boxes [K, 4]`` xyxy input pixels -> original image pixels, clipped; ``info`` one row of the
    batch's ``[height, width, scale, pad_x, pad_y]``."""
    h, w, scale, px, py = info.tolist()
    pad = boxes.new_tensor([px, py, px, py])
    return clip((boxes - pad) / scale, int(h), int(w))


class DetectionTask(ImageTask):
    name = "detect"
    fitness = "mAP"

    def __init__(
        self,
        num_classes: int,
        anchors: torch.Tensor,
        strides: Sequence[int],
        *,
        box_loss: BoxLoss = "ciou",
        anchor_iou: float = 0.5,
        noobj_weight: float = 0.5,
        box_gain: float = 1.0,
        obj_gain: float = 1.0,
        cls_gain: float = 0.5,
        eval_conf: float = 0.001,
        eval_iou: float = 0.6,
    ) -> None:
        self.num_classes = num_classes
        self.anchors = anchors.float()  # [L, A, 2] pixels
        self.strides = tuple(strides)
        self.box_loss = box_loss
        self.anchor_iou = anchor_iou
        self.noobj_weight = noobj_weight
        self.gains = (box_gain, obj_gain, cls_gain)
        self.eval_conf, self.eval_iou = eval_conf, eval_iou

    def assign(self, targets: torch.Tensor) -> torch.Tensor:
        """``targets [M, 6] -> [M, L*A]`` bool: which anchors (all scales) each object is assigned to."""
        anchors = self.anchors.to(targets.device).view(-1, 2)
        wh = targets[:, 4:6] - targets[:, 2:4]
        overlap = shape_iou(wh, anchors)  # [M, L*A]
        assigned = overlap >= self.anchor_iou
        if len(targets):
            assigned[torch.arange(len(targets), device=targets.device), overlap.argmax(1)] = True
        return assigned

    def loss(self, outputs: list[torch.Tensor], batch: Any) -> tuple[torch.Tensor, Logs]:
        images, targets = batch[0], batch[1].float()
        batch_size = images.shape[0]
        assigned = self.assign(targets)
        n_anchors = self.anchors.shape[1]
        centre = (targets[:, 2:4] + targets[:, 4:6]) / 2
        box_terms, cls_terms = [], []
        obj_loss = outputs[0].new_zeros((), dtype=torch.float32)
        for level, (out, stride) in enumerate(zip(outputs, self.strides)):
            out = out.float()
            s_y, s_x = out.shape[1:3]
            m, a = assigned[:, level * n_anchors : (level + 1) * n_anchors].nonzero(as_tuple=True)
            b = targets[m, 0].long()
            cell = (centre[m] / stride).floor().long()
            gx, gy = cell[:, 0].clamp(0, s_x - 1), cell[:, 1].clamp(0, s_y - 1)
            obj_target = torch.zeros(out.shape[:4], device=out.device)
            obj_target[b, gy, gx, a] = 1.0
            bce = F.binary_cross_entropy_with_logits(out[..., 4], obj_target, reduction="none")
            weight = torch.where(obj_target > 0, 1.0, self.noobj_weight)
            obj_loss = obj_loss + SCALE_BALANCE[min(level, len(SCALE_BALANCE) - 1)] * (bce * weight).mean()
            if not len(m):
                continue
            p = out[b, gy, gx, a]  # [P, 5 + C]
            anchor = self.anchors[level].to(out.device)[a]
            grid = torch.stack([gx, gy], 1).float()
            if self.box_loss == "ciou":
                xy = (p[:, :2].sigmoid() + grid) * stride
                half = anchor * p[:, 2:4].clamp(max=8).exp() / 2
                box_terms.append(1 - complete_iou(torch.cat([xy - half, xy + half], 1), targets[m, 2:6]))
            else:
                offset = (centre[m] / stride - grid).clamp(0, 1)
                wh = (targets[m, 4:6] - targets[m, 2:4]).clamp(min=1e-3)
                box_terms.append(
                    ((p[:, :2].sigmoid() - offset) ** 2).sum(1)
                    + ((p[:, 2:4] - torch.log(wh / anchor)) ** 2).sum(1)
                )
            if self.num_classes > 1:
                onehot = F.one_hot(targets[m, 1].long(), self.num_classes).float()
                cls_terms.append(
                    F.binary_cross_entropy_with_logits(p[:, 5:], onehot, reduction="none").sum(1)
                )
        zero = obj_loss * 0
        box = torch.cat(box_terms).mean() if box_terms else zero
        cls = torch.cat(cls_terms).mean() if cls_terms else zero
        g_box, g_obj, g_cls = self.gains
        per_image = g_box * box + g_obj * obj_loss + g_cls * cls
        logs = {"loss": per_image.item(), "box": box.item(), "obj": obj_loss.item(), "cls": cls.item()}
        return batch_size * per_image, logs  # the gradient scales with the batch (YOLOv5); the log does not

    def postprocess(self, outputs: Sequence[torch.Tensor] | Candidates, **kwargs: Any) -> list[Detections]:
        """Raw grids, or boxes pooled from several views (:meth:`combine`) and fused, -> detections."""
        if isinstance(outputs, Candidates):
            c = outputs
            return multiclass_nms(c.boxes, c.scores, view=c.view, views=c.views, **kwargs)
        return postprocess(outputs, self.anchors, self.strides, **kwargs)

    def val_loss(self, outputs: Any, batch: Any) -> float | None:
        return None if isinstance(outputs, Candidates) else super().val_loss(outputs, batch)

    def combine(self, views: Sequence[View], size: tuple[int, int]) -> Candidates:
        """The boxes of every view (an ensemble's detectors, whatever their anchors and strides; mirrored
        and resized inputs), each decoded with its model's anchors and brought back to the input's frame,
        pooled for box fusion (:func:`~cnnkit.ops.nms.multiclass_nms`). Measured on the built-in digits
        against averaging the grids cell by cell: the same mAP50 and a higher mAP."""
        boxes, scores, which = [], [], []
        for k, v in enumerate(views):
            anchors = v.model.anchors.float()  # type: ignore[union-attr]
            b, sc = decode_outputs([o.float() for o in v.outputs], anchors, v.model.strides)  # type: ignore[arg-type]
            h, w = v.size
            if v.flipped:  # x -> W - x
                b = torch.stack([w - b[..., 2], b[..., 1], w - b[..., 0], b[..., 3]], -1)
            if v.size != size:
                b = b * b.new_tensor([size[1] / w, size[0] / h] * 2)
            boxes.append(b)
            scores.append(sc)
            which.append(torch.full((b.shape[1],), k, dtype=torch.long, device=b.device))
        return Candidates(torch.cat(boxes, 1), torch.cat(scores, 1), torch.cat(which), len(views))

    def show(self, batch: Any, outputs: Any = None, conf: float = 0.25, iou: float = 0.45) -> list[Shown]:
        """The letterboxed inputs with their boxes, or with the detections above ``conf``."""
        images, targets = to_uint8(batch[0]), batch[1].detach().float().cpu()
        if outputs is None:
            rows = [targets[targets[:, 0] == i] for i in range(len(images))]
            return [Shown(im, r[:, 1].long().tolist(), r[:, 2:6]) for im, r in zip(images, rows)]
        dets = self.postprocess(outputs, conf=conf, iou=iou)
        return [
            Shown(im, d.labels.tolist(), d.boxes.float().cpu(), d.scores.tolist())
            for im, d in zip(images, dets)
        ]

    def evaluator(self) -> DetectionEvaluator:
        return DetectionEvaluator(self, conf=self.eval_conf, iou=self.eval_iou)


class DetectionEvaluator:
    """COCO metrics (identical to pycocotools) on the original images' pixels, precision and recall at
    the best class-mean F1, and a confusion matrix with a background row and column.

    Detections for mAP use ``conf=0.001``, ``iou=0.6``, multi-label, 300 per image (as detection
    benchmarks do); the confusion matrix counts those above ``conf=0.25`` matched at IoU 0.45.
    """

    def __init__(self, task: DetectionTask, *, conf: float = 0.001, iou: float = 0.6) -> None:
        self.task = task
        self.conf, self.iou = conf, iou
        self.coco = CocoEvaluator(task.num_classes)
        n = task.num_classes + 1
        self.confusion = torch.zeros(n, n, dtype=torch.long)  # [true, predicted], last = background
        self.result: CocoResult | None = None

    def update(self, outputs: list[torch.Tensor], batch: Any) -> None:
        dets = self.task.postprocess(outputs, conf=self.conf, iou=self.iou, multi_label=True)
        targets, info = batch[1].float().cpu(), batch[2].float().cpu()
        for i, d in enumerate(dets):
            gt = targets[targets[:, 0] == i]
            gt_boxes = unletterbox(gt[:, 2:6], info[i])
            boxes = unletterbox(d.boxes.float().cpu(), info[i])
            labels = d.labels.cpu()
            self.coco.add(
                gt_boxes.numpy(),
                gt[:, 1].long().numpy(),
                boxes.numpy(),
                d.scores.cpu().numpy(),
                labels.numpy(),
            )
            self._confusion(gt_boxes, gt[:, 1].long(), boxes, d.scores.cpu(), labels)

    def _confusion(
        self,
        gt_boxes: torch.Tensor,
        gt_labels: torch.Tensor,
        boxes: torch.Tensor,
        scores: torch.Tensor,
        labels: torch.Tensor,
        conf: float = CONFUSION_CONF,
        iou: float = CONFUSION_IOU,
    ) -> None:
        keep = scores > conf
        boxes, labels = boxes[keep], labels[keep]
        bg = self.task.num_classes
        matched_gt = torch.zeros(len(gt_labels), dtype=torch.bool)
        matched_dt = torch.zeros(len(labels), dtype=torch.bool)
        if len(gt_labels) and len(labels):
            overlap = box_iou(gt_boxes, boxes)
            pairs = (overlap > iou).nonzero()
            order = overlap[pairs[:, 0], pairs[:, 1]].argsort(descending=True)
            for g, d in pairs[order].tolist():  # best overlaps first, each box used once
                if not matched_gt[g] and not matched_dt[d]:
                    matched_gt[g] = matched_dt[d] = True
                    self.confusion[gt_labels[g], labels[d]] += 1
        for g in gt_labels[~matched_gt].tolist():
            self.confusion[g, bg] += 1
        for d in labels[~matched_dt].tolist():
            self.confusion[bg, d] += 1

    def state(self) -> dict[str, torch.Tensor]:
        return {"confusion": self.confusion}

    def shard_records(self) -> list[Any]:
        """Per-image matching results of this process (combined across processes before ``compute``)."""
        return self.coco.images

    def merge_shards(self, per_rank: Sequence[list[Any]]) -> None:
        from cnnkit.tasks.base import interleave

        self.coco.images = interleave(per_rank)

    def compute(self) -> dict[str, float]:
        self.result = self.coco.compute()
        stats = self.result.stats
        p, r, _, _ = self.result.best_f1()
        clean = {k: max(v, 0.0) for k, v in stats.items()}
        return {
            "precision": p,
            "recall": r,
            "mAP50": clean["mAP50"],
            "mAP75": clean["mAP75"],
            "mAP": clean["mAP"],
            "AR100": clean["AR100"],
        }

    def per_class(self, class_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Precision and recall (at the confidence of the best mean F1, IoU 0.5), AP at 0.5 and at
        0.5:0.95, and the ground-truth objects of each class (None: no ground truth)."""
        result = self.result or self.coco.compute()
        ap, ap50 = result.per_class_ap(), result.per_class_ap(0.5)
        precision, recall = result.per_class_pr()
        names = list(class_names) if class_names else [str(i) for i in range(self.task.num_classes)]
        support = self.confusion[:-1].sum(1)

        def value(x: float) -> float | None:
            return None if np.isnan(x) else float(x)

        return [
            {
                "class": names[k],
                "precision": value(precision[k]),
                "recall": value(recall[k]),
                "AP50": value(ap50[k]),
                "AP": value(ap[k]),
                "support": int(support[k]),
            }
            for k in range(self.task.num_classes)
        ]

    def save_plots(self, run_dir: Path, class_names: Sequence[str] | None = None) -> list[Path]:
        from cnnkit.viz import pyplot, save_figure

        result = self.result or self.coco.compute()
        names = list(class_names) if class_names else [str(i) for i in range(self.task.num_classes)]
        plt = pyplot()
        fig, (ax_pr, ax_f1) = plt.subplots(1, 2, figsize=(11, 4.5))
        curves = result.precision[0, :, :, 0, -1]  # [R, K] at IoU 0.5
        valid = curves[0] > -1
        for k in np.flatnonzero(valid):
            ax_pr.plot(
                RECALL_THRESHOLDS,
                curves[:, k],
                lw=0.8,
                alpha=0.6,
                label=names[k] if valid.sum() <= 20 else None,
            )
        if valid.any():
            mean = curves[:, valid].mean(1)
            ax_pr.plot(RECALL_THRESHOLDS, mean, "k", lw=2.5, label=f"all classes mAP@0.5 {mean.mean():.3f}")
        ax_pr.set(
            xlabel="recall",
            ylabel="precision",
            xlim=(0, 1),
            ylim=(0, 1.02),
            title="precision-recall (IoU 0.5)",
        )
        ax_pr.legend(fontsize=7, loc="lower left")
        f1 = result.mean_f1()
        if f1 is not None:
            best = int(f1.argmax())
            ax_f1.plot(result.conf_grid, f1, "k", lw=2)
            ax_f1.axvline(result.conf_grid[best], ls="--", c="gray")
            ax_f1.set_title(f"mean F1 {f1[best]:.3f} at confidence {result.conf_grid[best]:.3f}")
        ax_f1.set(xlabel="confidence", ylabel="F1", xlim=(0, 1), ylim=(0, 1.02))
        pr_path = save_figure(fig, run_dir / "pr_curve.png")
        note = (
            f"boxes scoring > {CONFUSION_CONF} matched to objects at IoU > {CONFUSION_IOU}; background: "
            "missed objects (column), false detections (row)"
        )
        cm_path = run_dir / "confusion_matrix.png"
        plot_confusion(self.confusion, cm_path, [*names, "background"], note)
        return [pr_path, cm_path]
