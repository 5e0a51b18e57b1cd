"""Scaling of a training run from 1 to 2 processes on this machine (torch.distributed, gloo on CPU).

Run: ``python -m benchmarks.bench_distributed``. The same global batch and steps run in one process
(all threads) and in two processes (half the threads each); the speed ratio is images/s of two
processes over one. On a 2-core machine this measures the overhead of gradient all-reduce more than a
gain: the point of DDP is more devices, not more processes per core.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

GLOBAL_BATCH, STEPS, IMGSZ = 32, 12, 64


def worker(out: Path) -> None:
    from torch.utils.data import TensorDataset

    from cnnkit.api import create_model
    from cnnkit.engine import TrainConfig, distributed
    from cnnkit.engine.trainer import fit
    from cnnkit.tasks.classify import ClassificationTask

    distributed.setup()
    world = distributed.info().world_size
    g = torch.Generator().manual_seed(0)
    n = GLOBAL_BATCH * STEPS
    data = TensorDataset(
        torch.randn(n, 3, IMGSZ, IMGSZ, generator=g), torch.randint(0, 10, (n,), generator=g)
    )
    model = create_model("resnet18", num_classes=10, width=0.5)
    cfg = TrainConfig(
        epochs=2, batch=GLOBAL_BATCH // world, imgsz=IMGSZ, amp="off", workers=0, quiet=True, plots=False
    )
    start = time.perf_counter()
    fit(ClassificationTask(10), model, data, None, cfg, out / f"run{world}")
    elapsed = time.perf_counter() - start
    if distributed.info().is_main:
        (out / f"time{world}.json").write_text(json.dumps({"seconds": elapsed, "images": 2 * n}))


def _launch(nproc: int, out: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // nproc))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    subprocess.run([*cmd, "-m", "benchmarks.bench_distributed", "--worker", str(out)], check=True, env=env)
    r = json.loads((out / f"time{nproc}.json").read_text())
    return r["images"] / r["seconds"]


def main(argv: list[str] | None = None) -> None:
    cores = os.cpu_count()
    print(
        f"# peer: the same run in 1 process; resnet18 x0.5, {IMGSZ} px, global batch {GLOBAL_BATCH}, "
        f"{2 * STEPS} steps, {cores} cores, gloo; torch {torch.__version__}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        rates = {}
        for rnd in range(2):  # alternate the order: 1, 2, then 2, 1
            for nproc in (1, 2) if rnd == 0 else (2, 1):
                rates.setdefault(nproc, []).append(_launch(nproc, Path(tmp)))
        one, two = max(rates[1]), max(rates[2])
        print(f"1 process   {one:8.1f} images/s")
        print(f"2 processes {two:8.1f} images/s   scaling 1 -> 2: {two / one:5.3f}x (best of 2 runs each)")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(Path(sys.argv[2]))
    else:
        main()
