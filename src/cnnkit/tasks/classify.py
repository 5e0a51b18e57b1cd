"""Image classification: cross-entropy (+ auxiliary side-branch losses), top-k accuracy, confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.tasks.base import ImageTask, Logs, mean_logits, to_uint8
from cnnkit.viz import Shown, plot_confusion


class WithAux(nn.Module):
    """Training forward of a classifier: ``x -> (logits, [aux logits...])``.

    Wrapping (rather than calling ``model.forward_with_aux`` directly) keeps the training forward a
    plain ``forward``, which DistributedDataParallel requires.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        fwd = getattr(self.model, "forward_with_aux", None)
        if fwd is None:
            return self.model(x), []
        logits, aux = fwd(x)
        return logits, list(aux)


class ClassificationTask(ImageTask):
    """Cross-entropy with optional label smoothing; auxiliary classifiers (GoogLeNet, Inception v3) add
    their losses with weight ``aux_weight`` (0.3 in the GoogLeNet paper) during training only."""

    name = "classify"
    fitness = "top1"

    def __init__(self, num_classes: int, label_smoothing: float = 0.0, aux_weight: float = 0.3) -> None:
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.aux_weight = aux_weight

    def training_module(self, model: nn.Module) -> nn.Module:
        return WithAux(model)

    def loss(self, outputs: tuple[torch.Tensor, list[torch.Tensor]], batch: Any) -> tuple[torch.Tensor, Logs]:
        logits, aux = outputs
        target = batch[1]
        main = F.cross_entropy(logits.float(), target, label_smoothing=self.label_smoothing)
        if not aux:
            return main, {}
        aux_loss = sum(F.cross_entropy(a.float(), target, label_smoothing=self.label_smoothing) for a in aux)
        return main + self.aux_weight * aux_loss, {"cls_loss": main.item(), "aux_loss": float(aux_loss)}

    def evaluator(self) -> ClassificationEvaluator:
        return ClassificationEvaluator(self.num_classes)

    def val_loss(self, outputs: Any, batch: Any) -> None:
        return None  # the evaluator sums the cross-entropy itself (over every process of a run)

    def average(self, outputs: Sequence[Any]) -> torch.Tensor:
        return mean_logits([o[0] if isinstance(o, tuple) else o for o in outputs])

    def unflip(self, outputs: Any) -> Any:
        return outputs  # a class does not move

    def to_size(self, outputs: Any, size: tuple[int, int]) -> Any:
        return outputs  # nor with the input's size

    def show(self, batch: Any, outputs: Any = None) -> list[Shown]:
        images, labels = to_uint8(batch[0]), batch[1].tolist()
        if outputs is None:
            return [Shown(im, [y]) for im, y in zip(images, labels)]
        logits = outputs[0] if isinstance(outputs, tuple) else outputs
        prob, top = logits.detach().float().softmax(1).max(1)
        return [
            Shown(im, [k], scores=[p], ok=k == y)
            for im, y, k, p in zip(images, labels, top.tolist(), prob.tolist())
        ]


class ClassificationEvaluator:
    """Accumulates a confusion matrix (rows: truth, columns: prediction), top-5 hits and the loss."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
        self.top5 = torch.zeros((), dtype=torch.long)
        self.loss_sum = torch.zeros((), dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.long)

    def update(self, logits: torch.Tensor, batch: Any) -> None:
        target = batch[1]
        logits = logits.detach().float()
        self.loss_sum += F.cross_entropy(logits, target, reduction="sum").double().cpu()
        pred = logits.argmax(1)
        idx = (target * self.num_classes + pred).cpu()
        self.confusion += torch.bincount(idx, minlength=self.num_classes**2).view(self.num_classes, -1)
        k = min(5, self.num_classes)
        self.top5 += (logits.topk(k, 1).indices == target[:, None]).any(1).sum().cpu()
        self.count += target.numel()

    def state(self) -> dict[str, torch.Tensor]:
        return {
            "confusion": self.confusion,
            "top5": self.top5,
            "loss_sum": self.loss_sum,
            "count": self.count,
        }

    def compute(self) -> dict[str, float]:
        n = max(int(self.count), 1)
        cm = self.confusion.double()
        tp = cm.diag()
        precision = tp / cm.sum(0).clamp(min=1)
        recall = tp / cm.sum(1).clamp(min=1)
        present = cm.sum(1) > 0
        return {
            "val_loss": float(self.loss_sum) / n,
            "top1": float(tp.sum()) / n,
            "top5": float(self.top5) / n,
            "precision": float(precision[present].mean()) if present.any() else 0.0,
            "recall": float(recall[present].mean()) if present.any() else 0.0,
        }

    def per_class(self, class_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Precision, recall and support of each class."""
        cm = self.confusion.double()
        tp = cm.diag()
        names = list(class_names) if class_names else [str(i) for i in range(self.num_classes)]
        return [
            {
                "class": names[i],
                "precision": float(tp[i] / cm[:, i].sum()) if cm[:, i].sum() else 0.0,
                "recall": float(tp[i] / cm[i].sum()) if cm[i].sum() else 0.0,
                "support": int(cm[i].sum()),
            }
            for i in range(self.num_classes)
        ]

    def save_plots(self, run_dir: Path, class_names: Sequence[str] | None = None) -> Path:
        return plot_confusion(self.confusion, run_dir / "confusion_matrix.png", class_names)
