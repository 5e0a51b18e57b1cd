"""Write any readable box dataset in another format: YOLO (``data.yaml``, normalised centres), COCO
(``annotations/instances_<split>.json``, ``x, y, w, h``) or Pascal VOC (xml, 1-based pixels). Images are
copied (never moved, never re-encoded); the output folder must be new or empty, so nothing is
overwritten. Splits are kept as the source has them (a source without a validation split is written
as ``train`` only)."""

from __future__ import annotations

import json
import os
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from cnnkit.data.formats import box_formats, not_a_box_dataset, sniff_box_format
from cnnkit.data.formats.base import DetSample
from cnnkit.errors import DataError

TARGETS = ("yolo", "coco", "voc")


def convert(
    data: str | os.PathLike[str], to: str, out: str | os.PathLike[str], *, strict: bool = False
) -> Path:
    """Read ``data`` (any registered format) and write it as ``to`` under ``out``; returns ``out``."""
    if to not in TARGETS:
        raise DataError(f"cannot write {to!r}; formats: {', '.join(TARGETS)}")
    layout = sniff_box_format(data)
    if layout is None:
        raise not_a_box_dataset(data)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out}: exists and is not empty; choose a new folder (nothing is overwritten)")
    source = Path(data).resolve()
    if out.resolve() == source or source in out.resolve().parents:
        raise DataError(f"{out}: inside the source dataset {data}; choose a folder outside it")
    fmt = next(f for f in box_formats() if f.name == layout.format)
    splits = fmt.read(layout, strict)
    parts = {"train": splits.train, **({"val": splits.val} if splits.val else {})}
    out.mkdir(parents=True, exist_ok=True)
    WRITERS[to](parts, splits.names, out)
    return out


def _copy_images(samples: list[DetSample], folder: Path, taken: set[str] | None = None) -> list[str]:
    """Copy each sample's image into ``folder`` under a file name whose stem is unique (in ``taken``:
    label files and VOC ids are named by stem); returns the names."""
    folder.mkdir(parents=True, exist_ok=True)
    taken = set() if taken is None else taken
    names: list[str] = []
    for s in samples:
        stem, k = s.path.stem, 1
        while stem in taken:
            stem, k = f"{s.path.stem}_{k}", k + 1
        taken.add(stem)
        shutil.copy2(s.path, folder / f"{stem}{s.path.suffix}")
        names.append(f"{stem}{s.path.suffix}")
    return names


def _num(v: float) -> str:
    return f"{v:.6f}".rstrip("0").rstrip(".")


def write_yolo(parts: dict[str, list[DetSample]], names: list[str], out: Path) -> None:
    for split, samples in parts.items():
        files = _copy_images(samples, out / "images" / split)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        for s, file in zip(samples, files):
            h, w = s.size
            lines = [
                " ".join(
                    [
                        str(c),
                        *(
                            _num(v)
                            for v in ((x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h)
                        ),
                    ]
                )
                for (x1, y1, x2, y2), c in zip(s.boxes.tolist(), s.labels.tolist())
            ]
            (out / "labels" / split / Path(file).with_suffix(".txt")).write_text(
                "".join(f"{ln}\n" for ln in lines)
            )
    config = {"path": ".", **{split: f"images/{split}" for split in parts}, "names": list(names)}
    (out / "data.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def write_coco(parts: dict[str, list[DetSample]], names: list[str], out: Path) -> None:
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": n, "supercategory": "none"} for i, n in enumerate(names)]
    for split, samples in parts.items():
        files = _copy_images(samples, out / split)
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        for image_id, (s, file) in enumerate(zip(samples, files), start=1):
            h, w = s.size
            images.append({"id": image_id, "file_name": file, "height": h, "width": w})
            for (x1, y1, x2, y2), c in zip(s.boxes.tolist(), s.labels.tolist()):
                bw, bh = x2 - x1, y2 - y1
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": c + 1,
                        "bbox": [x1, y1, bw, bh],
                        "area": bw * bh,
                        "iscrowd": 0,
                    }
                )
        doc = {"images": images, "annotations": annotations, "categories": categories}
        (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))


def write_voc(parts: dict[str, list[DetSample]], names: list[str], out: Path) -> None:
    (out / "Annotations").mkdir(parents=True, exist_ok=True)
    (out / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    stems: set[str] = set()  # one namespace across splits: VOC lists ids, not paths
    for split, samples in parts.items():
        files = _copy_images(samples, out / "JPEGImages", stems)
        for s, file in zip(samples, files):
            (out / "Annotations" / f"{Path(file).stem}.xml").write_text(_voc_xml(s, file, names))
        ids = "".join(f"{Path(file).stem}\n" for file in files)
        (out / "ImageSets" / "Main" / f"{split}.txt").write_text(ids)
    (out / "classes.txt").write_text("".join(f"{n}\n" for n in names))  # VOC xml has no class list


def _voc_xml(s: DetSample, file: str, names: list[str]) -> str:
    root = ET.Element("annotation")
    ET.SubElement(root, "filename").text = file
    size = ET.SubElement(root, "size")
    for key, value in (("width", s.size[1]), ("height", s.size[0]), ("depth", 3)):
        ET.SubElement(size, key).text = str(value)
    for (x1, y1, x2, y2), c in zip(s.boxes.tolist(), s.labels.tolist()):
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = names[c]
        ET.SubElement(obj, "difficult").text = "0"
        box = ET.SubElement(obj, "bndbox")
        for key, value in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):  # VOC is 1-based
            ET.SubElement(box, key).text = _num(value)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


WRITERS: dict[str, Callable[[dict[str, list[DetSample]], list[str], Path], None]] = {
    "yolo": write_yolo,
    "coco": write_coco,
    "voc": write_voc,
}
