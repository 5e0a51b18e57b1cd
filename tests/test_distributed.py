"""torch.distributed on CPU (gloo, 2 processes): sharding, metric aggregation, a fit equal to one process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from cnnkit.engine.distributed import ShardSampler, interleave

if TYPE_CHECKING:
    from conftest import CliRun

WORKER = Path(__file__).with_name("dist_worker.py")


def _torchrun(*args: str, nproc: int = 2) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    proc = subprocess.run([*cmd, str(WORKER), *args], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_shards_cover_the_set_once_and_rebuild_the_global_batches() -> None:
    for n, world, batch in ((31, 2, 4), (100, 3, 5), (7, 2, 8)):
        shards = [list(ShardSampler(n, shuffle=True, seed=3, rank=r, world_size=world)) for r in range(world)]
        one = list(ShardSampler(n, shuffle=True, seed=3))
        assert interleave(shards) == one and sorted(one) == list(range(n))
        train = [
            list(ShardSampler(n, shuffle=True, seed=3, rank=r, world_size=world, batch=batch, drop_last=True))
            for r in range(world)
        ]
        assert len({len(t) for t in train}) == 1  # every rank takes the same number of steps
        single = list(ShardSampler(n, shuffle=True, seed=3, batch=batch * world, drop_last=True))
        for k in range(len(train[0]) // batch):  # global batch k is the same samples as one process's
            merged = sorted(i for t in train for i in t[k * batch : (k + 1) * batch])
            assert merged == sorted(single[k * batch * world : (k + 1) * batch * world])


@pytest.mark.slow
def test_two_processes_aggregate_metrics_to_the_single_process_answer(tmp_path: Path) -> None:
    _torchrun("metrics", str(tmp_path))
    _torchrun("metrics", str(tmp_path), nproc=1)
    two = json.loads((tmp_path / "metrics_2.json").read_text())
    one = json.loads((tmp_path / "metrics_1.json").read_text())
    assert two["count"] == one["count"] == 31  # every validation sample exactly once
    # the oracle is right on classes 0 and 1 and answers 0 for class 2: top-1 = share of labels < 2
    assert two["metrics"]["top1"] == pytest.approx(one["metrics"]["top1"], abs=1e-12)
    assert two["map"] == pytest.approx(one["map"], abs=1e-12)


@pytest.mark.slow
def test_two_process_fit_matches_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    _torchrun("fit", str(tmp_path / "two"), "8", "1")
    _torchrun("fit", str(tmp_path / "one"), "16", "1", nproc=1)
    _torchrun("fit", str(tmp_path / "accum"), "8", "2", nproc=1)  # 2 x 8 accumulated = the same batches
    two = torch.load(tmp_path / "two" / "final.pt", weights_only=True)
    one = torch.load(tmp_path / "one" / "final.pt", weights_only=True)
    accum = torch.load(tmp_path / "accum" / "final.pt", weights_only=True)
    for k in one:  # tolerance: only the order of floating-point sums differs (documented in the README)
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(accum[k], one[k], atol=1e-5, rtol=1e-4)
    assert not torch.equal(one["0.weight"], torch.zeros_like(one["0.weight"]))
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["top1"] > 0.5  # it learnt (3 classes: chance 0.33)
    assert (tmp_path / "two" / "weights" / "last.pt").is_file()


def test_a_stop_asked_for_on_one_rank_stops_every_rank(tmp_path: Path) -> None:
    """User callbacks run on every rank; a stop set on rank 1 alone is agreed, so no rank hangs in DDP."""
    _torchrun("stop", str(tmp_path), "8", "1")
    assert (tmp_path / "callback_rank0_epoch1").exists() and (tmp_path / "callback_rank1_epoch1").exists()
    assert not list(tmp_path.glob("callback_*_epoch2"))
    assert json.loads((tmp_path / "metrics.json").read_text())["epochs_run"] == 1


@pytest.mark.slow
def test_cli_nproc_2_classify_and_detect_then_resume(
    tmp_path: Path, digits_0_4: Path, cnnkit_cli: CliRun
) -> None:
    from cnnkit.data.builtin import write_detection

    common = [
        "--epochs",
        "2",
        "--workers",
        "0",
        "--quiet",
        "--project",
        str(tmp_path / "runs"),
        "--nproc",
        "2",
    ]
    classifier = ["--model", "resnet18", "--model-args", '{"width": 0.25}', "--imgsz", "32", "--batch", "16"]
    proc = cnnkit_cli("train", "classify", "--data", str(digits_0_4), *classifier, *common, threads=1)
    assert proc.stdout.count("results in") == 1  # rank 0 reports, once
    run = tmp_path / "runs" / "classify" / "exp"
    rows = (run / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and not (tmp_path / "runs" / "classify" / "exp2").exists()
    cnnkit_cli("train", "classify", "--resume", str(run), "--nproc", "2", threads=1)

    data = write_detection(tmp_path / "det", n_train=32, n_val=10, seed=5)
    detector = ["--backbone-args", '{"width": 0.25}', "--strides", "8", "16", "--imgsz", "64", "--batch", "8"]
    cnnkit_cli("train", "detect", "--data", str(data), *detector, *common, threads=1)
    assert (tmp_path / "runs" / "detect" / "exp" / "weights" / "best.safetensors").is_file()

    failed = cnnkit_cli("train", "detect", "--data", str(tmp_path / "missing"), *common, threads=1, ok=False)
    assert failed.returncode == 2 and re.search(r"process \d of 2 failed", failed.stderr)
    assert "no such file or directory" in failed.stderr
