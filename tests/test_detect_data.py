"""Detection data readers (YOLO, COCO, VOC) and the built-in detection set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.data.builtin import write_detection
from cnnkit.data.detect import read_coco, read_voc, read_yolo
from cnnkit.errors import DataError


@pytest.fixture(scope="module")
def det_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_detection(tmp_path_factory.mktemp("det"), n_train=12, n_val=4)


def test_builtin_yolo_and_coco_describe_the_same_boxes(det_data: Path) -> None:
    yolo, names, report = read_yolo(det_data / "data.yaml", "val")
    coco, coco_names, _ = read_coco(det_data / "annotations" / "instances_val.json", det_data)
    assert names == coco_names and len(names) == 10 and report.summary() == "no problems"
    assert [s.path.name for s in yolo] == [s.path.name for s in coco]
    for a, b in zip(yolo, coco):
        assert torch.equal(a.labels, b.labels)
        torch.testing.assert_close(a.boxes, b.boxes, atol=0.01, rtol=0)
        assert len(a.boxes) >= 1


def _yolo_set(tmp_path: Path, labels: dict[str, str]) -> Path:
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train").mkdir(parents=True)
    for stem, text in labels.items():
        Image.fromarray(np.zeros((50, 100, 3), np.uint8)).save(tmp_path / "images" / "train" / f"{stem}.jpg")
        (tmp_path / "labels" / "train" / f"{stem}.txt").write_text(text)
    (tmp_path / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/train\nnames: [a, b]\n")
    return tmp_path / "data.yaml"


def test_bad_yolo_labels_are_reported_with_file_and_line(tmp_path: Path) -> None:
    data = _yolo_set(
        tmp_path,
        {
            "good": "0 0.5 0.5 0.2 0.2\n1 0.95 0.5 0.2 0.2\n",  # the second box sticks out on the right
            "flat": "0 0.5 0.5 0.0 0.2\n",  # zero width: dropped
            "broken": "0 0.5 0.5 0.2\n",  # four numbers
            "unknown": "0 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.2 0.2\n",  # class 7 of 2
            "empty": "",  # background sample
        },
    )
    samples, _, report = read_yolo(data)
    by_name = {s.path.stem: s for s in samples}
    assert set(by_name) == {"good", "flat", "empty"}
    assert by_name["good"].boxes[1].tolist() == pytest.approx([85.0, 20.0, 100.0, 30.0])  # clipped to 100 px
    assert len(by_name["flat"].boxes) == 0 and len(by_name["empty"].boxes) == 0
    assert sum(report.clipped.values()) == 1 and sum(report.dropped.values()) == 1
    assert any("broken.txt:1: expected 'class cx cy w h'" in p for p in report.problems)
    assert any("unknown.txt:2: class 7 is not among the 2 names" in p for p in report.problems)
    with pytest.raises(DataError, match=r"broken.txt:1"):
        read_yolo(data, strict=True)


def test_coco_missing_images_and_crowds(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "a.png")
    coco = {
        "images": [
            {"id": 1, "file_name": "a.png", "height": 40, "width": 60},
            {"id": 2, "file_name": "gone.png", "height": 40, "width": 60},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 5, 20, 10], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [0, 0, 60, 40], "iscrowd": 1},
        ],
        "categories": [{"id": 3, "name": "cat"}, {"id": 1, "name": "dog"}],
    }
    (tmp_path / "instances_train.json").write_text(json.dumps(coco))
    samples, names, report = read_coco(tmp_path / "instances_train.json")
    assert names == ["dog", "cat"] and len(samples) == 1
    assert samples[0].boxes.tolist() == [[10.0, 5.0, 30.0, 15.0]] and samples[0].labels.tolist() == [1]
    assert any("gone.png" in p for p in report.problems)


def test_voc_reader(tmp_path: Path) -> None:
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    Image.fromarray(np.zeros((50, 80, 3), np.uint8)).save(tmp_path / "JPEGImages" / "0001.jpg")
    (tmp_path / "Annotations" / "0001.xml").write_text(
        "<annotation><filename>0001.jpg</filename>"
        "<object><name>dog</name><bndbox><xmin>11</xmin><ymin>6</ymin><xmax>40</xmax><ymax>30</ymax></bndbox></object>"
        "<object><name>person</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>90</xmax><ymax>50</ymax></bndbox>"
        "</object></annotation>"
    )
    (tmp_path / "ImageSets" / "Main" / "train.txt").write_text("0001\n")
    samples, names, report = read_voc(tmp_path, "train")
    assert len(names) == 20 and names[samples[0].labels[0]] == "dog"
    assert samples[0].boxes.tolist() == [
        [10.0, 5.0, 40.0, 30.0],
        [0.0, 0.0, 80.0, 50.0],
    ]  # 1-based -> 0-based, clipped
    assert sum(report.clipped.values()) == 1


def test_detection_data_resolves_each_published_layout(tmp_path: Path, det_data: Path) -> None:
    from cnnkit.workflows.detect import read_detection_data

    by_yaml = read_detection_data(det_data)  # the folder holding data.yaml
    by_json = read_detection_data(
        det_data / "annotations" / "instances_train.json", val=det_data / "annotations" / "instances_val.json"
    )
    for ds in (by_yaml, by_json):
        assert (len(ds.train), len(ds.val), len(ds.names)) == (12, 4, 10)
    (det_data / "data.yaml").rename(det_data / "data.yaml.off")
    try:
        coco = read_detection_data(det_data)  # now found through annotations/
        assert (len(coco.train), len(coco.val)) == (12, 4)
    finally:
        (det_data / "data.yaml.off").rename(det_data / "data.yaml")
    voc = tmp_path / "VOC"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    for i in range(5):
        Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(voc / "JPEGImages" / f"{i}.jpg")
        (voc / "Annotations" / f"{i}.xml").write_text(
            f"<annotation><filename>{i}.jpg</filename><object><name>cat</name><bndbox><xmin>5</xmin>"
            "<ymin>5</ymin><xmax>20</xmax><ymax>30</ymax></bndbox></object></annotation>"
        )
    split = read_detection_data(voc, val_fraction=0.4)  # no ImageSets: a seeded split
    assert (len(split.train), len(split.val)) == (3, 2) and split.names[: len(split.names)] == [
        "aeroplane",
        *split.names[1:],
    ]
    with pytest.raises(DataError, match="no such file or directory"):
        read_detection_data(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"not a box dataset.*Looked for: an ultralytics"):
        read_detection_data(tmp_path / "empty")
