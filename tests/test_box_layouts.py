"""Box datasets as people publish them: every layout written here is read to the pixel, trains a step
of detection and of localization, and converts between YOLO, COCO and VOC without moving a box."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.data.formats import read_box_data, sniff_box_format
from cnnkit.data.formats.convert import convert
from cnnkit.data.localize import read_localization
from cnnkit.engine import TrainConfig
from cnnkit.errors import DataError
from cnnkit.workflows import run

NAMES = ["cat", "dog"]
# (image stem, size (w, h), boxes as (class, x1, y1, x2, y2) in 0-based pixels)
TRAIN = [
    (f"img{i}", (64, 48), [(i % 2, 4 + i, 6, 30 + i, 40), (1 - i % 2, 34, 2 + i, 60, 20 + i)])
    for i in range(6)
]
VAL = [(f"val{i}", (48, 64), [(i % 2, 3, 5, 40, 50 + i)]) for i in range(2)]
Sample = tuple[str, tuple[int, int], list[tuple[int, int, int, int, int]]]


def _image(path: Path, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(path)))
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _voc_xml(stem: str, size: tuple[int, int], boxes: list[tuple[int, int, int, int, int]]) -> str:
    objs = "".join(
        f"<object><name>{NAMES[c]}</name><bndbox><xmin>{x1 + 1}</xmin><ymin>{y1 + 1}</ymin><xmax>{x2}</xmax>"
        f"<ymax>{y2}</ymax></bndbox></object>"
        for c, x1, y1, x2, y2 in boxes
    )
    return (f"<annotation><folder>VOC</folder><filename>{stem}.jpg</filename>"
            f"<path>C:\\Users\\someone\\Desktop\\{stem}.jpg</path><size><width>{size[0]}</width>"
            f"<height>{size[1]}</height><depth>3</depth></size>{objs}</annotation>")  # fmt: skip


def _yolo_txt(size: tuple[int, int], boxes: list[tuple[int, int, int, int, int]]) -> str:
    w, h = size
    return "".join(
        f"{c} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}\n"
        for c, x1, y1, x2, y2 in boxes
    )


def voc_apart(root: Path) -> None:
    """images/ + annotations/*.xml (LabelImg, dataset repositories); a wrong path field; no splits."""
    for stem, size, boxes in TRAIN + VAL:
        _image(root / "images" / f"{stem}.jpg", size)
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"{stem}.xml").write_text(_voc_xml(stem, size, boxes))


def voc_beside(root: Path) -> None:
    """LabelImg's default: the xml next to its image, split folders as Roboflow's VOC export."""
    for split, samples in (("train", TRAIN), ("valid", VAL)):
        for stem, size, boxes in samples:
            _image(root / split / f"{stem}.jpg", size)
            (root / split / f"{stem}.xml").write_text(_voc_xml(stem, size, boxes))


def yolo_plain(root: Path) -> None:
    """images/{train,valid} + labels/{train,valid} + classes.txt, no data.yaml."""
    (root).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(NAMES) + "\n")
    for split, samples in (("train", TRAIN), ("valid", VAL)):
        for stem, size, boxes in samples:
            _image(root / "images" / split / f"{stem}.jpg", size)
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
            (root / "labels" / split / f"{stem}.txt").write_text(_yolo_txt(size, boxes))


def yolo_flat(root: Path) -> None:
    """images/ + labels/ with no split folders and obj.names, no data.yaml."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "obj.names").write_text("\n".join(NAMES) + "\n")
    for stem, size, boxes in TRAIN + VAL:
        _image(root / "images" / f"{stem}.png", size)
        (root / "labels").mkdir(parents=True, exist_ok=True)
        (root / "labels" / f"{stem}.txt").write_text(_yolo_txt(size, boxes))


def yolo_beside(root: Path) -> None:
    """LabelImg's YOLO mode: txt beside each image, classes.txt; one image not annotated yet."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(NAMES) + "\n")
    for stem, size, boxes in TRAIN + VAL:
        _image(root / f"{stem}.jpg", size)
        (root / f"{stem}.txt").write_text(_yolo_txt(size, boxes))
    _image(root / "unlabelled.jpg", (32, 32))


def darknet(root: Path) -> None:
    """Darknet: obj/ with images and txt, train.txt/valid.txt lists of data/obj/..., obj.names."""
    (root / "obj").mkdir(parents=True, exist_ok=True)
    (root / "obj.names").write_text("\n".join(NAMES) + "\n")
    for listing, samples in (("train.txt", TRAIN), ("valid.txt", VAL)):
        for stem, size, boxes in samples:
            _image(root / "obj" / f"{stem}.jpg", size)
            (root / "obj" / f"{stem}.txt").write_text(_yolo_txt(size, boxes))
        (root / listing).write_text("".join(f"data/obj/{stem}.jpg\n" for stem, _, _ in samples))


def coco_per_split(root: Path) -> None:
    """train/_annotations.coco.json and valid/_annotations.coco.json beside the images."""
    for split, samples in (("train", TRAIN), ("valid", VAL)):
        images, anns = [], []
        for i, (stem, size, boxes) in enumerate(samples):
            _image(root / split / f"{stem}.jpg", size)
            images.append({"id": i, "file_name": f"{stem}.jpg", "width": size[0], "height": size[1]})
            anns += [
                {"id": len(anns), "image_id": i, "category_id": c + 1, "bbox": [x1, y1, x2 - x1, y2 - y1]}
                for c, x1, y1, x2, y2 in boxes
            ]
        cats = [{"id": k + 1, "name": n} for k, n in enumerate(NAMES)]
        doc = {"images": images, "annotations": anns, "categories": cats}
        (root / split / "_annotations.coco.json").write_text(json.dumps(doc))


def labelme(root: Path) -> None:
    """LabelMe: a JSON per image beside it; the first box a rectangle, the second a polygon."""
    for stem, size, boxes in TRAIN + VAL:
        _image(root / f"{stem}.jpg", size)
        shapes = []
        for k, (c, x1, y1, x2, y2) in enumerate(boxes):
            pts = [[x1, y1], [x2, y2]] if k == 0 else [[x1, y1], [x2, y1], [x2, y2], [x1, y2]]
            shapes.append(
                {"label": NAMES[c], "points": pts, "shape_type": "rectangle" if k == 0 else "polygon"}
            )
        doc = {
            "version": "5.0",
            "shapes": shapes,
            "imagePath": f"..\\old\\{stem}.jpg",
            "imageHeight": size[1],
        }
        (root / f"{stem}.json").write_text(json.dumps(doc))


def createml(root: Path) -> None:
    """CreateML: train/_annotations.createml.json (centre x, y and size in pixels)."""
    for split, samples in (("train", TRAIN), ("valid", VAL)):
        entries = []
        for stem, size, boxes in samples:
            _image(root / split / f"{stem}.jpg", size)
            anns = [{"label": NAMES[c], "coordinates": {"x": (x1 + x2) / 2, "y": (y1 + y2) / 2,
                     "width": x2 - x1, "height": y2 - y1}} for c, x1, y1, x2, y2 in boxes]  # fmt: skip
            entries.append({"image": f"{stem}.jpg", "annotations": anns})
        (root / split / "_annotations.createml.json").write_text(json.dumps(entries))


def box_csv(root: Path) -> None:
    """train.csv + valid.csv (one row per box, TensorFlow's columns) and images/."""
    for name, samples in (("train.csv", TRAIN), ("valid.csv", VAL)):
        rows = ["filename,width,height,class,xmin,ymin,xmax,ymax"]
        for stem, size, boxes in samples:
            _image(root / "images" / f"{stem}.jpg", size)
            rows += [
                f"{stem}.jpg,{size[0]},{size[1]},{NAMES[c]},{x1},{y1},{x2},{y2}"
                for c, x1, y1, x2, y2 in boxes
            ]
        (root / name).write_text("\n".join(rows) + "\n")


LAYOUTS: dict[str, tuple[Callable[[Path], None], bool]] = {  # writer, whether it has a validation split
    "voc_apart": (voc_apart, False),
    "voc_beside": (voc_beside, True),
    "yolo_plain": (yolo_plain, True),
    "yolo_flat": (yolo_flat, False),
    "yolo_beside": (yolo_beside, False),
    "darknet": (darknet, True),
    "coco_per_split": (coco_per_split, True),
    "labelme": (labelme, False),
    "createml": (createml, True),
    "box_csv": (box_csv, True),
}


def _truth(samples: list[Sample], names: list[str]) -> dict[str, list[tuple[str, list[float]]]]:
    return {
        stem: sorted((NAMES[c], [x1, y1, x2, y2]) for c, x1, y1, x2, y2 in boxes)
        for stem, _, boxes in samples
    }


def _read(data: object) -> dict[str, list[tuple[str, list[float]]]]:
    out = {}
    for s in [*data.train, *data.val]:  # type: ignore[attr-defined]
        names = data.names  # type: ignore[attr-defined]
        out[s.path.stem] = sorted(
            (names[int(c)], [round(v, 3) for v in b]) for b, c in zip(s.boxes.tolist(), s.labels)
        )
    return out


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_published_layout_reads_to_the_pixel(
    layout: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write, has_val = LAYOUTS[layout]
    write(tmp_path / layout)
    assert sniff_box_format(tmp_path / layout) is not None
    with caplog.at_level("INFO"):
        data = read_box_data(tmp_path / layout, val_fraction=0.25)
    assert sorted(data.names) == NAMES
    assert _read(data) == _truth(TRAIN + VAL, NAMES)
    if has_val:
        assert sorted(s.path.stem for s in data.val) == ["val0", "val1"]
    else:
        assert "seeded 75/25 split" in caplog.text
    assert data.found in caplog.text
    if layout == "yolo_beside":
        assert any("unlabelled.jpg" in where for where, _ in data.report.items)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_layout_trains_detection_and_localization(layout: str, tmp_path: Path) -> None:
    LAYOUTS[layout][0](tmp_path / layout)
    cfg = TrainConfig(epochs=1, batch=4, imgsz=32, workers=0, quiet=True, plots=False, warmup_epochs=0)
    tiny = {"backbone": "resnet18", "backbone_args": {"width": 0.125}}
    det = run.train("detect", tmp_path / layout, strides=(16, 32), anchors_per_scale=1, cfg=cfg,
                    project=tmp_path / "runs", **tiny)  # fmt: skip
    loc = run.train("localize", tmp_path / layout, cfg=cfg, project=tmp_path / "runs", **tiny)
    assert det.best.is_file() and loc.best.is_file()
    train, val, _, _ = read_localization(tmp_path / layout, val_fraction=0.25)
    largest = {s.path.stem: s.box for s in [*train, *(val or [])]}
    assert largest["img0"] == pytest.approx((4.0, 6.0, 30.0, 40.0), abs=1e-3)  # the larger of its two


@pytest.mark.parametrize(("first", "second"), [("yolo", "coco"), ("coco", "voc"), ("voc", "yolo")])
def test_conversions_round_trip_to_the_pixel(first: str, second: str, tmp_path: Path) -> None:
    voc_beside(tmp_path / "src")
    convert(tmp_path / "src", first, tmp_path / first)
    convert(tmp_path / first, second, tmp_path / second)
    original = _read(read_box_data(tmp_path / "src"))
    for out in (first, second):
        again = read_box_data(tmp_path / out)
        assert sorted(again.names) == NAMES
        assert _read(again) == original, out
        assert sorted(s.path.stem for s in again.val) == ["val0", "val1"]  # the split is kept
    with pytest.raises(DataError, match="not empty"):
        convert(tmp_path / "src", "coco", tmp_path / first)  # never overwrites an output


def test_near_misses_say_what_was_found(tmp_path: Path) -> None:
    voc_apart(tmp_path / "noimages")
    for p in (tmp_path / "noimages" / "images").iterdir():
        p.unlink()
    with pytest.raises(DataError, match=r"found 8 .xml files in annotations/ but no images named like them"):
        read_box_data(tmp_path / "noimages")
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DataError, match=r"Closest: found 1 YOLO-like \.txt label files but no images"):
        read_box_data(tmp_path / "labels")
    yolo_plain(tmp_path / "nonames")
    (tmp_path / "nonames" / "classes.txt").unlink()
    data = read_box_data(tmp_path / "nonames")
    assert data.names == ["class0", "class1"]
    assert torch.equal(data.train[0].labels, torch.tensor([0, 1]))


def test_data_convert_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cnnkit.cli import main

    labelme(tmp_path / "src")
    assert main(["data", "convert", str(tmp_path / "src"), "--to", "yolo", "--out", str(tmp_path / "y")]) == 0
    assert (tmp_path / "y" / "data.yaml").is_file()
    assert _read(read_box_data(tmp_path / "y")) == _read(read_box_data(tmp_path / "src"))
    assert (
        main(["data", "convert", str(tmp_path / "src"), "--to", "voc", "--out", str(tmp_path / "src" / "v")])
        == 2
    )
    assert "inside the source dataset" in capsys.readouterr().err
