"""What the engine needs from a task: a training forward, a loss, and an evaluator with metrics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn

from cnnkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from cnnkit.errors import CnnkitError
from cnnkit.viz import Shown

Batch = Any
Logs = dict[str, float]


class Evaluator(Protocol):
    """Accumulates predictions over a validation pass, then computes the metrics."""

    def update(self, outputs: Any, batch: Batch) -> None: ...

    def compute(self) -> dict[str, float]: ...

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors to sum across processes before ``compute`` (distributed evaluation)."""
        ...


class Task(Protocol):
    """A task plugs into the engine; the engine knows nothing else about it."""

    name: str
    #: The metric that decides the best checkpoint (higher is better).
    fitness: str

    def training_module(self, model: nn.Module) -> nn.Module:
        """The module whose ``forward(inputs)`` gives what :meth:`loss` needs (may be the model itself)."""
        ...

    def inputs(self, batch: Batch) -> torch.Tensor: ...

    def loss(self, outputs: Any, batch: Batch) -> tuple[torch.Tensor, Logs]:
        """The loss to back-propagate and the parts to log; a ``"loss"`` entry in the logs is what the run
        logs as its loss when the one back-propagated is scaled (detection's is x batch size)."""
        ...

    def evaluator(self) -> Evaluator: ...

    def val_loss(self, outputs: Any, batch: Batch) -> float | None:
        """The loss of a validation batch, as the training loss is logged (per image); None when the
        task's evaluator reports ``val_loss`` itself."""
        ...


class ShowsBatches(Protocol):
    """A task that can draw its batches (``train_batch*.jpg``) and its predictions (``val_pred.jpg``);
    optional: the engine draws nothing for a task without it."""

    def show(self, batch: Batch, outputs: Any = None) -> list[Shown]:
        """Each image of ``batch`` with its labels (``outputs`` None) or with the model's prediction
        from ``outputs`` (what the model in eval mode returned for the batch's inputs)."""
        ...


class ImageTask:
    """Defaults shared by tasks whose batch is ``(images, targets...)`` and whose model is trained as is."""

    def training_module(self, model: nn.Module) -> nn.Module:
        return model

    def inputs(self, batch: Batch) -> torch.Tensor:
        return batch[0]

    def val_loss(self, outputs: Any, batch: Batch) -> float | None:
        """The training loss on a validation batch (a task's own ``"loss"`` log when it scales the
        back-propagated one)."""
        loss, logs = self.loss(outputs, batch)  # type: ignore[attr-defined]
        return float(logs.get("loss", loss))


class Combines(Protocol):
    """A task whose outputs can be averaged (ensembles, test-time augmentation) and, for the flip of
    test-time augmentation, mapped back from a mirrored input."""

    def average(self, outputs: Sequence[Any]) -> Any:
        """One output from several of the same shape: probabilities averaged (returned as logits),
        boxes and points averaged."""
        ...

    def unflip(self, outputs: Any) -> Any:
        """The outputs for a horizontally mirrored input, mapped back to the original's frame."""
        ...


def mean_logits(logits: Sequence[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """The log of the averaged softmax along ``dim`` (a single channel: the logit of the averaged
    sigmoid): logits of the mean prediction, as argmax, softmax and cross-entropy expect."""
    stacked = torch.stack([t.float() for t in logits])
    if stacked.shape[dim + 1] == 1:
        return mean_sigmoid_logits(stacked)
    return stacked.softmax(dim + 1).mean(0).clamp(min=1e-12).log()


def mean_sigmoid_logits(stacked: torch.Tensor) -> torch.Tensor:
    """Independent (sigmoid) logits stacked along dim 0 -> the logits of their mean probability."""
    return torch.logit(stacked.sigmoid().mean(0), eps=1e-7)


class Combined(nn.Module):
    """Several models of one task as one (an ensemble), each also run on the mirrored input with ``flip``
    (test-time augmentation), their outputs brought back to the input's frame and averaged by the task
    (:class:`Combines`)."""

    def __init__(self, models: Sequence[nn.Module], task: Any, flip: bool = False) -> None:
        super().__init__()
        missing = [n for n in ["average"] + ["unflip"] * flip if not hasattr(task, n)]
        if missing:
            what = "ensembles" if missing == ["average"] else "test-time augmentation"
            raise CnnkitError(f"{getattr(task, 'name', 'this task')} does not support {what}")
        self.members = nn.ModuleList(models)
        self.task, self.flip = task, flip

    def forward(self, x: torch.Tensor) -> Any:
        outputs = [m(x) for m in self.members]
        if self.flip:
            mirrored = x.flip(-1)
            outputs += [self.task.unflip(m(mirrored)) for m in self.members]
        return self.task.average(outputs) if len(outputs) > 1 else outputs[0]


def to_uint8(
    images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """Normalised ``[B, 3, H, W]`` inputs back to ``uint8`` pixels on the CPU, to draw them."""
    x = images.detach().float().cpu()
    x = x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


def interleave(shards: Sequence[Sequence[Any]]) -> list[Any]:
    """Undo the distributed sampler's split of a dataset over processes: ``[[a0, a2], [a1]] -> [a0, a1, a2]``
    (rank ``r`` of ``w`` holds samples ``r, r + w, ...``)."""
    out: list[Any] = []
    for i in range(max((len(s) for s in shards), default=0)):
        out.extend(s[i] for s in shards if i < len(s))
    return out
