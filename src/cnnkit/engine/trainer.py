"""The fit loop: a small :class:`Trainer` whose step-level extras (clipping, EMA, the NaN guard) and
epoch-level ones (checkpoints, CSV log, early stopping, plots) are hooks. Task-agnostic: tasks supply
the forward, loss and metrics."""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from cnnkit.engine import distributed as distrib
from cnnkit.engine.callbacks import (
    Callback,
    Checkpoint,
    CSVLogger,
    EarlyStopping,
    EMAUpdate,
    FitState,
    GradClip,
    NanGuard,
    Plotter,
    TrainingDiverged,
    drawn_or_logged,
)
from cnnkit.engine.config import TrainConfig
from cnnkit.engine.device import amp_dtype, autocast, select_device
from cnnkit.engine.ema import ModelEMA
from cnnkit.engine.freeze import count_parameters
from cnnkit.engine.loggers import make_loggers
from cnnkit.engine.loops import (
    evaluate,
    load_training_state,
    make_loader,
    new_run_dir,
    run_log,
    seed_everything,
    to_device,
)
from cnnkit.engine.optim import build_optimizer, lr_factor, set_lr
from cnnkit.engine.pictures import Pictures
from cnnkit.errors import CnnkitError
from cnnkit.tasks.base import Task

__all__ = [
    "FitResult",
    "Trainer",
    "TrainingDiverged",
    "evaluate",
    "fit",
    "load_training_state",
    "make_loader",
    "new_run_dir",
    "seed_everything",
    "to_device",
]

log = logging.getLogger("cnnkit")


@dataclass
class FitResult:
    run_dir: Path
    metrics: dict[str, float]
    best_fitness: float
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    trainable_params: int = 0
    frozen_params: int = 0
    fitness_key: str = "fitness"  # the metric that picked the best epoch
    #: The best weights when they are not this run folder's own (the earlier stage of a two-stage run).
    best_file: Path | None = None

    @property
    def best(self) -> Path:
        return self.best_file or self.run_dir / "weights" / "best.safetensors"

    @property
    def last(self) -> Path:
        return self.run_dir / "weights" / "last.safetensors"


class Trainer:
    """Owns the model, optimizer, scaler and EMA of one fit; :meth:`fit` runs the epochs.

    Hooks (:class:`~cnnkit.engine.callbacks.Callback`) run on every rank, the built-in ones first:
    NaN guard and gradient clipping after backward, the EMA update after the step, then checkpointing,
    the CSV log, early stopping, plots, and the caller's hooks at the end of each epoch.
    """

    def __init__(
        self,
        task: Task,
        model: nn.Module,
        train_set: Dataset[Any],
        val_set: Dataset[Any] | None,
        cfg: TrainConfig,
        run_dir: Path,
        *,
        lr_scale: dict[str, float] | None = None,
        metadata: dict[str, Any] | None = None,
        callbacks: Sequence[Callback] = (),
        collate_fn: Any = None,
    ) -> None:
        where = distrib.info()
        self.task, self.cfg, self.run_dir = task, cfg, run_dir
        self.train_set, self.val_set, self.collate_fn = train_set, val_set, collate_fn
        self.device = distrib.process_device(select_device(cfg.device))
        self.dtype = amp_dtype(cfg.amp, self.device)
        seed_everything(cfg.seed)
        if cfg.sync_bn and where.enabled:
            if self.device.type != "cuda":
                raise CnnkitError("--sync-bn needs CUDA (PyTorch's SyncBatchNorm); on CPU leave it off")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(self.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.model = model
        self.optimizer = build_optimizer(model, cfg, lr_scale)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype is torch.float16)
        self.ema = ModelEMA(model, cfg.ema_decay) if cfg.ema else None
        self.state = FitState(
            run_dir=run_dir,
            epochs=cfg.epochs,
            fitness_key=task.fitness,
            metadata=dict(metadata or {}),
            is_main=where.is_main,
            rank=where.rank,
            world_size=where.world_size,
        )
        self.state.eval_model = self.ema.module if self.ema else model
        self.state.training_state = self.state_dict
        self.hooks: list[Callback] = [NanGuard()]
        if cfg.grad_clip:
            self.hooks.append(GradClip(model, self.optimizer, self.scaler, cfg.grad_clip))
        if self.ema is not None:
            self.hooks.append(EMAUpdate(self.ema, model))
        # Checkpoint before the CSV row: a row in results.csv always has its checkpoint on disk.
        self.hooks += [Checkpoint(cfg.save_period), CSVLogger()]
        if cfg.patience:
            self.hooks.append(EarlyStopping(cfg.patience))
        if cfg.plots:
            self.hooks += [Plotter(), Pictures(task, val_set, collate_fn)]
        self.hooks += make_loggers(cfg.log)
        self.hooks += list(callbacks)
        self.train_module = task.training_module(model)
        if where.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_module = nn.parallel.DistributedDataParallel(self.train_module, device_ids=ids)
        self.evaluator: Any = None
        self._epoch_start = time.perf_counter()
        self._steps_per_epoch = 1

    # -- resumable state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        s = self.state
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "epoch": s.epoch,
            "step": s.step,
            "best_fitness": s.best_fitness,
            "best_epoch": s.best_epoch,
            "history": s.history,
            "config": self.cfg.to_dict(),
            "metadata": s.metadata,
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt["ema"] is not None:
            self.ema.load_state_dict(ckpt["ema"])
        s = self.state
        s.epoch, s.step = int(ckpt["epoch"]), int(ckpt["step"])
        s.best_fitness, s.best_epoch = float(ckpt["best_fitness"]), int(ckpt["best_epoch"])
        s.history = list(ckpt["history"])[: s.epoch]

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self) -> FitResult:
        self._log_start()
        for hook in self.hooks:
            hook.on_fit_start(self.state)
        for epoch in range(self.state.epoch, self.cfg.epochs):
            self._end_epoch(epoch, self.train_epoch(epoch))
            if self.state.stop:
                log.info(self.state.stop_reason or "stopped by a callback")
                break
        plots = self.cfg.plots and self.state.is_main and hasattr(self.evaluator, "save_plots")
        if plots:
            drawn_or_logged(self.evaluator.save_plots, self.run_dir, self.state.metadata.get("class_names"))
        for hook in self.hooks:
            hook.on_fit_end(self.state)
        if distrib.info().enabled:
            # Free DDP (and the communication work it holds) now, not at interpreter exit where gloo's
            # threads can abort the process; then return together, once rank 0's files are written.
            del self.train_module
            gc.collect()
            distrib.barrier()
        trainable, frozen = count_parameters(self.model)
        s = self.state
        return FitResult(
            self.run_dir, s.metrics, s.best_fitness, s.best_epoch, s.history, trainable, frozen, s.fitness_key
        )

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training data; returns the mean of each loss term over its micro-batches."""
        cfg = self.cfg
        seed_everything(cfg.seed + epoch)
        loader = self._loader(self.train_set, cfg.batch, shuffle=True, seed=cfg.seed * 1000 + epoch)
        self.model.train()
        bar = tqdm(
            loader,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            leave=False,
            # None: no bar when stderr is not a terminal; only rank 0 draws one
            disable=True if cfg.quiet or not self.state.is_main else None,
            dynamic_ncols=True,
        )
        self._epoch_start = time.perf_counter()
        self._steps_per_epoch = math.ceil(len(loader) / cfg.accumulate)
        sums: dict[str, float] = {}
        batches = len(loader)
        for i, batch in enumerate(bar):
            start = i - i % cfg.accumulate
            window = min(cfg.accumulate, batches - start)
            logs = self.run_step(batch, first=i == start, last=i == start + window - 1, window=window)
            for k, v in logs.items():  # every micro-batch counts, whatever --accumulate is
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(
                loss=f"{sums['loss'] / (i + 1):.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}"
            )
        return {f"train_{k}": v / max(batches, 1) for k, v in sums.items()}

    def run_step(self, batch: Any, *, first: bool, last: bool, window: int) -> dict[str, float]:
        """Forward and backward of one micro-batch; the optimizer steps after the ``last`` of a window of
        ``window`` micro-batches (gradient accumulation). Returns the micro-batch's loss terms."""
        s, cfg = self.state, self.cfg
        if first:
            set_lr(self.optimizer, cfg.lr, lr_factor(s.step, self._steps_per_epoch, cfg))
            self.optimizer.zero_grad(set_to_none=True)
            s.window_loss = None
            for hook in self.hooks:
                hook.before_step(s)
        batch = s.batch = to_device(batch, self.device, cfg.channels_last)
        # Between optimizer steps, DDP need not all-reduce the gradients it accumulates.
        sync: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if not last and isinstance(self.train_module, nn.parallel.DistributedDataParallel):
            sync = self.train_module.no_sync()
        with sync:
            with autocast(self.device, self.dtype):
                outputs = self.train_module(self.task.inputs(batch))
                loss, logs = self.task.loss(outputs, batch)
            self.scaler.scale(loss / window if window > 1 else loss).backward()
        detached = loss.detach().float()
        s.window_loss = detached if s.window_loss is None else s.window_loss + detached
        if last:
            for hook in self.hooks:
                hook.after_backward(s)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            s.step += 1
            for hook in self.hooks:
                hook.after_step(s)
            s.batch = None  # not held on the device through validation
        return {"loss": float(detached), **{k: float(v) for k, v in logs.items()}}  # a task's "loss" wins

    def validate(self) -> dict[str, float]:
        if self.val_set is None:
            return {}
        loader = self._loader(self.val_set, self.cfg.batch * 2, shuffle=False)
        assert self.state.eval_model is not None
        model, cl = self.state.eval_model, self.cfg.channels_last
        metrics, self.evaluator = evaluate(
            self.task, model, loader, self.device, self.dtype, channels_last=cl
        )
        return {k: v for k, v in metrics.items() if isinstance(v, int | float)}

    # -- helpers ----------------------------------------------------------------------------------
    def _end_epoch(self, epoch: int, train_logs: dict[str, float]) -> None:
        s = self.state
        metrics: dict[str, float] = {"epoch": epoch + 1, **distrib.all_reduce_mean(train_logs, self.device)}
        metrics.update(self.validate())
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        metrics["time"] = round(time.perf_counter() - self._epoch_start, 3)
        s.epoch, s.metrics = epoch + 1, metrics
        s.history = [*s.history[:epoch], metrics]
        fitness = metrics.get(self.task.fitness, -metrics.get("train_loss", math.inf))
        s.improved = fitness > s.best_fitness
        if s.improved:
            s.best_fitness, s.best_epoch = fitness, s.epoch
        log.info("epoch %d/%d  %s", s.epoch, self.cfg.epochs, _fmt_metrics(metrics))
        for hook in self.hooks:
            hook.on_epoch_end(s)
        s.stop = distrib.any_rank(s.stop, self.device)  # a stop asked for on one rank stops every rank

    def _loader(self, dataset: Dataset[Any], batch: int, *, shuffle: bool, seed: int = 0) -> DataLoader[Any]:
        return make_loader(
            dataset,
            batch,
            shuffle=shuffle,
            workers=self.cfg.workers,
            device=self.device,
            seed=seed,
            collate_fn=self.collate_fn,
            drop_last=shuffle,
        )

    def _log_start(self) -> None:
        where, cfg = distrib.info(), self.cfg
        trainable, frozen = count_parameters(self.model)
        autocast_note = f", autocast {self.dtype}" if self.dtype else ""
        log.info(
            "parameters: %s trainable, %s frozen; device %s%s",
            f"{trainable:,}",
            f"{frozen:,}",
            self.device,
            autocast_note,
        )
        if where.enabled:
            log.info(
                "distributed: %d processes (%s); global batch %d = %d per process x %d x %d accumulation",
                where.world_size,
                torch.distributed.get_backend(),
                cfg.batch * where.world_size * cfg.accumulate,
                cfg.batch,
                where.world_size,
                cfg.accumulate,
            )
        if where.is_main:
            config = {"train": cfg.to_dict(), **_plain(self.state.metadata)}
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def fit(
    task: Task,
    model: nn.Module,
    train_set: Dataset[Any],
    val_set: Dataset[Any] | None,
    cfg: TrainConfig,
    run_dir: Path,
    *,
    resume: str | os.PathLike[str] | None = None,
    lr_scale: dict[str, float] | None = None,
    metadata: dict[str, Any] | None = None,
    callbacks: Sequence[Callback] = (),
    collate_fn: Any = None,
) -> FitResult:
    """Train ``model`` on ``train_set`` for ``cfg.epochs`` epochs, validating on ``val_set`` each epoch.

    Checkpoints, CSV log and plots go to ``run_dir``. With ``resume`` (a ``last.pt``), model, optimizer,
    EMA and counters are restored and training continues where it stopped; every epoch reseeds from
    ``cfg.seed + epoch``, so a resumed CPU run ends with the same weights as an uninterrupted one.
    """
    distrib.setup(cfg.device)
    run_dir.mkdir(parents=True, exist_ok=True)
    logging_to = run_log(run_dir / "train.log") if distrib.info().is_main else contextlib.nullcontext()
    with logging_to:
        trainer = Trainer(
            task,
            model,
            train_set,
            val_set,
            cfg,
            run_dir,
            lr_scale=lr_scale,
            metadata=metadata,
            callbacks=callbacks,
            collate_fn=collate_fn,
        )
        if resume is not None:
            trainer.load_state_dict(load_training_state(resume))
            log.info("resuming from %s at epoch %d/%d", resume, trainer.state.epoch, cfg.epochs)
        return trainer.fit()


def _fmt_metrics(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "epoch")


def _plain(obj: Any) -> Any:
    """A YAML-safe copy (tuples to lists, unknown objects to strings)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    return str(obj)
