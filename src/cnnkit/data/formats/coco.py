"""COCO instances JSON: one file, ``annotations/instances_{train,val}*.json`` (or any JSON there named
by its split), or one JSON per split folder (``train/_annotations.coco.json``, as labelling tools
export). ``file_name`` resolves against the JSON's folder, the folder above, ``<root>/<split>`` and
``<root>/images``, else by file name anywhere under the dataset."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cnnkit.data.formats.base import (
    BoxFormat,
    DetSample,
    ImageIndex,
    Layout,
    Splits,
    file_head,
    files_by_split,
    files_under,
    finish,
    relative,
    sized,
)
from cnnkit.data.report import DataReport
from cnnkit.errors import DataError


def is_coco(path: Path) -> bool:
    """A JSON object whose top level has ``images`` and ``annotations`` (read only as far as needed)."""
    head = file_head(path, 1 << 16)
    return head.startswith(b"{") and (b'"images"' in head or b'"annotations"' in head)


def read_coco(
    annotations: str | os.PathLike[str],
    images: str | os.PathLike[str] | None = None,
    *,
    strict: bool = False,
    index: ImageIndex | None = None,
) -> tuple[list[DetSample], list[str], DataReport]:
    """COCO instances JSON. Categories become classes in id order; crowd annotations are left out."""
    path = Path(annotations)
    try:
        coco = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read COCO JSON ({exc})") from None
    if not isinstance(coco, dict):
        raise DataError(f"{path}: a COCO JSON is an object with 'images', 'annotations' and 'categories'")
    cats = coco.get("categories", [])
    bad = [c for c in cats if not isinstance(c, dict) or "id" not in c or "name" not in c]
    if bad or not isinstance(cats, list):
        raise DataError(f"{path}: each category needs an 'id' and a 'name', got {str(bad or cats)[:120]}")
    try:
        cats = sorted(cats, key=lambda c: c["id"])
    except TypeError:
        raise DataError(f"{path}: category ids must be all numbers or all strings") from None
    ids = {c["id"]: i for i, c in enumerate(cats)}
    names = [str(c["name"]) for c in cats]
    split = path.stem.split("_")[-1]
    roots = (
        [Path(images)]
        if images
        else [path.parent, path.parent.parent, path.parent.parent / split, path.parent.parent / "images"]
    )
    per_image: dict[Any, list[dict[str, Any]]] = {}
    for ann in coco.get("annotations", []):
        if isinstance(ann, dict):
            per_image.setdefault(ann.get("image_id"), []).append(ann)
    report = DataReport()
    samples = []
    for info in coco.get("images", []):
        if not isinstance(info, dict) or "file_name" not in info or "id" not in info:
            report.add(path, f"image entry {str(info)[:80]} has no 'file_name' or 'id'", strict)
            continue
        name = str(info["file_name"])
        image = next((r / name for r in roots if (r / name).is_file()), None)
        if image is None and index is not None:
            image = index.find(name, Path(name).stem, near=roots)
        if image is None:
            report.add(path, f"image {name} (id {info['id']}) not found in {[str(r) for r in roots]}", strict)
            continue
        size = _size_of(info) or sized(image, name, path, report, strict)
        if size is None:
            continue
        objects = _objects(per_image.get(info["id"], []), ids, f"{path}: image {name}")
        if isinstance(objects, str):  # a malformed or unknown annotation: the whole image is skipped
            report.add(path, objects, strict)
            continue
        boxes, labels, where = objects
        sample = finish(image, boxes, labels, size, f"{path}#{info['id']}", report, strict, where)
        if sample is not None:
            samples.append(sample)
    return samples, names, report


def _size_of(info: dict[str, Any]) -> tuple[int, int] | None:
    """``(h, w)`` from the image entry (None when missing or not positive numbers: read the file)."""
    try:
        h, w = int(info["height"]), int(info["width"])
    except (KeyError, TypeError, ValueError):
        return None
    return (h, w) if h > 0 and w > 0 else None


def _objects(
    anns: list[dict[str, Any]], ids: dict[Any, int], where: str
) -> tuple[list[list[float]], list[int], list[str]] | str:
    """The boxes (``xyxy``), classes and annotation ids of one image's annotations (crowd regions left
    out), or why the image cannot be used: an annotation with an unknown category or without a
    4-number ``bbox`` would train the image with an object unlabelled."""
    boxes, labels, at = [], [], []
    for ann in anns:
        if ann.get("iscrowd", 0):
            continue
        aid = ann.get("id")
        if ann.get("category_id") not in ids:
            return f"{where}: annotation {aid} has unknown category {ann.get('category_id')!r}"
        bbox = ann.get("bbox")
        if not isinstance(bbox, list | tuple) or len(bbox) != 4:
            return f"{where}: annotation {aid} needs 'bbox': [x, y, width, height], got {bbox!r}"
        try:
            x, y, bw, bh = (float(v) for v in bbox)
        except (TypeError, ValueError):
            return f"{where}: annotation {aid} has a bbox that is not 4 numbers: {bbox!r}"
        boxes.append([x, y, x + bw, y + bh])
        labels.append(ids[ann["category_id"]])
        at.append(f"{where}: annotation {aid}")
    return boxes, labels, at


def _sniff(path: Path) -> Layout | None:
    if path.is_file():
        return (
            Layout("coco", path.parent, f"COCO JSON {path.name}", {"train": path}) if is_coco(path) else None
        )
    if not path.is_dir():
        return None
    candidates = [p for p in files_under(path, ".json", max_depth=2) if is_coco(p)]
    if not candidates:
        return None
    by_split = files_by_split(candidates, path)
    found = "COCO JSON " + ", ".join(f"{s}: {relative(p, path)}" for s, p in by_split.items())
    return Layout("coco", path, found, by_split)


def _read(layout: Layout, strict: bool) -> Splits:
    index = ImageIndex(layout.root)
    train, names, report = read_coco(layout.parts["train"], strict=strict, index=index)
    val_json = layout.parts.get("val", layout.parts.get("test"))
    val = None
    if val_json is not None:
        val, val_names, r = read_coco(val_json, strict=strict, index=index)
        report.merge(r)
        if val_names != names:
            raise DataError(
                f"{val_json}: its categories {val_names[:10]} differ from {layout.parts['train']}'s"
            )
    return Splits(train, val, names, report)


def _near_miss(path: Path) -> str | None:
    if path.is_dir():
        jsons = files_under(path, ".json", max_depth=2)
        if jsons:
            return (
                f"found {len(jsons)} .json files, none a COCO file (no top-level 'images' and 'annotations')"
            )
    return None


FORMAT = BoxFormat(
    "coco",
    "a COCO instances JSON (a file, annotations/*.json, or <split>/_annotations.coco.json)",
    _sniff,
    _read,
    _near_miss,
)
