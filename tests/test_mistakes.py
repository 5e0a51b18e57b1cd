"""A user's mistake is one ``cnnkit: error: ...`` line naming the thing and the fix, exit code 2, and no
file written: bad options, models that cannot take the input, resuming the wrong thing, broken weights
files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cnnkit.cli import main

TINY = ["--model", "mobilenet_v2", "--model-args", '{"width": 0.25}']
QUICK = ["--epochs", "1", "--imgsz", "32", "--batch", "4", "--workers", "0", "--quiet", "--no-plots"]


def tiny_train(data: Path, project: Path) -> list[str]:
    """The command line of a one-epoch classification run of a tiny model: seconds on a CPU."""
    return ["train", "classify", "--data", str(data), *TINY, *QUICK, "--project", str(project)]


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], *expected: str) -> str:
    """Run the CLI in-process: exit code 2, no traceback, and a ``cnnkit: error`` line holding each of
    ``expected``."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors (a flag's value that does not parse)
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    line = next(x for x in err.splitlines() if "error:" in x)
    for text in expected:
        assert text in line, line
    return line


@pytest.fixture(scope="module")
def trained_run(digits_0_4: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = tmp_path_factory.mktemp("runs")
    assert (
        main(["train", "classify", "--data", str(digits_0_4), *TINY, *QUICK, "--project", str(project)]) == 0
    )
    return project / "classify" / "exp"


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--epochs", "0"], ["epochs must be at least 1"]),
        (["--imgsz", "1"], ["imgsz must be at least 8"]),
        (["--lr", "nan"], ["lr must be a finite number"]),
        (["--val-fraction", "1.5"], ["val_fraction must be between 0 and 1"]),
        (["--model-args", "{width:"], ["--model-args", "not valid JSON"]),
        (["--model-args", '{"nonsense": 3}'], ["unexpected keyword argument 'nonsense'"]),
        (
            ["--model", "resnet18", "--model-args", "{}", "--batch", "1"],
            ["--batch 1", "BatchNorm", "--batch 2"],
        ),
        (
            ["--model", "tinyconvnet", "--model-args", "{}"],
            ["tinyconvnet cannot take 32x32 inputs", "--imgsz"],
        ),
    ],
)
def test_bad_training_options(
    digits_0_4: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    expected: list[str],
) -> None:
    argv = ["train", "classify", "--data", str(digits_0_4), *TINY, *QUICK, *flags, "--project", str(tmp_path)]
    one_line_error(capsys, argv, *expected)
    assert not any(tmp_path.iterdir()), "a refused run wrote files"


def test_the_model_check_leaves_the_run_unchanged(digits_0_4: Path, tmp_path: Path) -> None:
    """The training-mode probe restores BatchNorm statistics and the random state."""
    from cnnkit.api import create_model
    from cnnkit.engine.config import TrainConfig
    from cnnkit.engine.loops import check_trainable

    model = create_model("resnet18", num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    check_trainable(model, TrainConfig(imgsz=32, batch=4), "resnet18")
    assert torch.equal(torch.rand(4), expected)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_resume_mistakes(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = str(trained_run)
    one_line_error(
        capsys, ["train", "detect", "--resume", run], "is a classify run", "train classify --resume"
    )
    one_line_error(
        capsys, ["train", "classify", "--resume", run, "--lr", "5", "--model", "vgg11"], "drop --model"
    )
    one_line_error(capsys, ["train", "classify", "--resume", run, "--epochs", "1"], "already trained 1")
    plain = tmp_path / "plain.pt"
    torch.save({"conv.weight": torch.zeros(2)}, plain)
    one_line_error(
        capsys, ["train", "classify", "--resume", str(plain)], "not a training state written by cnnkit"
    )
    one_line_error(capsys, ["train", "classify", "--resume", str(tmp_path / "nothing")], "does not exist")


def test_resume_extends_the_epochs(
    trained_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    with caplog.at_level("INFO", logger="cnnkit"):
        assert main(["train", "classify", "--resume", str(run), "--epochs", "2", "--workers", "0"]) == 0
    assert "the learning-rate schedule is recomputed for 2 epochs" in caplog.text
    rows = (run / "results.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"]
    with safe_open(str(run / "weights" / "last.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["cnnkit.train_config"])["epochs"] == 2


def test_broken_weights_metadata(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    best = trained_run / "weights" / "best.safetensors"
    with safe_open(str(best), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(best))
    images = str(trained_run.parent.parent)  # any folder: the error comes before reading images

    save_file(tensors, str(tmp_path / "nojson.safetensors"), metadata={**meta, "cnnkit.args": "{not json"})
    one_line_error(
        capsys,
        ["predict", "classify", "--weights", str(tmp_path / "nojson.safetensors"), images],
        "nojson.safetensors",
        "'cnnkit.args' is not JSON",
    )
    wide = json.dumps({**json.loads(meta["cnnkit.args"]), "width": 40})
    save_file(tensors, str(tmp_path / "wide.safetensors"), metadata={**meta, "cnnkit.args": wide})
    one_line_error(
        capsys,
        ["val", "classify", "--weights", str(tmp_path / "wide.safetensors")],
        "wide.safetensors",
        "does not match the tensors",
    )
