"""YOLO txt labels (``class cx cy w h`` normalised, or a segment polygon): with an ultralytics
``data.yaml``, or without one as LabelImg, Darknet and many shared sets publish them (``images/`` +
``labels/``, split folders, labels beside the images, ``train.txt``/``valid.txt`` image lists; class
names from ``classes.txt``, ``obj.names``, ``data.names`` or ``names.txt``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cnnkit.data.formats.base import (
    BoxFormat,
    DetSample,
    Layout,
    Splits,
    files_under,
    finish,
    images_under,
    read_names_file,
    relative,
    sized,
    split_of,
    splits_of,
)
from cnnkit.data.report import DataReport
from cnnkit.errors import CnnkitError, DataError
from cnnkit.io import load_yaml

log = logging.getLogger("cnnkit")

NAMES_FILES = ("classes.txt", "obj.names", "data.names", "names.txt", "_darknet.labels")
LIST_FILES = {"train": ("train.txt",), "val": ("valid.txt", "val.txt", "validation.txt", "test.txt")}
_NOT_LABELS = {*NAMES_FILES, *LIST_FILES["train"], *LIST_FILES["val"], "readme.txt", "license.txt"}


def label_path(image: Path) -> Path:
    """ultralytics' rule: the last ``images`` folder in the path becomes ``labels``, suffix ``.txt``;
    without an ``images`` folder (or where that file is missing) the label sits beside the image."""
    parts = list(image.parts)
    idx = max((i for i, p in enumerate(parts) if p == "images"), default=None)
    if idx is not None:
        parts[idx] = "labels"
        beside_tree = Path(*parts).with_suffix(".txt")
        if beside_tree.is_file() or not image.with_suffix(".txt").is_file():
            return beside_tree
    return image.with_suffix(".txt")


def names_from_yaml(raw: Any) -> list[str]:
    if isinstance(raw, dict):
        return [str(raw[k]) for k in sorted(raw, key=int)]
    return [str(n) for n in raw]


def read_yolo_images(
    images: Sequence[Path],
    names: Sequence[str],
    *,
    strict: bool = False,
    report: DataReport | None = None,
    require_labels: bool = False,
    label_of: Callable[[Path], Path] = label_path,
) -> tuple[list[DetSample], DataReport]:
    """Parse the label file of each image. An image without one is a background sample (ultralytics'
    rule), or with ``require_labels`` (labels beside the images: an image not annotated yet) skipped."""
    report = report if report is not None else DataReport()
    samples = []
    for image in images:
        label_file = label_of(image)
        if require_labels and not label_file.is_file():
            report.add(image, "no label file beside it (not annotated?)")
            continue
        size = sized(image, image.name, image, report, strict)
        if size is None:
            continue
        if not label_file.is_file():
            report.background += 1
        parsed = _parse_labels(label_file, size, len(names), report, strict)
        if parsed is None:
            continue
        boxes, labels, lines = parsed
        sample = finish(image, boxes, labels, size, str(label_file), report, strict, lines)
        if sample is not None:
            samples.append(sample)
    return samples, report


def _parse_labels(
    label_file: Path, size: tuple[int, int], n_names: int, report: DataReport, strict: bool
) -> tuple[list[list[float]], list[int], list[str]] | None:
    """Boxes (``xyxy`` pixels), classes and the ``file:line`` of each; None (reported) when a line is
    malformed or names a class out of range."""
    boxes, labels, where = [], [], []
    try:
        lines = label_file.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        lines = []
    except OSError as exc:
        report.add(label_file, f"cannot read ({exc.strerror})", strict)
        return None
    h, w = size
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
                cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
                bw, bh = max(xs) - min(xs), max(ys) - min(ys)
            else:
                raise ValueError
        except ValueError:
            report.add(
                f"{label_file}:{lineno}",
                f"expected 'class cx cy w h' or 'class x1 y1 x2 y2 x3 y3 ...', got {line.strip()!r}",
                strict,
            )
            return None
        if not 0 <= c < n_names:
            report.add(f"{label_file}:{lineno}", f"class {c} is not among the {n_names} names", strict)
            return None
        boxes.append([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])
        labels.append(c)
        where.append(f"{label_file}:{lineno}")
    return boxes, labels, where


# -- with a data.yaml --------------------------------------------------------------------------------------
def read_yolo(
    data_yaml: str | os.PathLike[str], split: str = "train", *, strict: bool = False
) -> tuple[list[DetSample], list[str], DataReport]:
    """An ultralytics-style set: ``data.yaml`` with ``path``, ``train``/``val`` and ``names``; label files
    under the matching ``labels/`` folder. Segmentation-style lines (a polygon) count as its box."""
    data_yaml = Path(data_yaml)
    cfg = load_yaml(data_yaml)
    if "names" not in cfg or split not in cfg:
        raise DataError(f"{data_yaml}: needs 'names' and '{split}' keys (ultralytics data.yaml)")
    names = names_from_yaml(cfg["names"])
    root = Path(str(cfg.get("path", "")))
    base = root if root.is_absolute() else (data_yaml.parent / root)
    samples, report = read_yolo_images(yolo_split_images(cfg[split], base), names, strict=strict)
    return samples, names, report


def yolo_split_images(spec: Any, base: Path) -> list[Path]:
    """Images of a split given as a folder, a txt list of paths, or a list of either."""
    if isinstance(spec, list):
        return [p for item in spec for p in yolo_split_images(item, base)]
    path = (base / str(spec)).resolve()
    if path.is_file() and path.suffix == ".txt":
        return _image_list(path, base)
    if path.is_dir():
        return images_under(path, max_depth=None)
    raise DataError(f"{path}: split not found (a folder of images or a txt list of image paths)")


def _image_list(path: Path, root: Path) -> list[Path]:
    """A Darknet/ultralytics image list: one path per line, absolute or relative to the list, the root,
    or the folder Darknet ran from (``data/obj/x.jpg`` when the dataset is that ``data/``)."""
    out = []
    for line in path.read_text().splitlines():
        line = line.strip().replace("\\", "/")
        if not line:
            continue
        p = Path(line)
        candidates = [p] if p.is_absolute() else [path.parent / p, root / p, root.parent / p]
        candidates += [root / Path(*p.parts[k:]) for k in range(1, len(p.parts))]
        out.append(next((c.resolve() for c in candidates if c.is_file()), candidates[0]))
    return out


def _sniff_yaml(path: Path) -> Layout | None:
    """A ``data.yaml`` naming a ``train`` split (ultralytics'); one without (a segmentation set's class
    names and ignore index) is not a YOLO set."""
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        return Layout("yolo", path.parent, f"ultralytics data.yaml {path.name}", {"yaml": path})
    yaml = next((path / n for n in ("data.yaml", "dataset.yaml") if (path / n).is_file()), None)
    if path.is_dir() and yaml is not None and _names_a_train_split(yaml):
        return Layout("yolo", path, f"ultralytics {yaml.name}", {"yaml": yaml})
    return None


def _names_a_train_split(yaml_path: Path) -> bool:
    try:
        return "train" in load_yaml(yaml_path)
    except CnnkitError:
        return True  # unreadable: let the reader say what is wrong with it


def _read_yaml(layout: Layout, strict: bool) -> Splits:
    yaml_path = layout.parts["yaml"]
    train, names, report = read_yolo(yaml_path, "train", strict=strict)
    val = None
    split = next((k for k in ("val", "valid", "test") if load_yaml(yaml_path).get(k)), None)
    if split is not None:
        val, _, r = read_yolo(yaml_path, split, strict=strict)
        report.merge(r)
    return Splits(train, val, names, report)


# -- without a data.yaml -----------------------------------------------------------------------------------
def _sniff_plain(path: Path) -> Layout | None:
    """Images with YOLO txt labels and no data.yaml."""
    if not path.is_dir():
        return None
    images = images_under(path)
    labelled = [(p, label_path(p)) for p in images]
    labelled = [(p, t) for p, t in labelled if t.is_file() and t.name.lower() not in _NOT_LABELS]
    if not labelled or not _looks_like_yolo(labelled[0][1]):
        return None
    lists = {
        s: next((path / n for n in names if (path / n).is_file()), None) for s, names in LIST_FILES.items()
    }
    names_file = _names_file(path, [t.parent for _, t in labelled[:50]])
    beside = all(t.parent == p.parent for p, t in labelled[:50])
    where = "beside the images" if beside else f"in {relative(labelled[0][1].parent, path)}/"
    found = f"YOLO txt labels {where} ({len(labelled)} of {len(images)} images), no data.yaml"
    if lists["train"] is not None:
        found += f"; image lists {', '.join(p.name for p in lists.values() if p)}"
    found += f"; class names from {relative(names_file, path)}" if names_file else "; no class-names file"
    parts = {"images": images, "lists": lists, "names_file": names_file, "beside": beside}
    return Layout("yolo-plain", path, found, parts)


def _looks_like_yolo(label_file: Path) -> bool:
    for line in label_file.read_text(errors="replace").splitlines()[:5]:
        parts = line.split()
        if parts:
            try:
                int(parts[0])
                [float(v) for v in parts[1:]]
            except ValueError:
                return False
            return len(parts) >= 5
    return True  # an empty label file: a background image


def _names_file(root: Path, label_dirs: Sequence[Path]) -> Path | None:
    for folder in [root, *dict.fromkeys(label_dirs), *(d.parent for d in label_dirs)]:
        for name in NAMES_FILES:
            if (folder / name).is_file():
                return folder / name
    return None


def _read_plain(layout: Layout, strict: bool) -> Splits:
    root, parts = layout.root, layout.parts
    names_file: Path | None = parts["names_file"]
    report = DataReport()
    if names_file is not None:
        names = read_names_file(names_file)
    else:
        top = max((_top_class(label_path(p)) for p in parts["images"]), default=-1)
        names = [f"class{i}" for i in range(top + 1)]
        log.warning("%s: no classes.txt/obj.names; naming the %d classes class0..class%d", root, top + 1, top)
    lists = parts["lists"]
    if lists["train"] is not None:
        groups = {s: _image_list(p, root) for s, p in lists.items() if p is not None}
    else:
        groups = {}
        for image in parts["images"]:
            groups.setdefault(split_of(image, root) or "all", []).append(image)
    beside = parts["beside"]
    read = {
        s: read_yolo_images(imgs, names, strict=strict, report=report, require_labels=beside)[0]
        for s, imgs in groups.items()
    }
    return splits_of(read, names, report)


def _top_class(label_file: Path) -> int:
    """The largest class index in a label file (-1: none, or no file)."""
    if not label_file.is_file():
        return -1
    ids = [line.split()[0] for line in label_file.read_text().splitlines() if line.split()]
    return max((int(i) for i in ids if i.lstrip("-").isdigit()), default=-1)


def _near_miss(path: Path) -> str | None:
    if not path.is_dir():
        return None
    txts = [p for p in files_under(path, ".txt") if p.name.lower() not in _NOT_LABELS]
    if txts and _looks_like_yolo(txts[0]):
        return f"found {len(txts)} YOLO-like .txt label files but no images they belong to"
    return None


YAML_FORMAT = BoxFormat(
    "yolo", "an ultralytics YOLO data.yaml (or a folder holding one)", _sniff_yaml, _read_yaml
)
PLAIN_FORMAT = BoxFormat(
    "yolo-plain",
    "images with YOLO .txt labels (images/ + labels/, or beside them) and classes.txt/obj.names",
    _sniff_plain,
    _read_plain,
    _near_miss,
)
