"""A plain CSV with one row per box, the shape ``train.csv`` files on dataset sites and TensorFlow's
object-detection exports use: an image column (``image``, ``filename``, ``file``, ``path``,
``image_id``), the box (``xmin, ymin, xmax, ymax``, or ``x1..y2``, ``left..bottom``) in pixels, and the
class (``class``, ``label``, ``category``, ``name``). Rows without a box are images with no object.
A file, a folder with ``train.csv`` (+ ``val.csv``/``valid.csv``), or split folders holding
``_annotations.csv``."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

from cnnkit.data.formats.base import (
    BoxFormat,
    DetSample,
    ImageIndex,
    Layout,
    Splits,
    files_by_split,
    files_under,
    relative,
    sample_from_named,
    sized,
)
from cnnkit.data.report import DataReport

IMAGE_COLS = ("image", "filename", "file_name", "file", "path", "image_path", "image_id", "img")
CLASS_COLS = ("class", "label", "category", "class_name", "name")
BOX_COLS = (("xmin", "ymin", "xmax", "ymax"), ("x1", "y1", "x2", "y2"), ("left", "top", "right", "bottom"))


def columns(path: Path) -> tuple[str, str, tuple[str, ...]] | None:
    """(image, class, box) column names of a box CSV, or None when it is not one."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError):
        return None
    cols = {c.strip().lower(): c for c in header}
    image = next((cols[c] for c in IMAGE_COLS if c in cols), None)
    label = next((cols[c] for c in CLASS_COLS if c in cols), None)
    box = next((tuple(cols[c] for c in names) for names in BOX_COLS if all(c in cols for c in names)), None)
    return (image, label, box) if image and label and box else None


def _sniff(path: Path) -> Layout | None:
    if path.is_file():
        return Layout("csv", path.parent, f"box CSV {path.name}", {"train": path}) if columns(path) else None
    if not path.is_dir():
        return None
    found = [p for p in files_under(path, ".csv", max_depth=1) if columns(p)]
    if not found:
        return None
    parts = files_by_split(found, path)
    return Layout(
        "csv", path, "box CSV " + ", ".join(f"{s}: {relative(p, path)}" for s, p in parts.items()), parts
    )


def read_box_csv(
    path: Path, index: ImageIndex, names: list[str] | None, report: DataReport, strict: bool
) -> tuple[list[DetSample], list[str]]:
    image_col, class_col, box_cols = columns(path) or ("", "", ())
    rows: dict[str, list[tuple[str, list[float]]]] = defaultdict(list)
    with path.open(newline="", encoding="utf-8-sig") as f:
        for lineno, row in enumerate(csv.DictReader(f), start=2):
            name = (row.get(image_col) or "").strip()
            values = [(row.get(c) or "").strip() for c in box_cols]
            objects = rows[name]  # an image row with no box: an image with no object
            if not any(values):
                continue
            try:
                objects.append(((row.get(class_col) or "").strip(), [float(v) for v in values]))
            except ValueError:
                report.add(f"{path}:{lineno}", f"box {values} is not four numbers", strict)
    if names is None:
        names = sorted({c for objs in rows.values() for c, _ in objs})
    lookup = {n: i for i, n in enumerate(names)}
    samples = []
    for name, objects in rows.items():
        image = index.find(name, Path(name).stem, near=[path.parent, path.parent / "images"])
        size = sized(image, name, path, report, strict)
        if image is None or size is None:
            continue
        sample = sample_from_named(image, size, objects, lookup, f"{path}#{name}", report, strict)
        if sample is not None:
            samples.append(sample)
    return samples, names


def _read(layout: Layout, strict: bool) -> Splits:
    index, report = ImageIndex(layout.root), DataReport()
    train, names = read_box_csv(layout.parts["train"], index, None, report, strict)
    val_csv = layout.parts.get("val", layout.parts.get("test"))
    val = None if val_csv is None else read_box_csv(val_csv, index, names, report, strict)[0]
    return Splits(train, val, names, report)


FORMAT = BoxFormat("csv", "a box CSV (image, xmin, ymin, xmax, ymax, class; one row per box)", _sniff, _read)
