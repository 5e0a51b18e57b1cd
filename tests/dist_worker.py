"""Run under ``torchrun`` (or alone) by tests/test_distributed.py: a tiny fit, or a metric aggregation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from cnnkit.api import create_model
from cnnkit.engine import Callback, FitState, TrainConfig, distributed
from cnnkit.engine.trainer import evaluate, fit, make_loader
from cnnkit.tasks.classify import ClassificationTask
from cnnkit.tasks.coco_eval import CocoEvaluator


def toy_data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 3, 14, 14, generator=g) * 0.5
    for k in range(3):  # a class-dependent bright square makes the task learnable
        x[y == k, k, 3 + 3 * k : 7 + 3 * k, 4:10] += 2.0
    return TensorDataset(x, y)


class StopOnRankOne(Callback):
    """A user callback that asks for a stop on rank 1 only, after the first epoch; it records which
    ranks it ran on."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_epoch_end(self, state: FitState) -> None:
        (self.out / f"callback_rank{state.rank}_epoch{state.epoch}").touch()
        if state.rank == 1 and state.epoch == 1:
            state.stop, state.stop_reason = True, "rank 1 asked to stop"


def run_fit(out: Path, batch: int, accumulate: int, stop: bool = False) -> None:
    torch.manual_seed(0)
    model = create_model("tinyconvnet", num_classes=3, hidden=32)
    cfg = TrainConfig(
        epochs=2,
        batch=batch,
        accumulate=accumulate,
        imgsz=14,
        optimizer="sgd",
        lr=0.05,
        amp="off",
        workers=0,
        quiet=True,
        plots=False,
        warmup_epochs=0,
        grad_clip=None,
    )
    out.mkdir(parents=True, exist_ok=True)
    callbacks = [StopOnRankOne(out)] if stop else []
    result = fit(
        ClassificationTask(3), model, toy_data(96, 0), toy_data(30, 1), cfg, out, callbacks=callbacks
    )
    if distributed.info().is_main:
        torch.save(model.state_dict(), out / "final.pt")
        (out / "metrics.json").write_text(json.dumps({**result.metrics, "epochs_run": len(result.history)}))


def run_metrics(out: Path) -> None:
    """Each rank holds a shard of a known validation set: the combined metrics must be the whole set's."""
    distributed.setup()
    where = distributed.info()
    data = toy_data(31, 2)  # odd size: the shards differ by one sample
    task = ClassificationTask(3)

    class Oracle(torch.nn.Module):  # right on even-indexed labels' classes 0 and 1, always 2 otherwise
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.one_hot(x[:, 0, 0, 0].long().clamp(0, 2), 3).float()

    # put the label into pixel (0, 0, 0) so the oracle's answer is known
    x, y = data.tensors
    pred = torch.where(y < 2, y, torch.zeros_like(y))
    x[:, 0, 0, 0] = pred.float()
    loader = make_loader(TensorDataset(x, y), 4, shuffle=False, workers=0, device=torch.device("cpu"))
    metrics, evaluator = evaluate(task, Oracle(), loader, torch.device("cpu"))
    coco = CocoEvaluator(2)
    rng = np.random.default_rng(0)
    images = []
    for _ in range(9):
        gt = rng.uniform(0, 50, (3, 2))
        boxes = np.concatenate([gt, gt + 20], 1)
        images.append((boxes, rng.integers(0, 2, 3), boxes + rng.normal(0, 3, boxes.shape), rng.random(3)))
    for i in range(where.rank, len(images), where.world_size):
        gb, gl, db, ds = images[i]
        coco.add(gb, gl, db, ds, gl)
    coco.images = distributed.interleave(distributed.gather_objects(coco.images))
    if where.is_main:
        report = {
            "metrics": metrics,
            "count": int(evaluator.confusion.sum()),
            "world": where.world_size,
            "map": coco.compute().stats["mAP"],
        }
        (out / f"metrics_{where.world_size}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode in ("fit", "stop"):
        run_fit(out, int(sys.argv[3]), int(sys.argv[4]), stop=mode == "stop")
    else:
        run_metrics(out)
    distributed.cleanup()
