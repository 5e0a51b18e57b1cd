"""What every box format shares: the sample type, the registry entry, finding images and splits.

A format is a :class:`BoxFormat`: ``sniff(path)`` says whether ``path`` is its layout and returns a
:class:`Layout` (what it found, said in the log), ``read(layout, strict)`` returns the samples of each
split. Coordinates end as 0-based ``xyxy`` pixels clipped to the image, whatever the format's
convention (VOC's 1-based pixels, YOLO's normalised centres, COCO's ``x, y, w, h``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from cnnkit.data.images import is_image
from cnnkit.data.report import DataReport

#: folder names of the validation split, in the order they are looked for
VAL_NAMES = ("val", "valid", "validation", "test")
SPLIT_NAMES = ("train", *VAL_NAMES)


@dataclass(frozen=True)
class DetSample:
    path: Path
    boxes: torch.Tensor  # [N, 4] xyxy, pixels
    labels: torch.Tensor  # [N] class indices
    size: tuple[int, int]  # (height, width)


@dataclass
class Layout:
    """What a sniffer found: the format, where its files are, and a sentence saying so."""

    format: str
    root: Path
    found: str  # e.g. "Pascal VOC xml in annotations/ (200 files), images in images/"
    parts: dict[str, Any] = field(default_factory=dict)  # format-specific: files per split, names...


@dataclass
class Splits:
    """Samples per split (``val`` None: the data has no validation split), names, and what was wrong."""

    train: list[DetSample]
    val: list[DetSample] | None
    names: list[str]
    report: DataReport


def splits_of(groups: dict[str, list[DetSample]], names: list[str], report: DataReport) -> Splits:
    """Samples grouped by the split their files were found in: ``train`` and ``val`` (else ``test``)
    when there is a training group, else all of them as training data without a validation split."""
    if "train" in groups:
        return Splits(groups["train"], groups.get("val", groups.get("test")), names, report)
    return Splits([s for g in groups.values() for s in g], None, names, report)


@dataclass(frozen=True)
class BoxFormat:
    name: str
    description: str  # what it looks for, said when nothing fits
    sniff: Callable[[Path], Layout | None]
    read: Callable[[Layout, bool], Splits]
    near_miss: Callable[[Path], str | None] = lambda path: None  # "found X but not Y", when it almost fits


def image_size(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except OSError:
        return None


def finish(
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


def sample_from_named(
    image: Path,
    size: tuple[int, int],
    objects: Sequence[tuple[str, list[float]]],
    index: dict[str, int],
    source: str,
    report: DataReport,
    strict: bool,
) -> DetSample | None:
    """A sample from ``(class name, xyxy)`` objects; an unknown class skips the sample."""
    boxes, labels = [], []
    for name, box in objects:
        if name not in index:
            report.add(source, f"class {name!r} is not among {list(index)[:20]}", strict)
            return None
        boxes.append(box)
        labels.append(index[name])
    b, lab = finish(boxes, labels, size, source, report)
    return DetSample(image, b, lab, size)


def files_under(root: Path, keep: Callable[[str], bool] | str, max_depth: int = 3) -> list[Path]:
    """Files below ``root`` (hidden folders skipped, ``max_depth`` folders deep) whose name ``keep``
    accepts, or ends with ``keep`` when it is a suffix; sorted."""
    wanted = keep if callable(keep) else (lambda name: name.lower().endswith(keep))
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        depth = len(Path(dirpath).relative_to(root).parts)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and depth < max_depth)
        out += [Path(dirpath) / f for f in filenames if wanted(f)]
    return sorted(out)


def images_under(root: Path, max_depth: int = 3) -> list[Path]:
    """Image files below ``root`` (hidden folders skipped), sorted."""
    return files_under(root, is_image, max_depth)


def file_head(path: Path, size: int = 4096) -> bytes:
    """The first ``size`` bytes of a file, BOM and leading whitespace dropped (``b""`` if unreadable):
    enough for a sniffer to tell a format without parsing a file that may run to hundreds of MB."""
    try:
        with path.open("rb") as f:
            return f.read(size).lstrip(b"\xef\xbb\xbf \t\r\n")
    except OSError:
        return b""


class ImageIndex:
    """Finds the image an annotation names: by its path relative to the places it may be relative to,
    else by file name, else by stem anywhere under the dataset root (annotation tools record paths of
    the author's machine, and exports rename folders)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._by_name: dict[str, list[Path]] | None = None  # built on the first lookup by name
        self._by_stem: dict[str, list[Path]] = {}

    def _index(self) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
        if self._by_name is None:
            self._by_name = {}
            for p in images_under(self.root):
                self._by_name.setdefault(p.name, []).append(p)
                self._by_stem.setdefault(p.stem, []).append(p)
        return self._by_name, self._by_stem

    def find(self, name: str | None, stem: str, near: Iterable[Path] = ()) -> Path | None:
        """``name`` (a file name or relative path) resolved against ``near`` folders and the root, else
        the image called ``name``, else one whose stem is ``stem``; the closest to ``near`` wins."""
        near = [*near, self.root]
        if name:
            name = name.replace("\\", "/")
            for base in near:
                candidate = base / name
                if candidate.is_file() and is_image(candidate):
                    return candidate
        by_name, by_stem = self._index()
        found = by_name.get(Path(name).name) if name else None
        if not found:
            found = by_stem.get(stem) or (by_stem.get(Path(name).stem) if name else None)
        return _closest(found, near) if found else None


def _closest(paths: list[Path], near: Sequence[Path]) -> Path:
    """The path sharing the longest folder prefix with the first of ``near``."""
    anchor = near[0].parts

    def shared(p: Path) -> int:
        return next(
            (i for i, (a, b) in enumerate(zip(p.parts, anchor)) if a != b), min(len(p.parts), len(anchor))
        )

    return max(paths, key=shared)


def split_of(path: Path, root: Path) -> str | None:
    """``train`` / ``val`` when a folder between ``root`` and ``path`` is named like a split
    (``valid``, ``validation`` and ``test`` count as validation), else None."""
    for part in path.relative_to(root).parts[:-1]:
        low = part.lower()
        if low == "train" or low.startswith("train"):
            return "train"
        if low in VAL_NAMES or low.startswith("val"):
            return "val"
    return None


def split_name(path: Path, root: Path) -> str | None:
    """``train`` / ``val`` / ``test`` from an annotation file's stem (``instances_train2017``,
    ``valid.csv``) or else a folder between ``root`` and it."""
    stem = path.stem.lower().replace("instances_", "")
    for key, split in (("train", "train"), ("valid", "val"), ("val", "val"), ("test", "test")):
        if stem.startswith(key) or stem.endswith(key) or f"_{key}" in stem:
            return split
    return split_of(path, root)


def files_by_split(files: Sequence[Path], root: Path) -> dict[str, Path]:
    """One annotation file per split, by :func:`split_name`; without one named for training, the
    first file is the training set (and the data has no validation split)."""
    parts: dict[str, Path] = {}
    for p in files:
        parts.setdefault(split_name(p, root) or "all", p)
    return parts if "train" in parts else {"train": parts.get("all", files[0])}


def read_names_file(path: Path) -> list[str]:
    """One class name per line (``classes.txt``, ``obj.names``...), blank lines ignored."""
    return [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]


def relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root)) or "."
    except ValueError:
        return str(path)
