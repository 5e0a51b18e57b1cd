"""Never train on garbage: every reader of every task walks folders safely, reports a bad sample with
its file and line (or annotation), skips it, and stops on it with ``strict``; generated label files
(hypothesis) never get past a reader as non-finite or out-of-image boxes, nor crash it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cnnkit.data.classify import scan_image_folder
from cnnkit.data.formats import read_box_data
from cnnkit.data.formats.coco import read_coco
from cnnkit.data.formats.yolo import read_yolo_images
from cnnkit.data.localize import read_landmarks_csv, read_localization_csv
from cnnkit.data.report import DataReport
from cnnkit.data.walk import walk
from cnnkit.errors import DataError


def png(path: Path, w: int = 40, h: int = 30) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(path)
    return path


# -- walking folders ----------------------------------------------------------------------------------
def test_walk_skips_loops_hidden_files_broken_links_and_counts_files_once(tmp_path: Path) -> None:
    root = tmp_path / "data"
    png(root / "cat" / "a.png")
    png(root / "cat" / ".hidden.png")
    png(root / "cat" / ".ipynb_checkpoints" / "a-checkpoint.png")
    png(root / "dog" / "b.png")
    os.symlink("..", root / "cat" / "up")  # a loop: the class would contain the whole dataset
    os.symlink(".", root / "dog" / "self")
    os.symlink(root / "dog" / "b.png", root / "cat" / "alias.png")  # the same file twice
    os.symlink(tmp_path / "gone.png", root / "dog" / "broken.png")
    png(tmp_path / "elsewhere" / "c.png")
    os.symlink(tmp_path / "elsewhere", root / "dog" / "more")  # outside: followed, and said
    found = walk(root, lambda n: n.endswith(".png"))
    assert [p.relative_to(root).as_posix() for p in found.files] == [
        "cat/a.png",
        "cat/alias.png",
        "dog/more/c.png",
    ]
    assert {p.name for p in found.loops} == {"up", "self"}
    assert {p.name for p in found.hidden} == {".hidden.png", ".ipynb_checkpoints"}
    assert [p.name for p in found.broken] == ["broken.png"] and [p.name for p in found.twice] == ["b.png"]
    assert [p.name for p in found.outside] == ["more"]
    assert any("symlink loops not followed" in line for line in found.notes(root))


def test_class_folders_loop_and_empty_class(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for c in ("cat", "dog"):
        png(root / c / "x.png")
    os.symlink("..", root / "cat" / "up")
    samples, names = scan_image_folder(root)
    assert names == ["cat", "dog"] and len(samples) == 2  # not the whole dataset again under "cat"
    (root / "empty").mkdir()
    with pytest.raises(DataError, match=r"class folders \['empty'\] hold no images"):
        scan_image_folder(root)
    assert len(scan_image_folder(root, empty_ok=True)[0]) == 2  # a validation folder may lack a class


# -- box labels ---------------------------------------------------------------------------------------
def yolo_set(tmp_path: Path, labels: dict[str, str | None]) -> list[Path]:
    images = []
    for name, text in labels.items():
        images.append(png(tmp_path / "images" / f"{name}.png", 40, 30))
        if text is not None:
            (tmp_path / "labels").mkdir(exist_ok=True)
            (tmp_path / "labels" / f"{name}.txt").write_text(text)
    return images


def test_yolo_non_finite_absurd_repeated_and_missing_labels(tmp_path: Path) -> None:
    images = yolo_set(
        tmp_path,
        {
            "ok": "0 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2 0.2\n",  # one box twice
            "inf": "0 0.5 0.5 0.2 0.2\n0 0.5 0.5 inf 0.2\n",
            "nan": "0 nan 0.5 0.2 0.2\n",
            "huge": "0 0.5 0.5 1e9 0.2\n",
            "background": None,
        },
    )
    samples, report = read_yolo_images(images, ["a", "b"])
    assert [s.path.stem for s in samples] == ["ok", "background"]
    assert len(samples[0].boxes) == 2 and report.duplicates[str(tmp_path / "labels" / "ok.txt")] == 1
    where = dict(report.items)
    assert "non-finite" in where[f"{tmp_path / 'labels' / 'inf.txt'}:2"]
    assert "non-finite" in where[f"{tmp_path / 'labels' / 'nan.txt'}:1"]
    assert "absurd" in where[f"{tmp_path / 'labels' / 'huge.txt'}:1"]
    assert "1 images have no label file (treated as background)" in report.summary()
    with pytest.raises(DataError, match=r"inf.txt:2: non-finite"):
        read_yolo_images(images, ["a", "b"], strict=True)


def coco_set(tmp_path: Path, annotations: list[dict], images: list[dict] | None = None) -> Path:
    png(tmp_path / "images" / "a.png")
    png(tmp_path / "images" / "b.png")
    doc = {
        "images": images
        or [{"id": 1, "file_name": "a.png", "height": 30, "width": 40}, {"id": 2, "file_name": "b.png"}],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "thing"}],
    }
    path = tmp_path / "annotations" / "instances_train.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ({"category_id": 7, "bbox": [1, 1, 5, 5]}, "unknown category 7"),
        ({"category_id": 1, "bbox": [1, 2, 3]}, "needs 'bbox'"),
        ({"category_id": 1}, "needs 'bbox'"),
        ({"category_id": 1, "bbox": [1, "x", 3, 4]}, "not 4 numbers"),
        ({"category_id": 1, "bbox": [1, 1, float("nan"), 4]}, "non-finite"),
    ],
)
def test_coco_malformed_annotation_skips_its_image(tmp_path: Path, bad: dict, why: str) -> None:
    anns = [
        {"id": 10, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10]},
        {"id": 11, "image_id": 1, **bad},
        {"id": 12, "image_id": 2, "category_id": 1, "bbox": [2, 2, 10, 10]},
    ]
    samples, _, report = read_coco(coco_set(tmp_path, anns))
    assert [s.path.name for s in samples] == ["b.png"]  # image 1 is not trained with an object unlabelled
    assert samples[0].size == (30, 40)  # missing height/width: read from the image
    assert len(report.items) == 1 and why in report.problems[0] and "11" in report.problems[0]


def test_coco_malformed_file_is_one_error(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text('{"images": [], "annotations": [], "categories": [{"name": "x"}]}')
    with pytest.raises(DataError, match="each category needs an 'id' and a 'name'"):
        read_coco(tmp_path / "a.json")
    (tmp_path / "b.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="a COCO JSON is an object"):
        read_coco(tmp_path / "b.json")


# -- localization and landmark CSVs -------------------------------------------------------------------
def test_localization_missing_image_is_skipped_like_everywhere(tmp_path: Path) -> None:
    from cnnkit.engine.config import TrainConfig
    from cnnkit.workflows.localize import Localize, LocalizeOptions

    rows = ["image,class,x1,y1,x2,y2"]
    for i in range(6):
        png(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,cat,2,2,20,20")
    png(tmp_path / "7.png")
    rows += ["gone.png,cat,2,2,20,20", "7.png,cat,abc,2,20,20"]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    data = Localize().build_data(LocalizeOptions(data=str(tmp_path)), TrainConfig(imgsz=32))
    assert len(data.train) + len(data.val) == 6  # type: ignore[arg-type]
    reasons = dict(data.skipped)
    assert "file not found" in reasons[str(tmp_path / "gone.png")]
    assert "not four finite numbers" in reasons[f"{tmp_path / 'train.csv'}:9"]  # the line of the row


# -- fuzzing the readers ------------------------------------------------------------------------------
NUMBER = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32).map(repr),
    st.integers(-5, 5).map(str),
    st.sampled_from(["", "x", "1e9", "-1e9", "0x10", "1,5", "nan", "-inf"]),
)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(lines=st.lists(st.lists(NUMBER, min_size=0, max_size=9).map(" ".join), max_size=6))
def test_fuzzed_yolo_labels_never_crash_nor_pass_garbage(tmp_path: Path, lines: list[str]) -> None:
    images = yolo_set(tmp_path, {"img": "\n".join(lines)})
    samples, report = read_yolo_images(images, ["a", "b", "c"])
    for s in samples:
        assert torch.isfinite(s.boxes).all()
        assert (s.boxes[:, 0::2] >= 0).all() and (s.boxes[:, 0::2] <= 40).all()
        assert (s.boxes[:, 1::2] >= 0).all() and (s.boxes[:, 1::2] <= 30).all()
        assert (s.boxes[:, 2:] > s.boxes[:, :2]).all()
    assert len(samples) + len(report.items) == 1


@FUZZ
@given(cells=st.lists(st.lists(NUMBER, min_size=4, max_size=4), min_size=1, max_size=5))
def test_fuzzed_localization_and_landmark_rows(tmp_path: Path, cells: list[list[str]]) -> None:
    loc = tmp_path / "loc.csv"
    loc.write_text("image,class,x1,y1,x2,y2\n" + "".join(f"a.png,cat,{','.join(c)}\n" for c in cells))
    report = DataReport()
    for s in read_localization_csv(loc, report):
        assert s.box is None or (np.isfinite(s.box).all() and s.box[2] > s.box[0] and s.box[3] > s.box[1])
    pts = tmp_path / "pts.csv"
    pts.write_text("image,x0,y0,x1,y1\n" + "".join(f"a.png,{','.join(c)}\n" for c in cells))
    report = DataReport()
    samples = read_landmarks_csv(pts, report)
    assert len(samples) + len(report.items) == len(cells)
    for s in samples:
        assert torch.isfinite(s.points).all() and (s.points >= 0).all()


@FUZZ
@given(
    bbox=st.one_of(
        st.lists(st.one_of(st.floats(allow_nan=True), st.text(max_size=2), st.none()), max_size=5), st.none()
    )
)
def test_fuzzed_coco_boxes(tmp_path: Path, bbox: list | None) -> None:
    ann = {"id": 1, "image_id": 1, "category_id": 1, **({} if bbox is None else {"bbox": bbox})}
    samples, _, report = read_coco(coco_set(tmp_path, [ann], [{"id": 1, "file_name": "a.png"}]))
    assert len(samples) + len(report.items) == 1
    for s in samples:
        assert torch.isfinite(s.boxes).all()


def test_box_dataset_summary_names_what_was_skipped(tmp_path: Path) -> None:
    yolo_set(tmp_path, {f"{i}": "0 0.5 0.5 0.2 0.2\n" for i in range(5)} | {"bad": "0 nan 0.5 0.2 0.2\n"})
    (tmp_path / "data.yaml").write_text("path: .\ntrain: images\nval: images\nnames: [a]\n")
    ds = read_box_data(tmp_path)
    assert len(ds.train) == 5 and "samples skipped" in ds.report.summary()


def test_each_task_recognises_the_other_tasks_layouts(tmp_path: Path) -> None:
    """Seen: ``train classify`` on a segmentation folder trained an "images vs masks" classifier."""
    from cnnkit.data.formats.masks import resolve_segmentation_data
    from cnnkit.data.scenes import write_scenes
    from cnnkit.workflows.classify import resolve_splits

    scenes = write_scenes(tmp_path / "scenes", n_train=4, n_val=2, size=(32, 40))
    with pytest.raises(DataError, match=r"laid out for segment .*cnnkit train segment"):
        resolve_splits(scenes, None, 0.2, 0)
    with pytest.raises(DataError, match=r"laid out for segmentation .*cnnkit train segment"):
        read_box_data(scenes)
    boxes = tmp_path / "boxes"
    yolo_set(boxes, {"a": "0 0.5 0.5 0.2 0.2\n", "b": "0 0.5 0.5 0.2 0.2\n"})
    (boxes / "data.yaml").write_text("path: .\ntrain: images\nval: images\nnames: [a]\n")
    with pytest.raises(DataError, match=r"laid out for detect .*cnnkit train detect"):
        resolve_splits(boxes, None, 0.2, 0)
    classes = tmp_path / "classes"
    for c in ("cat", "dog"):
        png(classes / c / "x.png")
    with pytest.raises(DataError, match=r"looks like class folders \(cat, dog...\): cnnkit train classify"):
        resolve_segmentation_data(classes)
    assert resolve_splits(classes, None, 0.5, 0)[2] == ["cat", "dog"]
