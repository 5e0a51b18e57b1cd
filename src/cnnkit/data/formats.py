"""Box dataset formats as a registry: each format can tell whether a path is its layout (``sniff``) and
read it into :class:`~cnnkit.data.detect.DetSample` s. Detection and localization read boxes through
these same readers, so a format is parsed one way everywhere (VOC's 1-based pixels included)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cnnkit.data.classify import split_dataset
from cnnkit.data.detect import DetSample, read_coco, read_voc, read_yolo
from cnnkit.data.report import DataReport
from cnnkit.errors import DataError
from cnnkit.io import load_yaml

log = logging.getLogger("cnnkit")


@dataclass
class BoxData:
    """Train and validation samples of a box dataset, its class names, and what the readers reported."""

    train: list[DetSample]
    val: list[DetSample]
    names: list[str]
    report: DataReport
    format: str


Splits = tuple[list[DetSample], list[DetSample] | None, list[str], list[DataReport]]


@dataclass(frozen=True)
class BoxFormat:
    name: str
    description: str
    sniff: Callable[[Path], bool]
    read: Callable[[Path, Path | None, bool], Splits]


_FORMATS: list[BoxFormat] = []


def register_box_format(fmt: BoxFormat) -> BoxFormat:
    if any(f.name == fmt.name for f in _FORMATS):
        raise DataError(f"box format {fmt.name!r} is already registered")
    _FORMATS.append(fmt)
    return fmt


def _read_yolo(path: Path, val: Path | None, strict: bool) -> Splits:
    yaml_path = path / "data.yaml" if path.is_dir() else path
    train, names, report = read_yolo(yaml_path, "train", strict=strict)
    reports, val_samples = [report], None
    split = next((k for k in ("val", "valid", "test") if load_yaml(yaml_path).get(k)), None)
    if split is not None:
        val_samples, _, r = read_yolo(yaml_path, split, strict=strict)
        reports.append(r)
    return train, val_samples, names, reports


def _coco_pair(root: Path) -> tuple[Path, Path | None]:
    found = sorted((root / "annotations").glob("instances_*.json"))
    train = next((p for p in found if "train" in p.stem), None)
    val = next((p for p in found if "val" in p.stem), None)
    if train is None:
        raise DataError(f"{root}/annotations: no instances_train*.json")
    return train, val


def _read_coco(path: Path, val: Path | None, strict: bool) -> Splits:
    train_json, found_val = (path, None) if path.suffix == ".json" else _coco_pair(path)
    val_json = val if val is not None else found_val
    train, names, report = read_coco(train_json, strict=strict)
    reports, val_samples = [report], None
    if val_json is not None:
        val_samples, _, r = read_coco(val_json, strict=strict)
        reports.append(r)
    return train, val_samples, names, reports


def _read_voc(path: Path, val: Path | None, strict: bool) -> Splits:
    train, names, report = read_voc(path, "train", strict=strict)
    reports, val_samples = [report], None
    if (path / "ImageSets" / "Main" / "val.txt").is_file():
        val_samples, _, r = read_voc(path, "val", names=names, strict=strict)
        reports.append(r)
    return train, val_samples, names, reports


register_box_format(
    BoxFormat(
        "yolo",
        "an ultralytics YOLO data.yaml (or a folder holding one)",
        lambda p: p.suffix in (".yaml", ".yml") or (p.is_dir() and (p / "data.yaml").is_file()),
        _read_yolo,
    )
)
register_box_format(
    BoxFormat(
        "coco",
        "a COCO instances JSON, or a folder with annotations/instances_*.json",
        lambda p: p.suffix == ".json" or (p.is_dir() and (p / "annotations").is_dir()),
        _read_coco,
    )
)
register_box_format(
    BoxFormat(
        "voc",
        "a Pascal VOC root with Annotations/",
        lambda p: p.is_dir() and (p / "Annotations").is_dir(),
        _read_voc,
    )
)


def sniff_box_format(data: str | os.PathLike[str]) -> BoxFormat | None:
    path = Path(data)
    return next((f for f in _FORMATS if f.sniff(path)), None)


def read_box_data(
    data: str | os.PathLike[str],
    *,
    val: str | os.PathLike[str] | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    strict: bool = False,
) -> BoxData:
    """Train and validation samples, class names and what the readers fixed or skipped, from whichever
    registered format ``data`` is in; without a validation split a seeded fraction is held out."""
    fmt = sniff_box_format(data)
    if fmt is None:
        looked_for = "; ".join(f.description for f in _FORMATS)
        raise DataError(f"{data}: not a detection dataset (looked for {looked_for})")
    train, val_samples, names, reports = fmt.read(Path(data), None if val is None else Path(val), strict)
    report = DataReport()
    for r in reports:
        report.merge(r)
    if val_samples is None:
        tr, va = split_dataset(len(train), val_fraction, seed)
        train, val_samples = [train[i] for i in tr], [train[i] for i in va]
        log.debug("%s: no validation split; held out a seeded %.0f%%", data, 100 * val_fraction)
    if not train:
        first = f"; first: {report.problems[0]}" if report.problems else ""
        raise DataError(f"{data}: no usable training image ({report.summary()}){first}")
    return BoxData(train, val_samples, names, report, fmt.name)
