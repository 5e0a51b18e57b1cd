"""Localization (one main object: class + box, or none) and landmark datasets.

Localization sources: a CSV with a header (``image, class, x1, y1, x2, y2`` in pixels; ``xmin/ymin/
xmax/ymax`` and ``path/label`` spellings too; an empty class or box, or ``none``, means no object), a
JSON list of ``{"image", "class", "box": [x1, y1, x2, y2]}``, an ultralytics-style YOLO set (the
largest box of each label file), or Pascal VOC (the largest object of each XML). Landmark sources: a
CSV ``image, x0, y0, x1, y1, ...`` with a header (the 68-point face layout works as is; empty,
NaN or negative coordinates mark a point invisible) or a JSON list of ``{"image", "points",
"visible"}``. Paths inside annotation files resolve relative to the file.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from cnnkit.data.detect import DetSample
from cnnkit.data.formats import box_csv, not_a_box_dataset, read_box_data, sniff_box_format
from cnnkit.data.formats.coco import is_coco
from cnnkit.data.formats.tools import is_createml
from cnnkit.data.images import first_readable, is_image, read_image
from cnnkit.data.report import DataReport
from cnnkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from cnnkit.errors import DataError
from cnnkit.io import load_yaml

log = logging.getLogger(__name__)
NO_OBJECT = {"", "none", "background", "null", "-"}
_IMAGE_COLS = ("image", "path", "filename", "file", "image_path", "img")
_CLASS_COLS = ("class", "label", "category", "class_name")
_BOX_COLS = (("x1", "y1", "x2", "y2"), ("xmin", "ymin", "xmax", "ymax"), ("left", "top", "right", "bottom"))


@dataclass(frozen=True)
class LocSample:
    path: Path
    label: str | None  # class name, or None: no object
    box: tuple[float, float, float, float] | None  # xyxy pixels


def read_localization_csv(
    path: str | os.PathLike[str], report: DataReport | None = None, strict: bool = False
) -> list[LocSample]:
    """One row per image; a row whose box is not four finite numbers with ``x2 > x1``, ``y2 > y1`` is
    reported at its line and left out (``strict``: stops)."""
    path = Path(path)
    report = report if report is not None else DataReport()
    with path.open(newline="", encoding="utf-8-sig", errors="replace") as f:
        reader = csv.DictReader(f)
        cols = {c.strip().lower(): c for c in reader.fieldnames or []}
        img_col = next((cols[c] for c in _IMAGE_COLS if c in cols), None)
        cls_col = next((cols[c] for c in _CLASS_COLS if c in cols), None)
        box_cols = next(
            (tuple(cols[c] for c in names) for names in _BOX_COLS if all(c in cols for c in names)), None
        )
        if img_col is None or box_cols is None:
            raise DataError(
                f"{path}: header must name an image column and box columns x1,y1,x2,y2 (or xmin...), "
                f"got {reader.fieldnames}"
            )
        samples = []
        for lineno, row in enumerate(reader, start=2):
            image = (row.get(img_col) or "").strip()
            if not image:
                report.add(f"{path}:{lineno}", "no image named", strict)
                continue
            label = (row.get(cls_col) or "").strip() if cls_col else "object"
            coords = [(row.get(c) or "").strip() for c in box_cols]
            if label.lower() in NO_OBJECT or not any(coords):
                samples.append(LocSample(path.parent / image, None, None))
                continue
            box = _box(coords)
            if box is None:
                report.add(
                    f"{path}:{lineno}", f"box {coords} is not four finite numbers x1<x2, y1<y2", strict
                )
                continue
            samples.append(LocSample(path.parent / image, label, box))
    return samples


def _box(values: Sequence[Any]) -> tuple[float, float, float, float] | None:
    """``(x1, y1, x2, y2)`` from four finite numbers with ``x2 > x1`` and ``y2 > y1``, else None."""
    try:
        x1, y1, x2, y2 = (float(v) for v in values)
    except (TypeError, ValueError):
        return None
    ok = all(math.isfinite(v) for v in (x1, y1, x2, y2)) and x2 > x1 and y2 > y1
    return (x1, y1, x2, y2) if ok else None


def read_localization_json(
    path: str | os.PathLike[str], report: DataReport | None = None, strict: bool = False
) -> list[LocSample]:
    """A list of ``{"image", "class", "box"}``; a bad entry is reported by its index and left out."""
    path = Path(path)
    report = report if report is not None else DataReport()
    items = _json_list(path)
    samples = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("image"), str):
            report.add(f"{path}: item {i}", "needs an 'image' path", strict)
            continue
        label, box = item.get("class"), item.get("box")
        if label is None or str(label).lower() in NO_OBJECT or not box:
            samples.append(LocSample(path.parent / item["image"], None, None))
            continue
        xyxy = _box(box) if isinstance(box, list) and len(box) == 4 else None
        if xyxy is None:
            report.add(f"{path}: item {i}", f"box must be [x1, y1, x2, y2] finite, got {box}", strict)
            continue
        samples.append(LocSample(path.parent / item["image"], str(label), xyxy))
    return samples


def _json_list(path: Path) -> list[Any]:
    try:
        items = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read JSON ({exc})") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON list of samples")
    return items


def largest_objects(samples: Sequence[DetSample], names: Sequence[str]) -> list[LocSample]:
    """One main object per image from a box dataset: the largest box (no box: no object)."""
    out = []
    for s in samples:
        if not len(s.boxes):
            out.append(LocSample(s.path, None, None))
            continue
        areas = (s.boxes[:, 2] - s.boxes[:, 0]) * (s.boxes[:, 3] - s.boxes[:, 1])
        i = int(areas.argmax())
        box = tuple(float(v) for v in s.boxes[i].tolist())
        out.append(LocSample(s.path, names[int(s.labels[i])], box))  # type: ignore[arg-type]
    return out


def _box_file(path: Path) -> bool:
    """A file the box readers own: a COCO or CreateML JSON, or a CSV with several rows (boxes) for one
    image; a localization CSV/JSON has one row/entry per image."""
    if path.suffix == ".json":
        return is_coco(path) or is_createml(path)
    cols = box_csv.columns(path)
    if cols is None:
        return False
    with path.open(newline="", encoding="utf-8-sig") as f:
        images = [row.get(cols[0]) for row in csv.DictReader(f)]
    return len(set(images)) < len(images)


def read_localization(
    source: str | os.PathLike[str], *, val_fraction: float = 0.2, seed: int = 0, strict: bool = False
) -> tuple[list[LocSample], list[LocSample] | None, list[str] | None, DataReport]:
    """``(samples, val samples or None, class names or None, report)`` from a localization CSV or JSON,
    a folder with ``train.csv`` (+ ``val.csv``), or any box dataset format (YOLO, COCO, Pascal VOC; read
    by the detection readers, the largest box of each image)."""
    source = Path(source)
    report = DataReport()
    train: list[LocSample] | None = None
    val_samples = None
    if source.is_file() and source.suffix == ".csv" and not _box_file(source):
        train = read_localization_csv(source, report, strict)
    elif source.is_file() and source.suffix == ".json" and not _box_file(source):
        train = read_localization_json(source, report, strict)
    elif source.is_dir() and (source / "train.csv").is_file() and not _box_file(source / "train.csv"):
        val = source / "val.csv"
        val_samples = read_localization_csv(val, report, strict) if val.is_file() else None
        train = read_localization_csv(source / "train.csv", report, strict)
    if train is not None:
        report.log_problems(log)
        return train, val_samples, None, report
    if sniff_box_format(source) is not None:
        boxes = read_box_data(source, val_fraction=val_fraction, seed=seed, strict=strict)
        train = largest_objects(boxes.train, boxes.names)
        return train, largest_objects(boxes.val, boxes.names), boxes.names, boxes.report
    raise not_a_box_dataset(
        source, also="a localization CSV/JSON (one row per image), a folder with train.csv"
    )


def _normalize() -> list[torch.nn.Module]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


class LocalizationDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """``(image [3, S, S], target [6])``: target ``(object, b_x, b_y, b_h, b_w, class)``, box normalised."""

    def __init__(
        self,
        samples: Sequence[LocSample],
        class_names: Sequence[str],
        imgsz: int,
        train: bool,
        fliplr: float = 0.5,
    ) -> None:
        self.samples = list(samples)
        self.class_names = list(class_names)
        self.index = {n: i for i, n in enumerate(class_names)}
        unknown = sorted({s.label for s in samples if s.label is not None and s.label not in self.index})
        if unknown:
            raise DataError(f"classes {unknown} are not among {self.class_names}")
        self.imgsz = imgsz
        steps: list[torch.nn.Module] = [v2.Resize((imgsz, imgsz), antialias=True)]
        if train:
            steps += [
                v2.RandomHorizontalFlip(fliplr),
                v2.RandomAffine(0, translate=(0.08, 0.08), scale=(0.9, 1.1)),
                v2.ColorJitter(0.2, 0.2, 0.2),
                v2.ClampBoundingBoxes(),
            ]
        self.transform = v2.Compose(steps + _normalize())

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> tuple[LocSample, torch.Tensor]:
        return self.samples[index], read_image(self.samples[index].path)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        s, image = first_readable(index, len(self.samples), self._load)
        h, w = image.shape[-2:]
        box = s.box or (0.0, 0.0, 1.0, 1.0)
        boxes = tv_tensors.BoundingBoxes(torch.tensor([box]), format="XYXY", canvas_size=(h, w))
        img, boxes = self.transform(tv_tensors.Image(image), boxes)
        x1, y1, x2, y2 = (boxes[0] / self.imgsz).tolist()
        target = torch.zeros(6)
        if s.label is not None and x2 > x1 and y2 > y1:
            target[:] = torch.tensor(
                [1.0, (x1 + x2) / 2, (y1 + y2) / 2, y2 - y1, x2 - x1, self.index[s.label]]
            )
        return img.as_subclass(torch.Tensor), target


# ------------------------------------------------------------------------------------------- landmarks
@dataclass(frozen=True)
class PointSample:
    path: Path
    points: torch.Tensor  # [K, 2] pixels
    visible: torch.Tensor  # [K] bool


_INVISIBLE = {"", "nan", "-1", "none", "-"}


def _point(value: str) -> float:
    """A coordinate; ``""``, ``nan`` or a negative number mark the point invisible (NaN here). Anything
    else that is not a finite number raises ValueError (text in a cell is a broken row, not a hidden
    point)."""
    v = value.strip()
    if v.lower() in _INVISIBLE:
        return math.nan
    try:
        x = float(v)
    except ValueError:
        x = math.inf
    if not math.isfinite(x):
        raise ValueError(repr(v))
    return x if x >= 0 else math.nan


def read_landmarks_csv(
    path: str | os.PathLike[str], report: DataReport | None = None, strict: bool = False
) -> list[PointSample]:
    """``image, x0, y0, x1, y1, ...`` (a header row is detected and skipped). A row with text in a
    coordinate, an odd count or another count than the first row is reported at its line and left out."""
    path = Path(path)
    report = report if report is not None else DataReport()
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8-sig", errors="replace").splitlines()))
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    if not rows:
        raise DataError(f"{path}: empty file")
    start = 0 if rows[0] and is_image(rows[0][0]) else 1  # a header row is detected and skipped
    samples = []
    n = None
    for lineno, row in enumerate(rows[start:], start=start + 1):
        if not row or not row[0].strip():
            continue
        values, where = row[1:], f"{path}:{lineno}"
        if len(values) % 2 or not values:
            report.add(where, f"expected image then x,y pairs, got {len(values)} coordinates", strict)
            continue
        if n is not None and len(values) // 2 != n:
            report.add(where, f"{len(values) // 2} points, the first row has {n}", strict)
            continue
        try:
            pts = torch.tensor([_point(v) for v in values], dtype=torch.float32).view(-1, 2)
        except ValueError as exc:
            report.add(
                where,
                f"coordinate {exc} is not a number (leave the cell empty for an invisible point)",
                strict,
            )
            continue
        n = len(values) // 2
        vis = ~pts.isnan().any(1)
        samples.append(PointSample(path.parent / row[0].strip(), torch.nan_to_num(pts, 0.0), vis))
    return samples


def read_landmarks_json(
    path: str | os.PathLike[str], report: DataReport | None = None, strict: bool = False
) -> list[PointSample]:
    """A list of ``{"image", "points": [[x, y], ...], "visible": [...]}``; bad entries are reported."""
    path = Path(path)
    report = report if report is not None else DataReport()
    samples = []
    for i, item in enumerate(_json_list(path)):
        try:
            pts = torch.tensor(item["points"], dtype=torch.float64).view(-1, 2)
            vis = torch.tensor(item.get("visible", [1] * len(pts)), dtype=torch.bool).view(-1)
            image = path.parent / str(item["image"])
            if len(vis) != len(pts) or not torch.isfinite(pts).all():
                raise ValueError("points must be finite, with one visibility flag each")
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
            report.add(f"{path}: item {i}", f"needs 'image' and 'points' [[x, y], ...] ({exc})", strict)
            continue
        samples.append(PointSample(image, pts.float(), vis & (pts >= 0).all(1)))
    n = {len(s.points) for s in samples}
    if len(n) > 1:
        raise DataError(f"{path}: samples have different numbers of points: {sorted(n)}")
    return samples


def read_landmarks(
    source: str | os.PathLike[str], report: DataReport | None = None, strict: bool = False
) -> tuple[list[PointSample], list[PointSample] | None, dict[str, Any]]:
    """``(samples, val samples or None, options)``; options (``flip_pairs``, ``norm_points``) come from a
    ``data.yaml`` beside the annotations. Bad rows go to ``report``."""
    source = Path(source)
    folder = source if source.is_dir() else source.parent
    options = load_yaml(folder / "data.yaml") if (folder / "data.yaml").is_file() else {}

    def read(p: Path) -> list[PointSample]:
        if p.suffix == ".json":
            return read_landmarks_json(p, report, strict)
        return read_landmarks_csv(p, report, strict)

    report = report if report is not None else DataReport()
    if source.is_file():
        samples = read(source)
        report.log_problems(log)
        return samples, None, options
    for ext in (".csv", ".json"):
        if (source / f"train{ext}").is_file():
            val = source / f"val{ext}"
            train, val_samples = read(source / f"train{ext}"), read(val) if val.is_file() else None
            report.log_problems(log)
            return train, val_samples, options
    raise DataError(f"{source}: expected a landmarks CSV/JSON or a folder with train.csv (and val.csv)")


class LandmarkDataset(Dataset[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """``(image [3, S, S], points [K, 2] normalised, visible [K])``.

    Training augmentations move the points with the image (affine, flip); a horizontal flip also swaps
    the indices in ``flip_pairs`` (left eye <-> right eye), so point order keeps its meaning. Points
    that leave the image become invisible.
    """

    def __init__(
        self,
        samples: Sequence[PointSample],
        imgsz: int,
        train: bool,
        flip_pairs: Sequence[Sequence[int]] = (),
    ) -> None:
        self.samples = list(samples)
        self.imgsz = imgsz
        self.train = train
        self.num_points = len(samples[0].points) if samples else 0
        perm = list(range(self.num_points))
        for a, b in flip_pairs:
            perm[a], perm[b] = b, a
        self.flip_perm = torch.tensor(perm, dtype=torch.long)
        self.resize = v2.Resize((imgsz, imgsz), antialias=True)
        self.augment = v2.Compose(
            [v2.RandomAffine(10, translate=(0.08, 0.08), scale=(0.9, 1.1)), v2.ColorJitter(0.2, 0.2, 0.2)]
        )
        self.normalize = v2.Compose(_normalize())

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> tuple[PointSample, torch.Tensor]:
        return self.samples[index], read_image(self.samples[index].path)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s, image = first_readable(index, len(self.samples), self._load)
        h, w = image.shape[-2:]
        img, kp = self.resize(tv_tensors.Image(image), tv_tensors.KeyPoints(s.points, canvas_size=(h, w)))
        visible = s.visible.clone()
        if self.train:
            img, kp = self.augment(img, kp)
            if torch.rand(()) < 0.5:
                img, kp = v2.functional.horizontal_flip(img), v2.functional.horizontal_flip(kp)
                kp = tv_tensors.wrap(kp[self.flip_perm], like=kp)
                visible = visible[self.flip_perm]
        pts = kp.as_subclass(torch.Tensor) / self.imgsz
        visible &= ((pts >= 0) & (pts <= 1)).all(1)
        return self.normalize(img).as_subclass(torch.Tensor), pts, visible
