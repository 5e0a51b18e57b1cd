"""The fit loop and the evaluation loop. Task-agnostic: tasks supply the forward, loss and metrics."""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import random
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from cnnkit.engine import distributed as distrib
from cnnkit.engine.callbacks import Callback, Checkpoint, CSVLogger, EarlyStopping, FitState, Plotter
from cnnkit.engine.config import TrainConfig
from cnnkit.engine.device import amp_dtype, autocast, select_device
from cnnkit.engine.ema import ModelEMA
from cnnkit.engine.freeze import count_parameters
from cnnkit.engine.optim import build_optimizer, lr_factor, set_lr
from cnnkit.errors import CnnkitError
from cnnkit.tasks.base import Task

log = logging.getLogger("cnnkit")


class TrainingDiverged(CnnkitError):
    """The loss became NaN or infinite."""


@dataclass
class FitResult:
    run_dir: Path
    metrics: dict[str, float]
    best_fitness: float
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    trainable_params: int = 0
    frozen_params: int = 0

    @property
    def best(self) -> Path:
        return self.run_dir / "weights" / "best.safetensors"

    @property
    def last(self) -> Path:
        return self.run_dir / "weights" / "last.safetensors"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def new_run_dir(root: str | os.PathLike[str], task: str, name: str = "exp", exist_ok: bool = False) -> Path:
    """``root/task/name``, or ``name2``, ``name3``... when it exists (unless ``exist_ok``)."""
    distrib.setup()
    if not distrib.info().is_main:  # every process of a distributed run uses rank 0's directory
        return Path(distrib.broadcast_object(None))
    base = Path(root) / task
    path = base / name
    n = 2
    while path.exists() and not exist_ok:
        path = base / f"{name}{n}"
        n += 1
    path.mkdir(parents=True, exist_ok=True)
    return Path(distrib.broadcast_object(str(path)))


def to_device(obj: Any, device: torch.device, channels_last: bool = False) -> Any:
    if isinstance(obj, torch.Tensor):
        obj = obj.to(device, non_blocking=True)
        if channels_last and obj.ndim == 4 and obj.is_floating_point():
            obj = obj.contiguous(memory_format=torch.channels_last)
        return obj
    if isinstance(obj, dict):
        return {k: to_device(v, device, channels_last) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_device(v, device, channels_last) for v in obj)
    return obj


def make_loader(
    dataset: Dataset[Any],
    batch: int,
    *,
    shuffle: bool,
    workers: int,
    device: torch.device,
    seed: int = 0,
    collate_fn: Any = None,
    drop_last: bool = False,
) -> DataLoader[Any]:
    """A DataLoader over this process's shard (:class:`~cnnkit.engine.distributed.ShardSampler`) whose
    order and worker seeds depend only on ``seed``: reproducible, resumable, and the same global batches
    on any number of processes."""
    generator = torch.Generator().manual_seed(seed)
    where = distrib.info()
    sampler = distrib.ShardSampler(
        len(dataset),  # type: ignore[arg-type]
        shuffle=shuffle,
        seed=seed,
        rank=where.rank,
        world_size=where.world_size,
        batch=batch,
        drop_last=drop_last,
    )
    return DataLoader(
        dataset,
        batch_size=batch,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        generator=generator,
        collate_fn=collate_fn,
        persistent_workers=False,
    )


@torch.no_grad()
def evaluate(
    task: Task,
    model: nn.Module,
    loader: Iterable[Any],
    device: torch.device,
    dtype: torch.dtype | None = None,
    *,
    progress: bool = False,
    channels_last: bool = False,
) -> tuple[dict[str, float], Any]:
    """Run ``model`` in eval mode over ``loader``; returns ``(metrics, evaluator)``."""
    was_training = model.training
    model.eval()
    evaluator = task.evaluator()
    try:
        show = None if progress and distrib.info().is_main else True
        for batch in tqdm(loader, desc="val", leave=False, disable=show):
            batch = to_device(batch, device, channels_last)
            with autocast(device, dtype):
                outputs = model(task.inputs(batch))
            evaluator.update(_to_float(outputs), batch)
    finally:
        model.train(was_training)
    distrib.sync_evaluator(evaluator, device)  # each process saw its shard: combine them
    return evaluator.compute(), evaluator


def _to_float(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, list | tuple):
        return type(obj)(_to_float(o) for o in obj)
    return obj


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
    logging_to = _run_log(run_dir / "train.log") if distrib.info().is_main else contextlib.nullcontext()
    with logging_to:
        return _fit(
            task, model, train_set, val_set, cfg, run_dir, resume, lr_scale, metadata, callbacks, collate_fn
        )


@contextlib.contextmanager
def _run_log(path: Path) -> Iterator[None]:
    """Copy the ``cnnkit`` logger's INFO messages into the run's log file for the duration of a fit."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    old_level = log.level
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()
        log.setLevel(old_level)


def _fit(
    task: Task,
    model: nn.Module,
    train_set: Dataset[Any],
    val_set: Dataset[Any] | None,
    cfg: TrainConfig,
    run_dir: Path,
    resume: str | os.PathLike[str] | None,
    lr_scale: dict[str, float] | None,
    metadata: dict[str, Any] | None,
    callbacks: Sequence[Callback],
    collate_fn: Any,
) -> FitResult:
    where = distrib.info()
    device = distrib.process_device(select_device(cfg.device))
    dtype = amp_dtype(cfg.amp, device)
    seed_everything(cfg.seed)
    if cfg.sync_bn and where.enabled:
        if device.type != "cuda":
            raise CnnkitError("--sync-bn needs CUDA (PyTorch's SyncBatchNorm); on CPU leave it off")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    optimizer = build_optimizer(model, cfg, lr_scale)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    ema = ModelEMA(model, cfg.ema_decay) if cfg.ema else None
    state = FitState(
        run_dir=run_dir, epochs=cfg.epochs, fitness_key=task.fitness, metadata=dict(metadata or {})
    )

    def training_state() -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "ema": ema.state_dict() if ema else None,
            "epoch": state.epoch,
            "step": state.step,
            "best_fitness": state.best_fitness,
            "best_epoch": state.best_epoch,
            "history": state.history,
            "config": cfg.to_dict(),
            "metadata": state.metadata,
            "torch_rng": torch.get_rng_state(),
        }

    if resume is not None:
        ckpt = load_training_state(resume)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None and ckpt["ema"] is not None:
            ema.load_state_dict(ckpt["ema"])
        state.epoch, state.step = int(ckpt["epoch"]), int(ckpt["step"])
        state.best_fitness, state.best_epoch = float(ckpt["best_fitness"]), int(ckpt["best_epoch"])
        state.history = list(ckpt["history"])[: state.epoch]
        log.info("resuming from %s at epoch %d/%d", resume, state.epoch, cfg.epochs)

    state.eval_model = ema.module if ema else model
    state.training_state = training_state
    # Checkpoint first: a row in results.csv then always has its checkpoint on disk.
    # Rank 0 writes; every rank runs early stopping (its metrics are the same everywhere) to stop together.
    cbs: list[Callback] = [Checkpoint(cfg.save_period), CSVLogger()] if where.is_main else []
    if cfg.patience:
        cbs.append(EarlyStopping(cfg.patience))
    if cfg.plots and where.is_main:
        cbs.append(Plotter())
    if where.is_main:
        cbs += list(callbacks)

    trainable, frozen = count_parameters(model)
    log.info(
        "parameters: %s trainable, %s frozen; device %s%s",
        f"{trainable:,}",
        f"{frozen:,}",
        device,
        f", autocast {dtype}" if dtype else "",
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
        (run_dir / "config.yaml").write_text(
            yaml.safe_dump({"train": cfg.to_dict(), **_plain(state.metadata)}, sort_keys=False)
        )
    train_module = task.training_module(model)
    if where.enabled:
        ids = [device.index] if device.type == "cuda" else None
        train_module = nn.parallel.DistributedDataParallel(train_module, device_ids=ids)
    evaluator = None
    for cb in cbs:
        cb.on_fit_start(state)
    for epoch in range(state.epoch, cfg.epochs):
        seed_everything(cfg.seed + epoch)
        loader = make_loader(
            train_set,
            cfg.batch,
            shuffle=True,
            workers=cfg.workers,
            device=device,
            seed=cfg.seed * 1000 + epoch,
            collate_fn=collate_fn,
            drop_last=True,
        )
        start = time.perf_counter()
        train_logs = _train_epoch(
            task, model, train_module, loader, optimizer, scaler, ema, cfg, state, device, dtype, epoch
        )
        train_logs = distrib.all_reduce_mean(train_logs, device)
        metrics: dict[str, float] = {"epoch": epoch + 1, **train_logs}
        if val_set is not None:
            val_loader = make_loader(
                val_set,
                cfg.batch * 2,
                shuffle=False,
                workers=cfg.workers,
                device=device,
                collate_fn=collate_fn,
            )
            val_metrics, evaluator = evaluate(
                task, state.eval_model, val_loader, device, dtype, channels_last=cfg.channels_last
            )
            metrics.update({k: v for k, v in val_metrics.items() if isinstance(v, int | float)})
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        metrics["time"] = round(time.perf_counter() - start, 3)
        state.epoch = epoch + 1
        state.metrics = metrics
        state.history = [*state.history[:epoch], metrics]
        fitness = metrics.get(task.fitness, -metrics.get("train_loss", math.inf))
        state.improved = fitness > state.best_fitness
        if state.improved:
            state.best_fitness, state.best_epoch = fitness, state.epoch
        log.info("epoch %d/%d  %s", state.epoch, cfg.epochs, _fmt_metrics(metrics))
        for cb in cbs:
            cb.on_epoch_end(state)
        if state.stop:
            log.info(state.stop_reason)
            break
    if evaluator is not None and cfg.plots and where.is_main and hasattr(evaluator, "save_plots"):
        evaluator.save_plots(run_dir, state.metadata.get("class_names"))
    for cb in cbs:
        cb.on_fit_end(state)
    if where.enabled:
        # Free DDP (and the communication work it holds) now, not at interpreter exit where gloo's
        # threads can abort the process; then return together, once rank 0's files are written.
        del train_module
        gc.collect()
        distrib.barrier()
    return FitResult(
        run_dir, state.metrics, state.best_fitness, state.best_epoch, state.history, trainable, frozen
    )


def _train_epoch(
    task: Task,
    model: nn.Module,
    train_module: nn.Module,
    loader: DataLoader[Any],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    ema: ModelEMA | None,
    cfg: TrainConfig,
    state: FitState,
    device: torch.device,
    dtype: torch.dtype | None,
    epoch: int,
) -> dict[str, float]:
    model.train()
    micro_batches = len(loader)
    steps_per_epoch = math.ceil(micro_batches / cfg.accumulate)
    sums: dict[str, float] = {}
    count = 0
    bar = tqdm(
        loader,
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        leave=False,
        # None: no bar when stderr is not a terminal; only rank 0 draws one
        disable=True if cfg.quiet or not distrib.info().is_main else None,
        dynamic_ncols=True,
    )
    for i, batch in enumerate(bar):
        batch = to_device(batch, device, cfg.channels_last)
        window_start = i % cfg.accumulate == 0
        step_now = (i + 1) % cfg.accumulate == 0 or i + 1 == micro_batches
        if window_start:
            set_lr(optimizer, cfg.lr, lr_factor(state.step, steps_per_epoch, cfg))
            optimizer.zero_grad(set_to_none=True)
        # Between optimizer steps, DDP need not all-reduce the gradients it accumulates.
        sync: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if not step_now and isinstance(train_module, nn.parallel.DistributedDataParallel):
            sync = train_module.no_sync()
        with sync:
            with autocast(device, dtype):
                outputs = train_module(task.inputs(batch))
                loss, logs = task.loss(outputs, batch)
            if not torch.isfinite(loss):
                last = state.weights_dir / "last.pt"
                kept = (
                    f"the last good checkpoint is {last}"
                    if last.exists()
                    else "no checkpoint was written yet"
                )
                raise TrainingDiverged(
                    f"loss became {loss.item()} at epoch {epoch + 1}, step {state.step + 1}; {kept}. "
                    "Lower --lr, enable --grad-clip, or check the labels."
                )
            window = min(cfg.accumulate, micro_batches - (i - i % cfg.accumulate))
            scaler.scale(loss / window if window > 1 else loss).backward()
        count += 1
        if not step_now:
            continue
        if cfg.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(
                (p for p in model.parameters() if p.grad is not None), cfg.grad_clip
            )
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            ema.update(model)
        state.step += 1
        for k, v in {"loss": loss.item(), **logs}.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        bar.set_postfix(loss=f"{sums['loss'] / count:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    return {f"train_{k}": v / max(count, 1) for k, v in sums.items()}


def load_training_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``last.pt`` written by :func:`fit` (plain tensors and containers; nothing is unpickled)."""
    path = Path(path)
    if path.is_dir():
        path = path / "weights" / "last.pt"
    if not path.is_file():
        raise CnnkitError(
            f"cannot resume: {path} does not exist (pass a run directory or its weights/last.pt)"
        )
    try:
        return dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:
        raise CnnkitError(f"cannot resume from {path}: {exc}") from exc


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
