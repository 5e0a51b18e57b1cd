"""What the engine needs from a task: a training forward, a loss, and an evaluator with metrics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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
    """A task whose outputs can be averaged (ensembles, test-time augmentation) and, for test-time
    augmentation, mapped back from a mirrored (``unflip``) or resized (``to_size``) input. A task may
    instead merge the views itself (``combine(views, size)``, as detection fuses boxes)."""

    def average(self, outputs: Sequence[Any]) -> Any:
        """One output from several of the same shape: probabilities averaged (returned as logits),
        boxes and points averaged."""
        ...

    def unflip(self, outputs: Any) -> Any:
        """The outputs for a horizontally mirrored input, mapped back to the original's frame."""
        ...

    def to_size(self, outputs: Any, size: tuple[int, int]) -> Any:
        """The outputs for a resized input, brought to the input's ``(height, width)``."""
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


@dataclass(frozen=True)
class TTA:
    """Test-time augmentation: each image also mirrored (``flip``) and resized by each of ``scales``
    (1, the image as it is, always included); ``tta=True`` in the API is the mirror alone."""

    flip: bool = True
    scales: tuple[float, ...] = (1.0,)

    @classmethod
    def of(cls, value: bool | TTA | None) -> TTA | None:
        if isinstance(value, TTA):
            return value if value.flip or set(value.scales) != {1.0} else None
        return cls() if value else None

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", tuple(sorted({1.0, *map(float, self.scales)})))


@dataclass(frozen=True)
class View:
    """One model's outputs on one view of the input: mirrored or not, at ``size`` (a rescaled input)."""

    outputs: Any
    model: nn.Module
    flipped: bool
    size: tuple[int, int]


class Combined(nn.Module):
    """Several models of one task as one (an ensemble), each also run on the mirrored input with ``flip``
    and on the input rescaled by each of ``scales`` (test-time augmentation): the task's ``combine``
    brings each :class:`View` back to the input's frame and merges them, or, for tasks without it,
    ``unflip`` (and ``to_size`` for outputs that have one) and ``average`` (:class:`Combines`)."""

    def __init__(
        self, models: Sequence[nn.Module], task: Any, flip: bool = False, scales: Sequence[float] = (1.0,)
    ) -> None:
        super().__init__()
        needed = ["average"] + ["unflip"] * flip + ["to_size"] * (set(scales) != {1.0})
        missing = [n for n in needed if not hasattr(task, n) and not hasattr(task, "combine")]
        if missing:
            what = {"average": "ensembles", "unflip": "test-time augmentation by mirroring",
                    "to_size": "test-time augmentation by resizing"}[missing[0]]  # fmt: skip
            raise CnnkitError(f"{getattr(task, 'name', 'this task')} does not support {what}")
        if any(not 0.25 <= s <= 4 for s in scales):
            raise CnnkitError(f"test-time scales must be between 0.25 and 4, got {list(scales)}")
        self.members = nn.ModuleList(models)
        self.task, self.flip, self.scales = task, flip, tuple(scales)

    def forward(self, x: torch.Tensor) -> Any:
        size = (int(x.shape[-2]), int(x.shape[-1]))
        views = []
        for scale in self.scales:
            for m in self.members:
                xs = x if scale == 1 else rescaled(x, scale, size_multiple(m))
                at = (int(xs.shape[-2]), int(xs.shape[-1]))
                views.append(View(m(xs), m, False, at))
                if self.flip:
                    views.append(View(m(xs.flip(-1)), m, True, at))
        combine = getattr(self.task, "combine", None)
        if combine is not None:
            return combine(views, size)
        outputs = []
        for v in views:
            out = self.task.unflip(v.outputs) if v.flipped else v.outputs
            outputs.append(self.task.to_size(out, size) if v.size != size else out)
        return self.task.average(outputs) if len(outputs) > 1 else outputs[0]


def size_multiple(model: nn.Module) -> int:
    """What an input side of ``model`` must be a multiple of: a detector's largest stride, a U-Net's
    total downsampling; 1 otherwise (classifiers and localizers pool whatever size they get)."""
    strides = getattr(model, "strides", None)
    if strides:
        return int(max(strides))
    if hasattr(model, "total_stride"):
        return int(model.total_stride)  # type: ignore[arg-type]
    depth = getattr(getattr(model, "cfg", None), "depth", None)
    return 2 ** int(depth) if depth is not None else 1


def rescaled(x: torch.Tensor, scale: float, multiple: int) -> torch.Tensor:
    """``x`` resized by ``scale`` (bilinear), each side rounded to a multiple of ``multiple``."""
    h, w = (max(multiple, round(n * scale / multiple) * multiple) for n in x.shape[-2:])
    return torch.nn.functional.interpolate(
        x, size=(h, w), mode="bilinear", align_corners=False, antialias=True
    )


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
