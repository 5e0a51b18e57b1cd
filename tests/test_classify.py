"""Classification end to end through the CLI and the Python API, transfer learning, and resume after
SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cnnkit.cli import main
from cnnkit.weights import read_metadata
from cnnkit.workflows import run as workflow

TINY = ["--model", "resnet18", "--model-args", '{"width": 0.25}', "--imgsz", "32", "--batch", "32"]
FAST = ["--workers", "1", "--quiet", "--fliplr", "0", "--crop-fraction", "1.0", "--lr", "0.003"]


@pytest.fixture(scope="module")
def pretrained(digits_0_4: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ResNet trained on digits 0-4 through the CLI."""
    project = tmp_path_factory.mktemp("runs")
    args = [
        "train",
        "classify",
        "--data",
        str(digits_0_4),
        *TINY,
        *FAST,
        "--epochs",
        "6",
        "--project",
        str(project),
    ]
    assert main(args) == 0
    return project / "classify" / "exp" / "weights" / "best.safetensors"


def test_train_val_predict_through_the_cli(
    pretrained: Path, digits_0_4: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    meta = read_metadata(pretrained)
    assert meta["class_names"] == ["four", "one", "three", "two", "zero"]
    assert meta["metrics"]["top1"] > 0.8
    capsys.readouterr()
    assert main(["val", "classify", "--weights", str(pretrained), "--data", str(digits_0_4), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # val runs the fast path (folded BatchNorm, bf16 where the CPU has it): within 1% of training's eval
    assert report["metrics"]["top1"] == pytest.approx(meta["metrics"]["top1"], abs=0.01)
    assert (
        main(
            [
                "val",
                "classify",
                "--weights",
                str(pretrained),
                "--data",
                str(digits_0_4),
                "--json",
                "--no-fast",
            ]
        )
        == 0
    )
    exact = json.loads(capsys.readouterr().out)
    assert exact["metrics"]["top1"] == pytest.approx(report["metrics"]["top1"], abs=0.01)
    assert {row["class"] for row in report["per_class"]} == set(meta["class_names"])
    images = sorted((digits_0_4 / "val" / "three").glob("*.png"))[:4]
    assert (
        main(
            [
                "predict",
                "classify",
                "--weights",
                str(pretrained),
                *map(str, images),
                "--json",
                "--topk",
                "2",
                "--out",
                str(tmp_path / "pred"),
            ]
        )
        == 0
    )
    preds = json.loads(capsys.readouterr().out)
    assert [p["path"] for p in preds] == [str(i) for i in images]
    # each image is drawn enlarged, its top classes in yellow in a strip below it
    drawn = np.asarray(Image.open(preds[0]["drawn"]).convert("RGB")).astype(int)
    picture_height = round(Image.open(images[0]).height * 224 / Image.open(images[0]).width)
    assert drawn.shape[1] == 224 and drawn.shape[0] > picture_height
    strip = drawn[picture_height + 2 :]
    text = (strip[..., 0] > 100) & (strip[..., 1] > 100) & (strip[..., 2] < strip[..., :2].min(-1) - 40)
    assert text.sum() > 20 and not strip[:, -40:].any(-1).all()  # yellow text on a black strip
    assert all(len(p["topk"]) == 2 and p["topk"][0]["prob"] >= p["topk"][1]["prob"] for p in preds)
    assert sum(p["topk"][0]["class"] == "three" for p in preds) >= 3
    run = pretrained.parent.parent
    for name in ("results.csv", "results.png", "confusion_matrix.png", "config.yaml"):
        assert (run / name).is_file()


def test_transfer_with_a_frozen_base_learns_new_classes(
    pretrained: Path, digits_5_9: Path, tmp_path: Path
) -> None:
    """The notes' recipe: pretrain on digits 0-4, drop the top, freeze the base, train a head for 5-9."""
    from cnnkit.engine import TrainConfig

    cfg = TrainConfig(epochs=8, batch=32, imgsz=32, lr=0.01, workers=1, quiet=True, plots=False)
    result = workflow.train(
        "classify",
        digits_5_9,
        model=None,
        pretrained=str(pretrained),
        freeze=True,
        fliplr=0,
        crop_fraction=1.0,
        cfg=cfg,
        project=tmp_path,
    )
    assert result.metrics["top1"] > 0.6  # chance is 0.2
    assert 0 < result.trainable_params < 0.01 * result.frozen_params
    assert "trainable" in (result.run_dir / "train.log").read_text()
    # BatchNorm statistics of the base are exactly the pretrained ones.
    before, after = load_file(pretrained), load_file(result.best)
    stats = [k for k in before if "running" in k]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)
    assert not torch.equal(before["head.fc.weight"][:1], after["head.fc.weight"][:1])


def test_two_stage_fine_tuning_in_one_command(pretrained: Path, digits_5_9: Path, tmp_path: Path) -> None:
    args = [
        "train",
        "classify",
        "--data",
        str(digits_5_9),
        "--pretrained",
        str(pretrained),
        "--model",
        "resnet18",
        "--model-args",
        '{"width": 0.25}',
        "--imgsz",
        "32",
        *FAST,
        "--epochs",
        "1",
        "--freeze",
        "--fine-tune-epochs",
        "1",
        "--unfreeze-last",
        "2",
        "--project",
        str(tmp_path),
    ]
    assert main(args) == 0
    run = tmp_path / "classify" / "exp"
    stage1 = load_file(run / "weights" / "best.safetensors")
    stage2 = load_file(run / "finetune" / "weights" / "last.safetensors")
    assert torch.equal(stage1["stem.conv.conv.weight"], stage2["stem.conv.conv.weight"])  # still frozen
    assert not torch.equal(stage1["stages.3.1.conv2.conv.weight"], stage2["stages.3.1.conv2.conv.weight"])
    lrs1 = _column(run / "results.csv", "lr")
    lrs2 = _column(run / "finetune" / "results.csv", "lr")
    assert max(lrs2) <= 0.1 * 0.003 + 1e-12 < max(lrs1)  # stage 2 runs at 0.1x the learning rate


def _column(path: Path, name: str) -> list[float]:
    import csv

    return [float(row[name]) for row in csv.DictReader(path.open())]


def test_killed_run_resumes_to_the_same_weights(digits_5_9: Path, tmp_path: Path) -> None:
    """SIGKILL mid-training, then --resume: the final weights equal an uninterrupted run's."""
    base = [
        sys.executable,
        "-m",
        "cnnkit",
        "train",
        "classify",
        "--data",
        str(digits_5_9),
        *TINY,
        *FAST,
        "--epochs",
        "4",
        "--amp",
        "off",
        "--workers",
        "0",
        "--project",
        str(tmp_path),
    ]
    subprocess.run([*base, "--name", "full"], check=True, capture_output=True)
    proc = subprocess.Popen([*base, "--name", "killed"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = tmp_path / "classify" / "killed" / "results.csv"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if results.exists() and results.read_text().count("\n") >= 3:  # header + 2 epochs
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    state = torch.load(tmp_path / "classify" / "killed" / "weights" / "last.pt", weights_only=True)
    assert 2 <= state["epoch"] < 4  # killed after epoch 2 was saved, before the run ended
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cnnkit",
            "train",
            "classify",
            "--resume",
            str(tmp_path / "classify" / "killed"),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    assert "resuming" in out.stderr
    full = load_file(tmp_path / "classify" / "full" / "weights" / "last.safetensors")
    resumed = load_file(tmp_path / "classify" / "killed" / "weights" / "last.safetensors")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert results.read_text().count("\n") == 5


def test_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "classify", "--data", str(tmp_path / "nope")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert main(["train", "classify", "--resume", str(tmp_path)]) == 2
    assert "cannot resume" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("stage2_best", "best_file", "best_epoch"),
    [(0.8, "weights/best.safetensors", 3), (0.95, "finetune/weights/best.safetensors", 4 + 2)],
)
def test_a_two_stage_run_reports_the_best_of_both_stages(
    tmp_path: Path, stage2_best: float, best_file: str, best_epoch: int
) -> None:
    """Seen: fine-tuning that lowered top-1 reported its own best, not stage 1's better one. Stage 1 here:
    4 epochs, the best (top-1 0.9) at epoch 3; stage 2's best is at its epoch 2."""
    from torch import nn

    from cnnkit.engine.trainer import FitResult
    from cnnkit.weights import save_weights
    from cnnkit.workflows.classify import best_of_both_stages

    weights = tmp_path / "weights"
    save_weights(nn.Linear(2, 2), weights / "best.safetensors", {"epoch": 3, "metrics": {"top1": 0.9}})
    save_weights(nn.Linear(2, 2), weights / "last.safetensors", {"epoch": 4, "metrics": {"top1": 0.7}})
    stage2 = FitResult(tmp_path / "finetune", {}, stage2_best, 2, fitness_key="top1")
    result = best_of_both_stages(tmp_path, stage2)
    assert result.best == tmp_path / best_file
    assert result.best_epoch == best_epoch and result.best_fitness == max(0.9, stage2_best)
