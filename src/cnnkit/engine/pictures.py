"""Pictures of a run as it trains, for every task that can draw its batches (``Task.show``):

* ``train_batch0.jpg``, ``train_batch1.jpg``, ``train_batch2.jpg``: the first batches of the run as the
  model sees them, after augmentation, with their labels (a wrong label or a broken augmentation shows
  here before any metric does);
* ``val_pred.jpg``: a fixed set of validation images, each ground truth next to the model's prediction,
  redrawn as epochs end (at most once per ``every`` seconds when epochs are shorter, and after the last).

Each new picture is also listed in ``FitState.pictures`` for the loggers (TensorBoard shows them).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset, default_collate

from cnnkit.engine.callbacks import FitState, Redrawn, drawn_or_logged
from cnnkit.tasks.base import Task
from cnnkit.viz import Shown, draw_tile, save_grid


class Pictures(Redrawn):
    """Draws ``train_batch*.jpg`` and ``val_pred.jpg`` (see the module's note); any drawing failure is
    logged and skipped, never ending the run."""

    def __init__(
        self,
        task: Task,
        val_set: Dataset[Any] | None,
        collate_fn: Any = None,
        *,
        batches: int = 3,
        samples: int = 8,
        per_batch: int = 16,
        every: float = 20.0,
    ) -> None:
        super().__init__(every)  # how often val_pred.jpg is redrawn
        self.show = getattr(task, "show", None)
        self.void = getattr(task, "ignore_index", None)
        self.val_set, self.collate = val_set, collate_fn or default_collate
        self.batches, self.samples, self.per_batch = batches, samples, per_batch
        self.batches_left = 0

    def on_fit_start(self, state: FitState) -> None:
        # a resumed run keeps the batches its first epoch drew
        self.batches_left = self.batches if state.epoch == 0 and state.is_main and self.show else 0

    def after_step(self, state: FitState) -> None:
        if self.batches_left and state.batch is not None:
            k = self.batches - self.batches_left
            self.batches_left -= 1
            drawn_or_logged(self._draw_batch, state, state.run_dir / f"train_batch{k}.jpg")

    def ready(self, state: FitState) -> bool:
        has_val = self.val_set is not None and len(self.val_set) > 0  # type: ignore[arg-type]
        return self.show is not None and has_val and state.eval_model is not None

    def redraw(self, state: FitState) -> None:
        drawn_or_logged(self._draw_predictions, state)

    def _draw_batch(self, state: FitState, path: Path) -> None:
        assert self.show is not None
        self._draw(self.show(state.batch)[: self.per_batch], state, path)

    def _draw_predictions(self, state: FitState) -> None:
        assert self.show is not None and self.val_set is not None and state.eval_model is not None
        names = state.metadata.get("class_names") or []
        path = state.run_dir / "val_pred.jpg"
        draw_predictions(
            self.show, state.eval_model, self.val_set, path, names, self.collate, self.void, self.samples
        )
        state.pictures[path.stem] = path

    def _draw(self, items: list[Shown], state: FitState, path: Path) -> None:
        names = state.metadata.get("class_names") or []
        save_grid([draw_tile(item, names, void=self.void) for item in items], path)
        state.pictures[path.stem] = path


def _is_class_line(item: Shown) -> bool:
    """A classification's picture, whose caption is its class."""
    return item.boxes is None and item.mask is None and item.points is None and bool(item.classes)


def draw_predictions(
    show: Any,
    model: torch.nn.Module,
    dataset: Dataset[Any],
    path: Path,
    names: Sequence[str],
    collate_fn: Any = None,
    void: int | None = None,
    samples: int = 8,
) -> Path:
    """``samples`` images spread over ``dataset``, each ground truth next to ``model``'s prediction
    (``show``: the task's :meth:`~cnnkit.tasks.base.ShowsBatches.show`), as a grid at ``path``."""
    if isinstance(dataset, IterableDataset):  # a stream (shards): its first images
        items = list(itertools.islice(iter(dataset), samples))
    else:
        n = len(dataset)  # type: ignore[arg-type]
        picks = torch.linspace(0, n - 1, min(samples, n)).round().long().unique().tolist()
        items = [dataset[i] for i in picks]
    batch = (collate_fn or default_collate)(items)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            outputs = model(batch[0].to(device))
    finally:
        model.train(was_training)
    pairs = []
    for truth, pred in zip(show(batch), show(batch, outputs)):
        truth.caption = "truth" if truth.caption is None and not _is_class_line(truth) else truth.caption
        pred.caption = "prediction" if pred.caption is None and not _is_class_line(pred) else pred.caption
        pairs += [truth, pred]
    return save_grid([draw_tile(item, names, void=void) for item in pairs], path)
