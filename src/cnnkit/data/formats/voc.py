"""Pascal VOC xml wherever it is: the VOC tree (``Annotations/``, ``JPEGImages/``, ``ImageSets/Main``),
a folder of xml files beside or apart from the images (LabelImg, many dataset repositories), or split
folders of both. The image is the xml's ``filename`` relative to the xml, the image folders or the
root, else the image with the xml's stem; the ``path`` field (the author's machine) is ignored. VOC's
1-based pixel coordinates become 0-based ``xyxy``."""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from cnnkit.data.formats.base import (
    BoxFormat,
    DetSample,
    ImageIndex,
    Layout,
    Splits,
    file_head,
    files_under,
    read_names_file,
    relative,
    sample_from_named,
    sized,
    split_of,
)
from cnnkit.data.report import DataReport
from cnnkit.errors import DataError

log = logging.getLogger("cnnkit")

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")  # fmt: skip
IMAGE_DIRS = ("JPEGImages", "images", "Images", "imgs", "img")

Parsed = tuple[Path, ET.Element, list[tuple[str, list[float]]]]


def _parse(xml: Path, report: DataReport, strict: bool) -> Parsed | None:
    try:
        tree = ET.parse(xml).getroot()
    except (OSError, ET.ParseError) as exc:
        report.add(xml, f"cannot parse ({exc})", strict)
        return None
    objects = []
    for obj in tree.iter("object"):
        bb = obj.find("bndbox")
        try:
            x1, y1, x2, y2 = (float(bb.findtext(k) or "") for k in ("xmin", "ymin", "xmax", "ymax"))  # type: ignore[union-attr]
        except (AttributeError, ValueError):
            report.add(xml, f"object {obj.findtext('name')!r} has no valid bndbox", strict)
            continue
        objects.append(((obj.findtext("name") or "").strip(), [x1 - 1, y1 - 1, x2, y2]))  # 1-based -> 0-based
    return xml, tree, objects


def read_voc_files(
    xmls: Sequence[Path],
    index: ImageIndex,
    *,
    names: Sequence[str] | None = None,
    strict: bool = False,
    report: DataReport | None = None,
    voc_tree: bool = False,
) -> tuple[list[DetSample], list[str], DataReport]:
    """Samples of the given xml files. Classes: ``names``, else (in the Pascal VOC tree, ``voc_tree``)
    VOC's 20 when every object is one of them, else the sorted names found."""
    report = report if report is not None else DataReport()
    parsed = [p for p in (_parse(x, report, strict) for x in xmls) if p is not None]
    found = sorted({n for _, _, objs in parsed for n, _ in objs})
    if names is None:
        names = list(VOC_CLASSES) if voc_tree and found and set(found) <= set(VOC_CLASSES) else found
    lookup = {n: k for k, n in enumerate(names)}
    samples = []
    for xml, tree, objects in parsed:
        near = [
            xml.parent,
            *(d / sub for d in (xml.parent, xml.parent.parent, index.root) for sub in IMAGE_DIRS),
        ]
        image = index.find(tree.findtext("filename"), xml.stem, near=near)
        size = sized(image, tree.findtext("filename") or xml.stem, xml, report, strict)
        if image is None or size is None:
            continue
        sample = sample_from_named(image, size, objects, lookup, str(xml), report, strict)
        if sample is not None:
            samples.append(sample)
    return samples, list(names), report


def read_voc(
    root: str | os.PathLike[str],
    split: str = "train",
    *,
    names: list[str] | None = None,
    strict: bool = False,
) -> tuple[list[DetSample], list[str], DataReport]:
    """The Pascal VOC tree: ``Annotations/*.xml``, ``ImageSets/Main/<split>.txt`` (else every xml)."""
    root = Path(root)
    listing = root / "ImageSets" / "Main" / f"{split}.txt"
    xmls = (
        [root / "Annotations" / f"{i}.xml" for i in listing.read_text().split()]
        if listing.is_file()
        else sorted((root / "Annotations").glob("*.xml"))
    )
    names = names or class_list(root)
    return read_voc_files(xmls, ImageIndex(root), names=names, strict=strict, voc_tree=True)


def class_list(root: Path) -> list[str] | None:
    """The class order a VOC export states in ``classes.txt`` / ``labels.txt`` at its root, if any."""
    found = next((root / n for n in ("classes.txt", "labels.txt") if (root / n).is_file()), None)
    return None if found is None else read_names_file(found)


def _is_voc_xml(path: Path) -> bool:
    return b"<annotation" in file_head(path, 2048)


def _sniff(path: Path) -> Layout | None:
    if not path.is_dir():
        return None
    xmls = [p for p in files_under(path, ".xml", max_depth=2) if _is_voc_xml(p)]
    if not xmls:
        return None
    sets = path / "ImageSets" / "Main"
    folders = sorted({relative(x.parent, path) for x in xmls})
    found = f"Pascal VOC xml in {', '.join(f + '/' for f in folders[:4])} ({len(xmls)} files)"
    if (sets / "train.txt").is_file():
        found += "; splits from ImageSets/Main"
    if class_list(path) is not None:
        found += "; class order from its classes.txt/labels.txt"
    return Layout(
        "voc", path, found, {"xmls": xmls, "sets": sets if (sets / "train.txt").is_file() else None}
    )


def _read(layout: Layout, strict: bool) -> Splits:
    root, xmls = layout.root, layout.parts["xmls"]
    index = ImageIndex(root)
    report = DataReport()
    by_stem = {x.stem: x for x in xmls}
    sets: Path | None = layout.parts["sets"]
    groups: dict[str, list[Path]] = {}
    if sets is not None:
        for split, fname in (("train", "train.txt"), ("val", "val.txt")):
            if (sets / fname).is_file():
                ids = (sets / fname).read_text().split()
                groups[split] = [by_stem[i] for i in ids if i in by_stem]
                for i in ids:
                    if i not in by_stem:
                        report.add(sets / fname, f"{i} is listed but has no xml")
    else:
        for x in xmls:
            groups.setdefault(split_of(x, root) or "all", []).append(x)
    train_xmls = groups.get("train", groups.get("all", []))
    tree = (root / "Annotations").is_dir() and (root / "JPEGImages").is_dir()
    listed = class_list(root)
    train, names, _ = read_voc_files(
        train_xmls, index, names=listed, strict=strict, report=report, voc_tree=tree
    )
    val_xmls = groups.get("val", groups.get("test")) if "train" in groups else None
    val = None
    if val_xmls is not None:
        val, _, _ = read_voc_files(val_xmls, index, names=names, strict=strict, report=report)
    if not train and not val and all(why.endswith(" not found") for _, why in report.items):
        dirs = ", ".join(sorted({relative(x.parent, root) + "/" for x in xmls})[:4])
        raise DataError(
            f"{root}: found {len(xmls)} .xml files in {dirs} but no images named like them (looked beside "
            f"them, in {'/'.join(IMAGE_DIRS)} folders, and for their file names and stems under {root})"
        )
    return Splits(train, val, names, report)


def _near_miss(path: Path) -> str | None:
    if not path.is_dir():
        return None
    xmls = [p for p in files_under(path, ".xml", max_depth=2) if _is_voc_xml(p)]
    if xmls:
        return None
    others = files_under(path, ".xml", max_depth=2)
    if others:
        return f"found {len(others)} .xml files but none is a Pascal VOC <annotation>"
    return None


FORMAT = BoxFormat(
    "voc",
    "Pascal VOC xml (Annotations/, or xml files beside or apart from the images)",
    _sniff,
    _read,
    _near_miss,
)
