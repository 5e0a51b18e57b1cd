"""Object detection datasets in the formats people publish: ultralytics YOLO (``data.yaml`` + txt
labels), COCO instances JSON, and Pascal VOC XML.

Every reader returns :class:`DetSample` s (image path, ``xyxy`` pixel boxes, class indices) and a
:class:`~cnnkit.data.report.DataReport` of what it fixed or left out: coordinates outside the image
are clipped (counted per file), boxes with no area after clipping are dropped, and a malformed line,
an unknown class or a missing image is reported with its file and line and the sample skipped
(``strict=True`` raises at the first one instead). Images without boxes are kept as background
samples. Paths inside annotation files resolve relative to that file.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from cnnkit.data.images import is_image
from cnnkit.data.report import DataReport
from cnnkit.errors import DataError
from cnnkit.io import load_yaml


@dataclass(frozen=True)
class DetSample:
    path: Path
    boxes: torch.Tensor  # [N, 4] xyxy, pixels
    labels: torch.Tensor  # [N] class indices
    size: tuple[int, int]  # (height, width)


DetReport = DataReport  # the name of the first release


def _image_size(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except OSError:
        return None


def _finish(
    boxes: list[list[float]], labels: list[int], size: tuple[int, int], source: str, report: DataReport
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip to the image and drop empty boxes, counting both per file."""
    h, w = size
    b = torch.tensor(boxes, dtype=torch.float32).view(-1, 4)
    clipped = torch.stack(
        [b[:, 0].clamp(0, w), b[:, 1].clamp(0, h), b[:, 2].clamp(0, w), b[:, 3].clamp(0, h)], 1
    )
    n_clipped = int(((clipped - b).abs() > 0.01).sum())  # smaller moves are rounding in the label file
    if n_clipped:
        report.clipped[source] += n_clipped
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    if not keep.all():
        report.dropped[source] += int((~keep).sum())
    return clipped[keep], torch.tensor(labels, dtype=torch.long).view(-1)[keep]


def _names(raw: Any) -> list[str]:
    if isinstance(raw, dict):
        return [str(raw[k]) for k in sorted(raw, key=int)]
    return [str(n) for n in raw]


def _yolo_images(spec: Any, base: Path) -> list[Path]:
    """Images of a split given as a folder, a txt list of paths, or a list of either."""
    if isinstance(spec, list):
        return [p for item in spec for p in _yolo_images(item, base)]
    path = (base / str(spec)).resolve()
    if path.is_file() and path.suffix == ".txt":
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        return [(path.parent / ln).resolve() if not Path(ln).is_absolute() else Path(ln) for ln in lines]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if is_image(p))
    raise DataError(f"{path}: split not found (a folder of images or a txt list of image paths)")


def _label_path(image: Path) -> Path:
    """ultralytics' rule: the last ``images`` folder in the path becomes ``labels``, suffix ``.txt``."""
    parts = list(image.parts)
    idx = max((i for i, p in enumerate(parts) if p == "images"), default=None)
    if idx is None:
        return image.with_suffix(".txt")
    parts[idx] = "labels"
    return Path(*parts).with_suffix(".txt")


def read_yolo(
    data_yaml: str | os.PathLike[str], split: str = "train", *, strict: bool = False
) -> tuple[list[DetSample], list[str], DataReport]:
    """An ultralytics-style set: ``data.yaml`` with ``path``, ``train``/``val`` and ``names``; label files
    ``class cx cy w h`` (normalised) under the matching ``labels/`` folder. Segmentation-style lines
    (``class x1 y1 x2 y2 ...``, a polygon) count as the polygon's bounding box, as ultralytics does."""
    data_yaml = Path(data_yaml)
    cfg = load_yaml(data_yaml)
    if "names" not in cfg or split not in cfg:
        raise DataError(f"{data_yaml}: needs 'names' and '{split}' keys (ultralytics data.yaml)")
    names = _names(cfg["names"])
    root = Path(str(cfg.get("path", "")))
    base = root if root.is_absolute() else (data_yaml.parent / root)
    report = DataReport()
    samples = []
    for image in _yolo_images(cfg[split], base):
        size = _image_size(image)
        if size is None:
            report.problem(f"{image}: missing or unreadable image", strict)
            continue
        label_file = _label_path(image)
        boxes, labels, ok = [], [], True
        lines = label_file.read_text().splitlines() if label_file.is_file() else []
        for lineno, line in enumerate(lines, start=1):
            parts = line.split()
            if not parts:
                continue
            try:
                c, values = int(parts[0]), [float(v) for v in parts[1:]]
                if len(values) in (4, 5):  # a box (a fifth value, a confidence, is ignored)
                    cx, cy, bw, bh = values[:4]
                elif len(values) >= 6 and len(values) % 2 == 0:  # a segment polygon: its bounding box
                    xs, ys = values[0::2], values[1::2]
                    cx, cy, bw, bh = (
                        (min(xs) + max(xs)) / 2,
                        (min(ys) + max(ys)) / 2,
                        max(xs) - min(xs),
                        max(ys) - min(ys),
                    )
                else:
                    raise ValueError
            except ValueError:
                report.problem(
                    f"{label_file}:{lineno}: expected 'class cx cy w h' or 'class x1 y1 x2 y2 x3 y3 ...', "
                    f"got {line.strip()!r}",
                    strict,
                )
                ok = False
                break
            if not 0 <= c < len(names):
                report.problem(
                    f"{label_file}:{lineno}: class {c} is not among the {len(names)} names", strict
                )
                ok = False
                break
            h, w = size
            boxes.append([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])
            labels.append(c)
        if ok:
            b, lab = _finish(boxes, labels, size, str(label_file), report)
            samples.append(DetSample(image, b, lab, size))
    return samples, names, report


def read_coco(
    annotations: str | os.PathLike[str], images: str | os.PathLike[str] | None = None, *, strict: bool = False
) -> tuple[list[DetSample], list[str], DataReport]:
    """COCO instances JSON. Categories become classes in id order; crowd annotations are left out.

    ``images`` is the image folder; by default ``file_name`` resolves against the JSON's folder, then
    against the folder above it, then the COCO layout's ``<root>/<split>``
    (``annotations/instances_val2017.json`` -> ``val2017/``) and ``<root>/images``.
    """
    path = Path(annotations)
    try:
        coco = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read COCO JSON ({exc})") from None
    cats = sorted(coco.get("categories", []), key=lambda c: c["id"])
    index = {c["id"]: i for i, c in enumerate(cats)}
    names = [c["name"] for c in cats]
    split = path.stem.split("_")[-1]
    roots = (
        [Path(images)]
        if images
        else [path.parent, path.parent.parent, path.parent.parent / split, path.parent.parent / "images"]
    )
    per_image: dict[int, list[dict[str, Any]]] = {}
    for ann in coco.get("annotations", []):
        per_image.setdefault(ann["image_id"], []).append(ann)
    report = DataReport()
    samples = []
    for info in coco.get("images", []):
        image = next((r / info["file_name"] for r in roots if (r / info["file_name"]).is_file()), None)
        if image is None:
            report.problem(
                f"{path}: image {info['file_name']} (id {info['id']}) not found in {roots}", strict
            )
            continue
        boxes, labels = [], []
        for ann in per_image.get(info["id"], []):
            if ann.get("iscrowd", 0):
                continue
            if ann["category_id"] not in index:
                report.problem(
                    f"{path}: annotation {ann.get('id')} has unknown category {ann['category_id']}",
                    strict,
                )
                continue
            x, y, bw, bh = ann["bbox"]
            boxes.append([x, y, x + bw, y + bh])
            labels.append(index[ann["category_id"]])
        size = (int(info["height"]), int(info["width"]))
        b, lab = _finish(boxes, labels, size, f"{path}#{info['id']}", report)
        samples.append(DetSample(image, b, lab, size))
    return samples, names, report


VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


def read_voc(
    root: str | os.PathLike[str],
    split: str = "train",
    *,
    names: list[str] | None = None,
    strict: bool = False,
) -> tuple[list[DetSample], list[str], DataReport]:
    """Pascal VOC: ``Annotations/*.xml``, ``JPEGImages/``, ``ImageSets/Main/<split>.txt`` (else every XML).

    Classes default to VOC's 20 when every object name is one of them, else the sorted names found.
    VOC's 1-based pixel coordinates are converted to 0-based ``xyxy``.
    """
    root = Path(root)
    listing = root / "ImageSets" / "Main" / f"{split}.txt"
    ids = (
        listing.read_text().split()
        if listing.is_file()
        else [p.stem for p in sorted((root / "Annotations").glob("*.xml"))]
    )
    parsed = []
    report = DataReport()
    for i in ids:
        xml = root / "Annotations" / f"{i}.xml"
        try:
            tree = ET.parse(xml).getroot()
        except (OSError, ET.ParseError) as exc:
            report.problem(f"{xml}: cannot parse ({exc})", strict)
            continue
        objects = []
        for obj in tree.iter("object"):
            bb = obj.find("bndbox")
            try:
                coords = [float(bb.findtext(k) or "") for k in ("xmin", "ymin", "xmax", "ymax")]  # type: ignore[union-attr]
            except (AttributeError, ValueError):
                report.problem(f"{xml}: object {obj.findtext('name')!r} has no valid bndbox", strict)
                continue
            objects.append((obj.findtext("name") or "", coords))
        parsed.append((xml, tree, objects))
    found = sorted({n for _, _, objs in parsed for n, _ in objs})
    if names is None:
        names = list(VOC_CLASSES) if set(found) <= set(VOC_CLASSES) else found
    index = {n: k for k, n in enumerate(names)}
    samples = []
    for xml, tree, objects in parsed:
        image = root / "JPEGImages" / (tree.findtext("filename") or f"{xml.stem}.jpg")
        size = _image_size(image)
        if size is None:
            report.problem(f"{xml}: image {image.name} is missing or unreadable", strict)
            continue
        boxes, labels = [], []
        for name, (x1, y1, x2, y2) in objects:
            if name not in index:
                report.problem(f"{xml}: class {name!r} is not among {names}", strict)
                continue
            boxes.append([x1 - 1, y1 - 1, x2, y2])
            labels.append(index[name])
        b, lab = _finish(boxes, labels, size, str(xml), report)
        samples.append(DetSample(image, b, lab, size))
    return samples, names, report
