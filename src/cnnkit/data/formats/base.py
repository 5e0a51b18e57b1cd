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

import numpy as np
import torch

from cnnkit.data.images import is_image, open_image
from cnnkit.data.report import DataReport
from cnnkit.data.walk import walk_files
from cnnkit.errors import DataError

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


def sized(
    image: Path | None, name: str, where: str | os.PathLike[str], report: DataReport, strict: bool
) -> tuple[int, int] | None:
    """The ``(h, w)`` of the image an annotation at ``where`` names, or None after reporting why not
    (not found; unreadable or over the size limits, with the reason)."""
    if image is None:
        report.add(where, f"image {name} not found", strict)
        return None
    try:
        with open_image(image) as im:
            return im.height, im.width
    except DataError as exc:
        report.add(where, str(exc), strict)
        return None


def finish(
    image: Path,
    boxes: Sequence[Sequence[float]],
    labels: Sequence[int],
    size: tuple[int, int],
    source: str,
    report: DataReport,
    strict: bool = False,
    where: Sequence[str] | None = None,
) -> DetSample | None:
    """The sample of ``image``: boxes (``xyxy`` pixels) clipped to the image, empty and repeated boxes
    dropped (counted per file). A box with a non-finite coordinate, or one more than an image size
    outside the image (a corrupt label: ``w = 1e9`` is not a box), skips the sample and is reported at
    ``where[i]`` (its line or annotation; ``source`` by default)."""
    h, w = size
    b = torch.tensor([list(map(float, box)) for box in boxes], dtype=torch.float64).view(-1, 4)
    limit = torch.tensor([w, h, w, h], dtype=torch.float64)
    bad = ~torch.isfinite(b).all(1) | (b < -limit).any(1) | (b > 2 * limit).any(1)
    if bad.any():
        i = int(bad.nonzero()[0])
        at = where[i] if where is not None else source
        what = "non-finite" if not torch.isfinite(b[i]).all() else "absurd"
        report.add(at, f"{what} box coordinates {b[i].tolist()} for a {w}x{h} image", strict)
        return None
    b = b.float()
    clipped = torch.stack(
        [b[:, 0].clamp(0, w), b[:, 1].clamp(0, h), b[:, 2].clamp(0, w), b[:, 3].clamp(0, h)], 1
    )
    n_clipped = int(((clipped - b).abs() > 0.01).sum())  # smaller moves are rounding in the label file
    if n_clipped:
        report.clipped[source] += n_clipped
    lab = torch.tensor(list(labels), dtype=torch.long).view(-1)
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    if not keep.all():
        report.dropped[source] += int((~keep).sum())
    clipped, lab = clipped[keep], lab[keep]
    if len(lab) > 1:  # the same class and box twice (a double click in the annotation tool)
        key = torch.cat([lab[:, None].float(), (clipped * 10).round()], 1)
        _, first = np.unique(key.numpy(), axis=0, return_index=True)
        if len(first) < len(lab):
            report.duplicates[source] += len(lab) - len(first)
            order = torch.from_numpy(np.sort(first))
            clipped, lab = clipped[order], lab[order]
    return DetSample(image, clipped, lab, size)


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
    return finish(image, boxes, labels, size, source, report, strict)


def files_under(root: Path, keep: Callable[[str], bool] | str, max_depth: int | None = 3) -> list[Path]:
    """Files below ``root`` (hidden folders skipped, ``max_depth`` folders deep) whose name ``keep``
    accepts, or ends with ``keep`` when it is a suffix; sorted."""
    wanted = keep if callable(keep) else (lambda name: name.lower().endswith(keep))
    return walk_files(root, wanted, max_depth)


def images_under(root: Path, max_depth: int | None = 3) -> list[Path]:
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
