"""Classification datasets: a folder per class (ImageFolder layout) or a CSV of ``path,label``."""

from __future__ import annotations

import csv
import logging
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from cnnkit.data.images import first_readable, is_image, keep_readable, read_image
from cnnkit.data.report import DataReport
from cnnkit.data.walk import walk_files
from cnnkit.errors import DataError

log = logging.getLogger(__name__)
Transform = Callable[[torch.Tensor], torch.Tensor]


Skipped = DataReport  # the name of the first release


def scan_image_folder(
    root: str | os.PathLike[str], *, empty_ok: bool = False
) -> tuple[list[tuple[Path, int]], list[str]]:
    """``root/<class>/**/<image>`` -> ``(samples, class_names)``, classes sorted by folder name.

    A class folder without images is an error (it would be a class the model never sees), or with
    ``empty_ok`` (a validation folder, whose classes come from the training data) a warning."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory (expected one folder per class)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class folders found (expected {root}/<class name>/<images>)")
    samples, empty = [], []
    for idx, name in enumerate(classes):
        files = walk_files(root / name, is_image, within=root)
        if not files:
            empty.append(name)
        samples += [(f, idx) for f in files]
    if empty and empty_ok:
        log.warning("%s: class folders %s hold no images", root, empty)
    elif empty:
        raise DataError(
            f"{root}: class folders {empty} hold no images; add images or remove the folders "
            "(an empty folder would be a class the model can never learn)"
        )
    return samples, classes


def read_label_csv(
    path: str | os.PathLike[str], class_names: Sequence[str] | None = None
) -> tuple[list[tuple[Path, int]], list[str]]:
    """A ``path,label`` CSV (a header row is detected and skipped); image paths are relative to the CSV.

    Labels may be class names or integer indices. A malformed row raises :class:`DataError` with its
    line number.
    """
    path = Path(path)
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()))
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    start = 1 if rows and rows[0] and not is_image(rows[0][0]) else 0
    entries = []
    for lineno, row in enumerate(rows[start:], start=start + 1):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"{path}:{lineno}: expected 'path,label', got {','.join(row)!r}")
        entries.append((lineno, row[0].strip(), row[1].strip()))
    labels = [lab for _, _, lab in entries]
    numeric = all(lab.lstrip("-").isdigit() for lab in labels)
    if class_names is None:
        class_names = (
            [str(i) for i in range(max(int(lab) for lab in labels) + 1)]
            if numeric and labels
            else sorted(set(labels))
        )
    index = {name: i for i, name in enumerate(class_names)}
    samples = []
    for lineno, rel, lab in entries:
        if lab in index:
            label = index[lab]
        elif numeric and 0 <= int(lab) < len(class_names):
            label = int(lab)
        else:
            raise DataError(f"{path}:{lineno}: unknown label {lab!r} (classes: {list(class_names)[:20]})")
        samples.append(((path.parent / rel), label))
    return samples, list(class_names)


class ClassificationDataset(Dataset[tuple[torch.Tensor, int]]):
    """Images and class indices; unreadable images are skipped and listed in ``skipped``.

    Every file's header is checked when the dataset is built; an image that still fails to decode
    later is logged and replaced by the next readable one, so an epoch never stops on a bad file.
    """

    def __init__(
        self,
        samples: Sequence[tuple[Path, int]],
        class_names: Sequence[str],
        transform: Transform | None = None,
        *,
        source: str = "dataset",
        verify: bool = True,
        strict: bool = False,
    ) -> None:
        self.class_names = list(class_names)
        self.transform = transform
        self.skipped = DataReport()
        good = keep_readable(samples, lambda s: s[0], self.skipped, strict) if verify else list(samples)
        if self.skipped:
            log.warning(
                "%s: skipped %d unreadable images:\n%s", source, len(self.skipped), self.skipped.report()
            )
        if not good:
            raise DataError(
                f"{source}: no readable image ({len(samples)} files, {len(self.skipped)} unreadable)"
            )
        self.samples = good
        self.targets = [label for _, label in good]

    @classmethod
    def from_folder(
        cls,
        root: str | os.PathLike[str],
        transform: Transform | None = None,
        class_names: Sequence[str] | None = None,
    ) -> ClassificationDataset:
        samples, found = scan_image_folder(root)
        if class_names is not None and list(class_names) != found:
            mapping = {name: i for i, name in enumerate(class_names)}
            unknown = sorted(set(found) - set(mapping))
            if unknown:
                raise DataError(
                    f"{root}: class folders {unknown} are not among the classes {list(class_names)}"
                )
            samples = [(p, mapping[found[label]]) for p, label in samples]
            found = list(class_names)
        return cls(samples, found, transform, source=str(root))

    @classmethod
    def from_csv(
        cls,
        path: str | os.PathLike[str],
        transform: Transform | None = None,
        class_names: Sequence[str] | None = None,
    ) -> ClassificationDataset:
        samples, names = read_label_csv(path, class_names)
        return cls(samples, names, transform, source=str(path))

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        """The decoded image ``[3, H, W] uint8`` and label of ``index``, without transforms."""
        path, label = self.samples[index]
        return read_image(path), label

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img, label = first_readable(index, len(self.samples), self.load)
        return (self.transform(img) if self.transform else img), label


def split_dataset(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded train/val split of ``range(n)``, stratification left to the caller."""
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be between 0 and 1 (the share held out), got {val_fraction}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(n * val_fraction))
    return order[n_val:], order[:n_val]
