"""Box dataset formats as a registry: each format tells whether a path is its layout (``sniff``, which
says what it found) and reads it into :class:`~cnnkit.data.formats.base.DetSample` s. Detection and
localization read boxes through these same readers, so a format is parsed one way everywhere (VOC's
1-based pixels included).

Formats, in the order they are tried: ultralytics YOLO ``data.yaml``; COCO JSON; Pascal VOC xml
anywhere; YOLO txt labels without a ``data.yaml``; LabelMe; CreateML; a box CSV.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from cnnkit.data.classify import split_dataset
from cnnkit.data.formats import box_csv, coco, tools, voc, yolo
from cnnkit.data.formats.base import BoxFormat, DetSample, Layout, Splits
from cnnkit.data.report import DataReport
from cnnkit.errors import DataError

log = logging.getLogger("cnnkit")


@dataclass
class BoxData:
    """Train and validation samples of a box dataset, its class names, what the readers reported, the
    format's name and what the sniffer found."""

    train: list[DetSample]
    val: list[DetSample]
    names: list[str]
    report: DataReport
    format: str
    found: str = ""


_FORMATS: list[BoxFormat] = []


def register_box_format(fmt: BoxFormat) -> BoxFormat:
    if any(f.name == fmt.name for f in _FORMATS):
        raise DataError(f"box format {fmt.name!r} is already registered")
    _FORMATS.append(fmt)
    return fmt


for _fmt in (
    yolo.YAML_FORMAT,
    coco.FORMAT,
    voc.FORMAT,
    yolo.PLAIN_FORMAT,
    tools.LABELME,
    tools.CREATEML,
    box_csv.FORMAT,
):
    register_box_format(_fmt)


def box_formats() -> list[BoxFormat]:
    return list(_FORMATS)


def sniff_box_format(data: str | os.PathLike[str]) -> Layout | None:
    """The layout of the first registered format that recognises ``data``, or None."""
    path = Path(data)
    for fmt in _FORMATS:
        layout = fmt.sniff(path)
        if layout is not None:
            return layout
    return None


def not_a_box_dataset(data: str | os.PathLike[str], also: str = "") -> DataError:
    """What was looked for (the registered formats, and ``also``), with the closest near miss."""
    path = Path(data)
    if not path.exists():
        return DataError(f"{data}: no such file or directory")
    misses = [m for f in _FORMATS if (m := f.near_miss(path))]
    looked_for = "; ".join([*(f.description for f in _FORMATS), *([also] if also else [])])
    hint = f" Closest: {misses[0]}." if misses else ""
    if layout_task(path) == "segment":
        hint = f" It is laid out for segmentation (images beside masks): cnnkit train segment --data {data}."
    return DataError(f"{data}: not a box dataset.{hint} Looked for: {looked_for}")


def read_box_data(
    data: str | os.PathLike[str],
    *,
    val: str | os.PathLike[str] | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    strict: bool = False,
) -> BoxData:
    """Train and validation samples, class names and what the readers fixed or skipped, from whichever
    registered format ``data`` is in. ``val``: a separate validation set (any format; classes matched
    by name). Without a validation split a seeded fraction is held out (said in the log)."""
    layout = sniff_box_format(data)
    if layout is None:
        raise not_a_box_dataset(data)
    fmt = next(f for f in _FORMATS if f.name == layout.format)
    splits: Splits = fmt.read(layout, strict)
    train, val_samples, names, report = splits.train, splits.val, splits.names, splits.report
    if val is not None:
        other = read_box_data(val, val_fraction=0.0, seed=seed, strict=strict)
        val_samples = _renamed([*other.train, *other.val], other.names, names, val)
        report.merge(other.report)
    how = "its own validation split"
    if val_samples is None and val_fraction == 0:  # all of it is wanted (a separate --val set)
        val_samples, how = [], "no validation split"
    elif val_samples is None:
        tr, va = split_dataset(len(train), val_fraction, seed)
        train, val_samples = [train[i] for i in tr], [train[i] for i in va]
        how = f"no validation split: seeded {100 - 100 * val_fraction:.0f}/{100 * val_fraction:.0f} split"
    if not train:
        first = f"; first: {report.problems[0]}" if report.problems else ""
        raise DataError(f"{data}: {layout.found}, but no usable training image ({report.summary()}){first}")
    log.info(
        "%s: %s; %s: %d training and %d validation images, %d classes; %s",
        data,
        layout.found,
        how,
        len(train),
        len(val_samples),
        len(names),
        report.summary(),
    )
    report.log_problems(log)
    return BoxData(train, val_samples, names, report, layout.format, layout.found)


def _renamed(samples: list[DetSample], have: list[str], want: list[str], source: object) -> list[DetSample]:
    """Samples of another dataset with their class indices renumbered to ``want`` by name."""
    if have == want:
        return samples
    missing = sorted(set(have) - set(want))
    if missing:
        raise DataError(f"{source}: classes {missing[:10]} are not among the training classes {want[:20]}")
    index = [want.index(n) for n in have]
    lookup = torch.tensor(index, dtype=torch.long)
    return [DetSample(s.path, s.boxes, lookup[s.labels], s.size) for s in samples]


__all__ = [
    "BoxData",
    "BoxFormat",
    "DetSample",
    "Layout",
    "box_formats",
    "not_a_box_dataset",
    "read_box_data",
    "register_box_format",
    "sniff_box_format",
]


def layout_task(root: str | os.PathLike[str]) -> str | None:
    """``"detect"`` or ``"segment"`` when ``root`` is laid out for that task (an image folder beside
    labels, masks or annotations), else None: a class-folder reader must not learn "images vs masks".
    Only a folder with an image folder (``images/``, ``JPEGImages/``...) is sniffed, so class folders of
    a large dataset cost one directory listing."""
    from cnnkit.data.formats.masks import IMAGE_DIRS, resolve_segmentation_data

    root = Path(root)
    if not root.is_dir():
        return None
    subs = {d.name.lower() for d in root.iterdir() if d.is_dir()}
    if not subs & set(IMAGE_DIRS) and not any((root / s).is_dir() for s in ("train/images", "train/image")):
        return None
    if sniff_box_format(root) is not None:
        return "detect"
    try:
        resolve_segmentation_data(root)
    except DataError:
        return None
    return "segment"
