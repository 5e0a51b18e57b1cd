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
    cats = sorted(coco.get("categories", []), key=lambda c: c["id"])
    ids = {c["id"]: i for i, c in enumerate(cats)}
    names = [c["name"] for c in cats]
    split = path.stem.split("_")[-1]
    roots = (
        [Path(images)]
        if images
        else [path.parent, path.parent.parent, path.parent.parent / split, path.parent.parent / "images"]
    )
    per_image: dict[Any, list[dict[str, Any]]] = {}
    for ann in coco.get("annotations", []):
        per_image.setdefault(ann["image_id"], []).append(ann)
    report = DataReport()
    samples = []
    for info in coco.get("images", []):
        name = str(info["file_name"])
        image = next((r / name for r in roots if (r / name).is_file()), None)
        if image is None and index is not None:
            image = index.find(name, Path(name).stem, near=roots)
        if image is None:
            report.add(path, f"image {name} (id {info['id']}) not found in {[str(r) for r in roots]}", strict)
            continue
        boxes, labels = [], []
        for ann in per_image.get(info["id"], []):
            if ann.get("iscrowd", 0):
                continue
            if ann["category_id"] not in ids:
                report.add(
                    path, f"annotation {ann.get('id')} has unknown category {ann['category_id']}", strict
                )
                continue
            x, y, bw, bh = ann["bbox"]
            boxes.append([x, y, x + bw, y + bh])
            labels.append(ids[ann["category_id"]])
        size = (int(info["height"]), int(info["width"]))
        b, lab = finish(boxes, labels, size, f"{path}#{info['id']}", report)
        samples.append(DetSample(image, b, lab, size))
    return samples, names, report


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
