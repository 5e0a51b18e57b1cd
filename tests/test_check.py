"""``cnnkit data check``: for each task, the report's numbers equal what the built-in writers put on disk,
and labels.png / samples.jpg exist and decode; leakage between splits is found."""

from __future__ import annotations

import csv
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnkit.cli import main
from cnnkit.data import builtin
from cnnkit.data.scenes import write_scenes
from cnnkit.workflows.check import CheckReport, check


def pictures_decode(report: CheckReport) -> None:
    assert report.out is not None
    for name in ("labels.png", "samples.jpg"):
        with Image.open(report.out / name) as im:
            im.load()
            assert min(im.size) > 100


def test_classification(digits_0_4: Path, tmp_path: Path) -> None:
    report = check("classify", digits_0_4, out=tmp_path)
    for split in report.splits:
        on_disk = {d.name: len(list(d.iterdir())) for d in (digits_0_4 / split.name).iterdir()}
        assert split.images == sum(on_disk.values())
        assert {report.names[k]: n for k, n in split.per_class.items()} == on_disk
        assert len(split.sizes) == split.images
    assert report.leaked == [] and report.verdict.startswith("verdict: OK")
    pictures_decode(report)


def test_detection_counts_and_leakage(tmp_path: Path) -> None:
    data = builtin.write_detection(tmp_path / "det", n_train=24, n_val=8, seed=0)
    report = check("detect", data, out=tmp_path / "out")
    for split in report.splits:
        labels = sorted((data / "labels" / split.name).glob("*.txt"))
        classes = Counter(int(line.split()[0]) for f in labels for line in f.read_text().splitlines())
        assert split.images == len(labels) and split.per_class == classes
        assert sum(split.objects) == sum(classes.values())
        assert all(0 < w <= 1 and 0 < h <= 1 for _, _, w, h in split.rel_boxes)
    pictures_decode(report)
    first = sorted((data / "images" / "train").iterdir())[0]
    shutil.copy(first, data / "images" / "val" / "copy.png")  # the same bytes in both splits
    shutil.copy(data / "labels" / "train" / f"{first.stem}.txt", data / "labels" / "val" / "copy.txt")
    leaked = check("detect", data, out=None)
    assert [Path(v).name for _, v in leaked.leaked] == ["copy.png"]
    assert "in both train and val (leakage" in leaked.verdict


def test_segmentation_pixel_shares(tmp_path: Path) -> None:
    data = write_scenes(tmp_path / "scenes", n_train=6, n_val=3, size=(32, 40))
    report = check("segment", data, out=tmp_path / "out")
    train = report.splits[0]
    masks = [np.asarray(Image.open(p)) for p in sorted((data / "masks" / "train").iterdir())]
    values, counts = np.unique(np.concatenate([m[m != 255] for m in masks]), return_counts=True)
    assert train.pixels == pytest.approx(dict(zip(values.tolist(), (counts / counts.sum()).tolist())))
    assert train.sizes == [(32, 40)] * 6
    pictures_decode(report)


def test_localization_and_landmarks(tmp_path: Path) -> None:
    data = builtin.write_localization(tmp_path / "loc", n_train=20, n_val=6, seed=0)
    report = check("localize", data, out=None)
    for split in report.splits:
        rows = list(csv.DictReader((data / f"{split.name}.csv").open()))
        assert split.images == len(rows) and split.empty == sum(1 for r in rows if not r["class"])
        assert sum(split.per_class.values()) == sum(1 for r in rows if r["class"])
    points = builtin.write_landmarks(tmp_path / "kites", n_train=10, n_val=4, seed=0)
    report = check("landmarks", points, out=tmp_path / "out")
    assert [s.images for s in report.splits] == [10, 4]
    assert report.splits[0].visible == pytest.approx([1.0] * 4)
    pictures_decode(report)


def test_cli(digits_0_4: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "check", str(digits_0_4), "--task", "classify", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "train: " in out and "verdict: OK" in out and "samples.jpg" in out
    assert main(["data", "check", str(digits_0_4), "--task", "segment", "--no-pictures"]) == 2
    assert "looks like class folders" in capsys.readouterr().err
