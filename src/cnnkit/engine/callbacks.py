"""Hooks of the fit loop (detectron2's ``HookBase`` is the model): each sees a small state.

Step hooks keep the loop short: gradient clipping, the NaN guard and the EMA update are hooks, and so
are the epoch-level ones (checkpoints, CSV log, early stopping, plots). Every hook runs on every rank;
those that write files do so on rank 0 (``state.is_main``), and a stop asked for on any rank is agreed
by all ranks before the next epoch, so distributed runs never hang.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnkit.engine.ema import ModelEMA
from cnnkit.errors import CnnkitError
from cnnkit.io import atomic_path
from cnnkit.weights import save_weights

log = logging.getLogger("cnnkit")


@dataclass
class FitState:
    """What callbacks may read (and, for ``stop``, write) during a fit."""

    run_dir: Path
    epochs: int
    fitness_key: str
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    metrics: dict[str, float] = field(default_factory=dict)  # of the last completed epoch
    history: list[dict[str, float]] = field(default_factory=list)
    best_fitness: float = -math.inf
    best_epoch: int = 0
    improved: bool = False
    stop: bool = False
    stop_reason: str = ""
    #: The model to evaluate and save (the EMA when enabled).
    eval_model: nn.Module | None = None
    #: Builds the full resumable training state (model, optimizer, counters...).
    training_state: Callable[[], dict[str, Any]] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    is_main: bool = True  # rank 0 (the process that writes files)
    rank: int = 0
    world_size: int = 1
    #: Sum of the (detached) losses of the micro-batches of the optimizer step in progress.
    window_loss: torch.Tensor | None = None
    #: The micro-batch just trained on (on the device), for the hooks of ``after_step``.
    batch: Any = None
    #: Pictures drawn since the loggers last looked (name -> file); a logger that shows them clears it.
    pictures: dict[str, Path] = field(default_factory=dict)

    @property
    def weights_dir(self) -> Path:
        return self.run_dir / "weights"


class Callback:
    """Base class of the fit loop's hooks; override what you need. ``before_step`` runs before the first
    micro-batch of an optimizer step, ``after_backward`` once all its micro-batches have back-propagated
    (gradients complete, optimizer not yet stepped), ``after_step`` after the optimizer step."""

    def on_fit_start(self, state: FitState) -> None:
        pass

    def before_step(self, state: FitState) -> None:
        pass

    def after_backward(self, state: FitState) -> None:
        pass

    def after_step(self, state: FitState) -> None:
        pass

    def on_epoch_end(self, state: FitState) -> None:
        pass

    def on_fit_end(self, state: FitState) -> None:
        pass


class TrainingDiverged(CnnkitError):
    """The loss became NaN or infinite."""


class NanGuard(Callback):
    """Stop with :class:`TrainingDiverged` as soon as an optimizer step's loss is not finite, before the
    step changes the weights; the last checkpoint on disk stays the last good one."""

    def after_backward(self, state: FitState) -> None:
        loss = state.window_loss
        if loss is None or bool(torch.isfinite(loss)):
            return
        raise diverged(state, f"loss became {loss.item()} at epoch {state.epoch + 1}, step {state.step + 1}")


def diverged(state: FitState, what: str) -> TrainingDiverged:
    """The error of a diverged run: what happened, which checkpoint on disk is the last good one, and
    what to try."""
    last = state.weights_dir / "last.pt"
    kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
    return TrainingDiverged(f"{what}; {kept}. Lower --lr, enable --grad-clip, or check the labels.")


class GradClip(Callback):
    """Clip the global gradient norm to ``max_norm`` (gradients unscaled first under fp16)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        max_norm: float,
    ) -> None:
        self.model, self.optimizer, self.scaler, self.max_norm = model, optimizer, scaler, max_norm

    def after_backward(self, state: FitState) -> None:
        self.scaler.unscale_(self.optimizer)
        params = (p for p in self.model.parameters() if p.grad is not None)
        torch.nn.utils.clip_grad_norm_(params, self.max_norm)


class EMAUpdate(Callback):
    """Update the exponential moving average of the weights after every optimizer step."""

    def __init__(self, ema: ModelEMA, model: nn.Module) -> None:
        self.ema, self.model = ema, model

    def after_step(self, state: FitState) -> None:
        self.ema.update(self.model)


class CSVLogger(Callback):
    """``results.csv``: one row per epoch. On resume, rows after the checkpoint's epoch are dropped."""

    def __init__(self, filename: str = "results.csv") -> None:
        self.filename = filename

    def on_fit_start(self, state: FitState) -> None:
        self._write(state)

    def on_epoch_end(self, state: FitState) -> None:
        self._write(state)

    def _write(self, state: FitState) -> None:
        rows = state.history[: state.epoch]
        if not rows or not state.is_main:
            return
        keys = list(dict.fromkeys(k for row in rows for k in row))
        with atomic_path(state.run_dir / self.filename) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)


class Checkpoint(Callback):
    """``weights/last.pt`` (resumable state) every ``period`` epochs and at the end, ``last.safetensors``
    and ``best.safetensors`` (weights of the evaluated model, with metadata). All writes are atomic, and
    the weights go first: a resumable state never names a best epoch whose weights are not on disk."""

    def __init__(self, period: int = 1) -> None:
        self.period = max(period, 1)
        self.saved_epoch = 0  # the epoch whose state last.pt holds

    def on_fit_start(self, state: FitState) -> None:
        self.saved_epoch = state.epoch
        if state.is_main:
            for leftover in state.weights_dir.glob(".*.tmp"):  # the temporary file of a killed save
                log.info("removing %s, left by an interrupted save", leftover)
                leftover.unlink(missing_ok=True)
        if state.epoch > 0:
            self._reconcile_best(state)

    @staticmethod
    def _reconcile_best(state: FitState) -> None:
        """On resume, the best file is the truth about the best epoch: a kill between writing it and
        writing the resumable state (or a state older than it, with ``--save-period``) leaves the state
        naming another epoch; the file's own metadata (epoch, metrics) wins, so the score reported is
        always that of the weights in ``best.safetensors``."""
        from cnnkit.weights import read_metadata

        best = state.weights_dir / "best.safetensors"
        meta = read_metadata(best) if best.is_file() else {}
        epoch, fitness = meta.get("epoch"), (meta.get("metrics") or {}).get(state.fitness_key)
        if epoch is None or fitness is None:
            if state.best_epoch:
                log.warning("%s is missing: the next improvement writes it", best)
                state.best_epoch, state.best_fitness = 0, -math.inf
            return
        if int(epoch) != state.best_epoch:
            log.warning(
                "the resumable state names epoch %d as best, %s holds epoch %d (%s %.4f): using the file's",
                state.best_epoch,
                best,
                int(epoch),
                state.fitness_key,
                float(fitness),
            )
            state.best_epoch, state.best_fitness = int(epoch), float(fitness)

    def on_epoch_end(self, state: FitState) -> None:
        final = state.epoch >= state.epochs or state.stop
        self._save(state, last=state.epoch % self.period == 0 or final)

    def on_fit_end(self, state: FitState) -> None:
        # A stop decided after this hook ran (early stopping, a stop agreed across ranks) still leaves
        # the last epoch resumable on disk.
        if state.epoch > self.saved_epoch:
            self._save(state, last=True)

    def _save(self, state: FitState, *, last: bool) -> None:
        assert state.training_state is not None and state.eval_model is not None
        if not state.is_main or not (last or state.improved):
            return
        _refuse_non_finite(state)
        meta = {**state.metadata, "epoch": state.epoch, "metrics": state.metrics}
        written = save_weights(
            state.eval_model, state.weights_dir / f"{'last' if last else 'best'}.safetensors", meta
        )
        if last and state.improved:  # the same bytes: link instead of writing them twice
            with atomic_path(state.weights_dir / "best.safetensors") as tmp:
                tmp.unlink()
                try:
                    os.link(written, tmp)
                except OSError:  # a filesystem without hard links
                    shutil.copyfile(written, tmp)
        if last:
            with atomic_path(state.weights_dir / "last.pt") as tmp:
                torch.save(state.training_state(), tmp)
            self.saved_epoch = state.epoch


def _refuse_non_finite(state: FitState) -> None:
    """Nothing non-finite is saved as good: weights or BatchNorm statistics that became inf/NaN (or a
    validation loss that did) stop the run as a divergence, and the files on disk keep the last finite
    epoch."""
    assert state.eval_model is not None
    bad = [
        name
        for name, t in state.eval_model.state_dict().items()
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    losses = [k for k, v in state.metrics.items() if "loss" in k and not math.isfinite(v)]
    if not bad and not losses:
        return
    what = f"{len(bad)} weight tensors became non-finite ({', '.join(bad[:3])})" if bad else ""
    what += ("; " if what else "") + (f"{', '.join(losses)} is not finite" if losses else "")
    raise diverged(state, f"at epoch {state.epoch}: {what}; nothing of this epoch was saved")


class EarlyStopping(Callback):
    """Stop when the fitness metric has not improved for ``patience`` epochs."""

    def __init__(self, patience: int) -> None:
        self.patience = patience

    def on_epoch_end(self, state: FitState) -> None:
        if state.epoch - state.best_epoch >= self.patience:
            state.stop = True
            state.stop_reason = (
                f"early stopping: {state.fitness_key} has not improved for {self.patience} epochs "
                f"(best {state.best_fitness:.4f} at epoch {state.best_epoch})"
            )


class Redrawn(Callback):
    """A picture redrawn as epochs end (a run can be watched) and after the last one. Epochs shorter than
    ``every`` seconds redraw it at most once per ``every`` seconds: a drawing costs about a second, a lot
    next to a 3-second epoch. Subclasses say whether there is anything to draw and draw it (main process
    only, each epoch at most once)."""

    def __init__(self, every: float = 20.0) -> None:
        self.every, self.last, self.drawn = every, -math.inf, -1  # drawn: the epoch the picture shows

    def on_epoch_end(self, state: FitState) -> None:
        if time.monotonic() - self.last >= self.every or state.epoch >= state.epochs:
            self.on_fit_end(state)

    def on_fit_end(self, state: FitState) -> None:
        if state.is_main and self.drawn != state.epoch and self.ready(state):
            self.drawn, self.last = state.epoch, time.monotonic()
            self.redraw(state)

    def ready(self, state: FitState) -> bool:
        return True

    def redraw(self, state: FitState) -> None:
        raise NotImplementedError


class Plotter(Redrawn):
    """``results.png``: loss and metric curves (see :class:`Redrawn` for when)."""

    def ready(self, state: FitState) -> bool:
        return bool(state.history)

    def redraw(self, state: FitState) -> None:
        drawn_or_logged(plot_history, state.history, state.run_dir / "results.png")


def drawn_or_logged(draw: Callable[..., Any], *args: Any) -> None:
    """Draw a plot; a plot that fails is logged and skipped: it never ends a finished run (the weights
    and results.csv are written before any plot)."""
    try:
        draw(*args)
    except Exception as exc:  # any plotting failure (matplotlib, a degenerate history) is not fatal
        name = getattr(draw, "__name__", "a plot")
        log.warning("%s not drawn (%s: %s); the weights and results are saved", name, type(exc).__name__, exc)


def plot_history(history: list[dict[str, float]], path: Path) -> None:
    from cnnkit.viz import pyplot, save_figure

    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    # wall time is not a metric of the model: it stays in results.csv
    keys = [k for k in history[0] if k not in ("epoch", "time") and isinstance(history[0][k], int | float)]
    losses = [k for k in keys if "loss" in k]
    others = [k for k in keys if k not in losses and k != "lr"]
    panels = [losses] + [[k] for k in others]
    cols = min(len(panels), 4)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    epochs = [row.get("epoch", i + 1) for i, row in enumerate(history)]
    for ax, panel in zip(axes.flat, panels):
        for k in panel:
            ax.plot(epochs, [row.get(k, float("nan")) for row in history], marker=".", label=k)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(", ".join(panel) if len(panel) == 1 else "loss")
        ax.grid(alpha=0.3)
        if len(panel) > 1:
            ax.legend()
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    save_figure(fig, path)
