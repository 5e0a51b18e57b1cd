"""Exports of labelling tools that a small reader covers: LabelMe (one JSON per image; rectangles, and
polygons, circles or lines as their bounding box) and CreateML (one JSON list per split; boxes as
pixel centre and size)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cnnkit.data.formats.base import (
    BoxFormat,
    DetSample,
    ImageIndex,
    Layout,
    Splits,
    file_head,
    files_under,
    relative,
    sample_from_named,
    sized,
    split_of,
    splits_of,
)
from cnnkit.data.report import DataReport


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


# -- LabelMe -----------------------------------------------------------------------------------------------
def _labelme_box(shape: dict[str, Any]) -> list[float] | None:
    points = shape.get("points") or []
    if not points:
        return None
    if shape.get("shape_type") == "circle" and len(points) == 2:
        (cx, cy), (px, py) = points
        r = ((px - cx) ** 2 + (py - cy) ** 2) ** 0.5
        return [cx - r, cy - r, cx + r, cy + r]
    xs, ys = [float(p[0]) for p in points], [float(p[1]) for p in points]
    return [min(xs), min(ys), max(xs), max(ys)]


def _sniff_labelme(path: Path) -> Layout | None:
    if not path.is_dir():
        return None
    files = [p for p in files_under(path, ".json", max_depth=2) if b'"shapes"' in file_head(p)]
    if not files:
        return None
    folders = sorted({relative(p.parent, path) for p in files})
    where = ", ".join(f + "/" for f in folders[:4])
    return Layout("labelme", path, f"LabelMe JSON in {where} ({len(files)} files)", {"files": files})


def _read_labelme(layout: Layout, strict: bool) -> Splits:
    report, index = DataReport(), ImageIndex(layout.root)
    docs = []
    for path in layout.parts["files"]:
        doc = _load(path)
        if not isinstance(doc, dict) or not isinstance(doc.get("shapes"), list):
            report.add(path, "not a LabelMe JSON (no 'shapes' list)", strict)
            continue
        docs.append((path, doc))
    names = sorted({str(s.get("label", "")) for _, d in docs for s in d["shapes"]})
    lookup = {n: i for i, n in enumerate(names)}
    groups: dict[str, list[DetSample]] = {}
    for path, doc in docs:
        image = index.find(doc.get("imagePath"), path.stem, near=[path.parent])
        size = sized(image, doc.get("imagePath") or path.stem, path, report, strict)
        if image is None or size is None:
            continue
        objects = [
            (str(s.get("label", "")), box) for s in doc["shapes"] if (box := _labelme_box(s)) is not None
        ]
        sample = sample_from_named(image, size, objects, lookup, str(path), report, strict)
        if sample is not None:
            groups.setdefault(split_of(path, layout.root) or "all", []).append(sample)
    return splits_of(groups, names, report)


# -- CreateML ----------------------------------------------------------------------------------------------
def is_createml(path: Path) -> bool:
    head = file_head(path)
    return head.startswith(b"[") and b'"annotations"' in head and b'"image"' in head


def _sniff_createml(path: Path) -> Layout | None:
    if path.is_file():
        return (
            Layout("createml", path.parent, f"CreateML JSON {path.name}", {"files": [path]})
            if is_createml(path)
            else None
        )
    if not path.is_dir():
        return None
    files = [p for p in files_under(path, ".json", max_depth=2) if is_createml(p)]
    if not files:
        return None
    return Layout(
        "createml", path, "CreateML JSON " + ", ".join(relative(p, path) for p in files[:4]), {"files": files}
    )


def _read_createml(layout: Layout, strict: bool) -> Splits:
    report, index = DataReport(), ImageIndex(layout.root)
    entries: list[tuple[Path, dict[str, Any]]] = []
    for path in layout.parts["files"]:
        doc = _load(path)
        if not isinstance(doc, list):
            report.add(path, "not a CreateML JSON (a list of {image, annotations})", strict)
            continue
        entries += [(path, e) for e in doc if isinstance(e, dict)]
    names = sorted({str(a.get("label", "")) for _, e in entries for a in e.get("annotations") or []})
    lookup = {n: i for i, n in enumerate(names)}
    groups: dict[str, list[DetSample]] = {}
    for path, entry in entries:
        name = str(entry.get("image", ""))
        image = index.find(name, Path(name).stem, near=[path.parent])
        size = sized(image, name, path, report, strict)
        if image is None or size is None:
            continue
        objects = []
        for ann in entry.get("annotations") or []:
            c = ann.get("coordinates") or {}
            try:
                x, y, w, h = (float(c[k]) for k in ("x", "y", "width", "height"))
            except (KeyError, TypeError, ValueError):
                report.add(path, f"{name}: annotation without x, y, width, height", strict)
                continue
            objects.append((str(ann.get("label", "")), [x - w / 2, y - h / 2, x + w / 2, y + h / 2]))
        sample = sample_from_named(image, size, objects, lookup, f"{path}#{name}", report, strict)
        if sample is not None:
            groups.setdefault(split_of(path, layout.root) or "all", []).append(sample)
    return splits_of(groups, names, report)


LABELME = BoxFormat(
    "labelme", "LabelMe JSON files (one per image, with 'shapes')", _sniff_labelme, _read_labelme
)
CREATEML = BoxFormat("createml", "a CreateML JSON ([{image, annotations}])", _sniff_createml, _read_createml)
