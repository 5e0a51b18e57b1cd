"""The pieces of a pass over data that training and evaluation share: seeding, run folders and their
log file, reading a run's saved state, loaders, moving batches to the device, and the evaluation loop."""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from cnnkit.data.shard_stream import ShardStream
from cnnkit.engine import distributed as distrib
from cnnkit.engine.config import TrainConfig
from cnnkit.engine.device import autocast
from cnnkit.errors import CnnkitError
from cnnkit.io import make_dir
from cnnkit.tasks.base import Task

log = logging.getLogger("cnnkit")


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
    make_dir(path)
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
    on any number of processes. A :class:`~cnnkit.data.shard_stream.ShardStream` is told its rank, seed and
    length (the sampler's count) and splits itself."""
    generator = torch.Generator().manual_seed(seed)
    where = distrib.info()
    if isinstance(dataset, ShardStream):  # a stream splits itself across ranks and workers
        rank, world = where.rank, where.world_size
        count = distrib.ShardSampler(dataset.total, shuffle=shuffle, rank=rank, world_size=world, batch=batch,
                                     drop_last=drop_last)  # fmt: skip
        dataset.plan(shuffle=shuffle, seed=seed, rank=rank, world=world, length=len(count), batch=batch,
                     cycle=drop_last)  # fmt: skip
        return DataLoader(dataset, batch_size=batch, num_workers=workers, pin_memory=device.type == "cuda",
                          collate_fn=collate_fn)  # fmt: skip
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
    loss_sum, images = 0.0, 0
    try:
        show = None if progress and distrib.info().is_main else True
        for batch in tqdm(loader, desc="val", leave=False, disable=show):
            batch = to_device(batch, device, channels_last)
            with autocast(device, dtype):
                outputs = model(task.inputs(batch))
            outputs = _to_float(outputs)
            evaluator.update(outputs, batch)
            value, n = task.val_loss(outputs, batch), len(task.inputs(batch))
            if value is not None:
                loss_sum, images = loss_sum + value * n, images + n
    finally:
        model.train(was_training)
    distrib.sync_evaluator(evaluator, device)  # each process saw its shard: combine them
    metrics = evaluator.compute()
    if images:  # every task logs one (classification's evaluator computes its own)
        metrics["val_loss"] = distrib.all_reduce_mean({"val_loss": loss_sum / images}, device)["val_loss"]
    return metrics, evaluator


def _to_float(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, list | tuple):
        return type(obj)(_to_float(o) for o in obj)
    return obj


@contextlib.contextmanager
def run_log(path: Path) -> Iterator[None]:
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


def check_trainable(model: nn.Module, cfg: TrainConfig, name: str) -> None:
    """One training-mode forward pass on a blank batch of this run's shape, before any file is written:
    a model that cannot take ``--imgsz`` inputs, or BatchNorm that cannot train on ``--batch`` 1 at this
    size, is a one-line error instead of a traceback in the first step. Buffers (BatchNorm statistics)
    and the random state are restored, so the run is the same as without the check."""
    h, w = cfg.hw
    x = torch.zeros(min(cfg.batch, 2), 3, h, w)
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model.train()
            model(x)
    except ValueError as exc:
        if "Expected more than 1 value per channel" not in str(exc):
            raise
        raise CnnkitError(
            f"--batch {cfg.batch}: {name}'s BatchNorm cannot train on one image at a time at --imgsz "
            f"{cfg.imgsz} (a feature map is 1x1); use --batch 2 or more, or a larger --imgsz"
        ) from None
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CnnkitError(
            f"{name} cannot take {h}x{w} inputs ({first}); try a larger --imgsz or another model"
        ) from None
    finally:
        for b, saved in buffers:
            b.copy_(saved)
        model.train(was_training)
