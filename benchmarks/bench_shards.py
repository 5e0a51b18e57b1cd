"""Images per second delivered to the training loop (decode + train transforms, batched) from WebDataset
shards against the same images in class folders, 2 data-loading workers, one epoch each, alternating.

Run: ``python -m benchmarks.bench_shards [--images 3000] [--size 160] [--pairs 3]``. The first epoch of
each side is reported apart (cold page cache when this process may drop it: root on Linux), then the
median ratio over warm pairs. Goal: shards >= 1.0x the folders.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import header
from cnnkit.data.builtin import write_classification
from cnnkit.engine.config import TrainConfig, config_from_dict
from cnnkit.engine.loops import make_loader
from cnnkit.workflows.shards import pack_data, task_data
from cnnkit.workflows.spec import get_task


def _drop_page_cache() -> bool:
    """Ask Linux to forget cached file pages (root only); whether it did."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _epoch(dataset: Any, batch: int, workers: int, seed: int) -> float:
    """Images per second over one epoch of training batches."""
    loader = make_loader(dataset, batch, shuffle=True, workers=workers, device=torch.device("cpu"), seed=seed,
                         drop_last=True)  # fmt: skip
    images, start = 0, time.perf_counter()
    for x, _ in loader:
        images += len(x)
    return images / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=3000, help="about this many JPEGs (digits, odd sizes)")
    ap.add_argument("--size", type=int, default=160, help="largest image side")
    ap.add_argument("--imgsz", type=int, default=96, help="training input size")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=3, help="warm epochs of each side, alternating")
    args = ap.parse_args(argv)
    print(header("the same images in class folders, cnnkit's folder loader", workers=args.workers))
    spec = get_task("classify")
    with tempfile.TemporaryDirectory() as tmp:
        copies = max(1, round(args.images / 1000))
        sizes = (args.size // 2, args.size)
        folders = write_classification(
            Path(tmp) / "digits", size_range=sizes, copies=copies, ext="jpg", seed=0
        )
        shards = pack_data("classify", folders, Path(tmp) / "shards", shard_size="16MB", progress=False)
        cfg = TrainConfig(imgsz=args.imgsz)
        sets = {}
        for name, source in (("folders", folders), ("shards", shards)):
            opts: Any = config_from_dict(spec.Options, {"data": str(source)}, "bench")
            sets[name] = task_data(spec, opts, cfg).train
        n = sum(1 for _ in folders.rglob("*.jpg"))
        print(f"{n} JPEGs ({args.size // 2}-{args.size} px), batch {args.batch}, {args.workers} workers, "
              f"input {args.imgsz} px; shards: {len(list(shards.glob('*.tar')))} tar files")  # fmt: skip
        cold = {}
        dropped = True
        for name in ("folders", "shards"):
            dropped = _drop_page_cache() and dropped
            cold[name] = _epoch(sets[name], args.batch, args.workers, seed=0)
        state = "cold page cache" if dropped else "page cache NOT dropped (needs root): warm"
        print(f"first epoch ({state}): folders {cold['folders']:.0f} img/s, shards "
              f"{cold['shards']:.0f} img/s, ratio {cold['shards'] / cold['folders']:.3f}x")  # fmt: skip
        ratios: list[float] = []
        rates: dict[str, list[float]] = {"folders": [], "shards": []}
        for k in range(args.pairs):
            order = ("folders", "shards") if k % 2 == 0 else ("shards", "folders")
            got = {name: _epoch(sets[name], args.batch, args.workers, seed=k + 1) for name in order}
            for name in got:
                rates[name].append(got[name])
            ratios.append(got["shards"] / got["folders"])
        print(f"warm epochs: folders {statistics.median(rates['folders']):.0f} img/s, shards "
              f"{statistics.median(rates['shards']):.0f} img/s; speed ratio {statistics.median(ratios):.3f}x "
              f"(goal >= 1.0x; pairs {', '.join(f'{r:.3f}' for r in ratios)})")  # fmt: skip


if __name__ == "__main__":
    main()
