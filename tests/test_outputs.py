"""No output overwrites an input or another output, an output path that cannot be written is one line,
and file names that are not UTF-8 work everywhere (reading, logs, skipped.txt, prediction files)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from cnnkit.engine.config import TrainConfig
from cnnkit.errors import DataError
from cnnkit.workflows import run
from test_box_layouts import _image, yolo_plain
from test_mistakes import tiny_train

QUICK = TrainConfig(epochs=1, batch=4, imgsz=32, workers=0, quiet=True, plots=False)


def test_no_prediction_overwrites_an_input_or_another_output(tmp_path: Path) -> None:
    """Seen: predict on a/img.png, a/img.jpg and b/img.png wrote one mask file (two results lost)."""
    from cnnkit.cli import main

    yolo_plain(tmp_path / "set")
    cfg = TrainConfig(epochs=1, batch=4, imgsz=32, workers=0, quiet=True, plots=False)
    tiny = {"backbone": "resnet18", "backbone_args": {"width": 0.125}}
    weights = str(run.train("localize", tmp_path / "set", cfg=cfg, project=tmp_path / "runs", **tiny).best)
    for folder, suffix in (("a", ".png"), ("a", ".jpg"), ("b", ".png")):
        _image(tmp_path / "in" / folder / f"img{suffix}", (40, 30))
    records = list(run.predict(weights, [str(tmp_path / "in")], out=str(tmp_path / "out")))
    drawn = {r.data["drawn"] for r in records}
    assert len(records) == 3 and len(drawn) == 3 and all(Path(d).is_file() for d in drawn)
    with pytest.raises(DataError, match="would overwrite an input"):
        list(run.predict(weights, [str(tmp_path / "in" / "a" / "img.png")], out=str(tmp_path / "in" / "a")))
    assert main(["export", "--weights", weights, "--out", weights]) == 2


def test_predict_into_a_file_is_one_line(
    digits_0_4: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cnnkit.cli import main

    weights = run.train(
        "segment", _scenes(tmp_path), cfg=QUICK, project=tmp_path / "runs", model_args={"base": 4}
    ).best
    (tmp_path / "afile").write_text("mine")
    code = main(
        [
            "predict",
            "segment",
            "--weights",
            str(weights),
            str(tmp_path / "scenes" / "images"),
            "--out",
            str(tmp_path / "afile"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "a file stands where a folder is needed" in err and "Traceback" not in err
    assert (tmp_path / "afile").read_text() == "mine"


def _scenes(tmp_path: Path) -> Path:
    from cnnkit.data.scenes import write_scenes

    return write_scenes(tmp_path / "scenes", n_train=8, n_val=4, size=(40, 48), seed=0)


def test_file_names_that_are_not_utf8(
    digits_0_4: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Seen: UnicodeEncodeError while writing skipped.txt aborted the run."""
    from cnnkit.cli import main

    data = tmp_path / "data"
    shutil.copytree(digits_0_4, data)
    folder = data / "train" / "zero"
    first = next(folder.iterdir())
    odd = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: a surrogate escape in Python
    shutil.copy(first, folder / odd)
    (folder / os.fsdecode(b"bad\xff.png")).write_bytes(b"not an image")
    argv = tiny_train(data, tmp_path / "runs")
    assert main(argv) == 0, capsys.readouterr().err
    skipped = (tmp_path / "runs" / "classify" / "exp" / "skipped.txt").read_text()
    assert "bad\\xff.png: cannot decode image" in skipped
    weights = tmp_path / "runs" / "classify" / "exp" / "weights" / "best.safetensors"
    out = tmp_path / "out"
    assert main(["predict", "classify", "--weights", str(weights), str(folder / odd), "--json"]) == 0
    assert "caf" in capsys.readouterr().out
    records = list(run.predict(weights, [str(folder / odd)], out=str(out)))
    assert len(records) == 1
