"""``cnnkit data check DATA --task T``: look at a dataset before training on it.

The data is read by the task's own spec (the same layouts, the same problem report as a training run),
then summarised per split: images and classes, image sizes, label statistics (objects per image and
their sizes; mask class pixel fractions; landmark visibility), files that appear in two splits (the
same bytes: leakage), the problems found, and a verdict. ``labels.png`` draws the statistics and
``samples.jpg`` a grid of training images with their labels.

```python
from cnnkit.workflows.check import check
report = check("detect", "data/coco8")       # report.text(), report.out / "samples.jpg"
```
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnkit.data.formats.masks import read_mask
from cnnkit.data.images import open_image, read_image
from cnnkit.data.shards import is_shards
from cnnkit.engine.callbacks import drawn_or_logged
from cnnkit.engine.config import TrainConfig, config_from_dict
from cnnkit.engine.loops import new_run_dir
from cnnkit.errors import DataError
from cnnkit.viz import Shown, draw_tile, pyplot, save_figure, save_grid
from cnnkit.workflows.spec import Labelled, TaskData, TaskSpec, get_task

log = logging.getLogger("cnnkit")


@dataclass
class SplitSummary:
    """What one split holds."""

    name: str
    images: int
    per_class: Counter[int]  # images (classification, localization) or objects (detection) per class
    sizes: list[tuple[int, int]]  # (h, w) of each image
    objects: list[int] = field(default_factory=list)  # objects per image (box tasks)
    rel_boxes: list[tuple[float, float, float, float]] = field(default_factory=list)  # cx, cy, w, h / image
    pixels: dict[int, float] = field(default_factory=dict)  # segmentation: fraction of labelled pixels
    visible: list[float] = field(default_factory=list)  # landmarks: fraction of images each point is seen
    empty: int = 0  # images without any object (box tasks) or class (masks: all void)


@dataclass
class CheckReport:
    task: str
    data: str
    names: list[str]
    splits: list[SplitSummary]
    leaked: list[tuple[str, str]]  # (train file, val file) holding the same bytes
    repeated: int  # files repeated inside a split
    problems: list[tuple[str, str]]
    out: Path | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        if not self.warnings:
            return f"verdict: OK, ready to train {self.task}"
        return f"verdict: {len(self.warnings)} warnings: " + "; ".join(self.warnings)

    def text(self) -> str:
        """The report as printed."""
        lines = [f"{self.data}: {self.task} data, {len(self.names) or 'no'} classes"]
        for s in self.splits:
            lines.append(f"{s.name}: {s.images} images")
            if s.sizes:
                hs, ws = np.array([h for h, _ in s.sizes]), np.array([w for _, w in s.sizes])
                lines.append(
                    f"  image sizes (w x h): min {ws.min()}x{hs.min()}, median {int(np.median(ws))}x"
                    f"{int(np.median(hs))}, max {ws.max()}x{hs.max()}"
                )
            if s.per_class:
                what = "objects" if s.objects else "images"
                counts = ", ".join(f"{self._name(k)} {n}" for k, n in sorted(s.per_class.items()))
                lines.append(f"  {what} per class: {counts}")
            if s.objects:
                rel = np.array(s.rel_boxes) if s.rel_boxes else np.zeros((0, 4))
                lines.append(
                    f"  objects per image: mean {np.mean(s.objects):.2f}, max {max(s.objects)}; "
                    f"{s.empty} images without any; box size / image: median w {np.median(rel[:, 2]):.3f}, "
                    f"h {np.median(rel[:, 3]):.3f}"
                    if len(rel)
                    else f"  no objects; {s.empty} images"
                )
            if s.pixels:
                shares = ", ".join(f"{self._name(k)} {v:.3f}" for k, v in sorted(s.pixels.items()))
                lines.append(f"  labelled pixels per class: {shares}")
            if s.visible:
                shown = ", ".join(f"{i}: {v:.2f}" for i, v in enumerate(s.visible))
                lines.append(f"  points visible (share of images): {shown}")
        lines.append(
            f"same file in train and val: {len(self.leaked)}"
            + (f" (e.g. {self.leaked[0][0]} = {self.leaked[0][1]})" if self.leaked else "")
            + f"; repeated inside a split: {self.repeated}"
        )
        lines.append(f"problems: {len(self.problems)}" + (" (listed above)" if self.problems else ""))
        if self.out is not None:
            lines.append(f"pictures: {self.out / 'labels.png'}, {self.out / 'samples.jpg'}")
        lines.append(self.verdict)
        return "\n".join(lines)

    def _name(self, k: int) -> str:
        return self.names[k] if 0 <= k < len(self.names) else str(k)


def check(
    task: str | TaskSpec,
    data: str | os.PathLike[str],
    *,
    out: str | os.PathLike[str] | None = "runs/check",
    samples: int = 16,
    seed: int = 0,
    **options: Any,
) -> CheckReport:
    """Read ``data`` as ``task`` does for training (``options``: the spec's, e.g. ``val_fraction``) and
    summarise it; with ``out``, write ``labels.png`` and ``samples.jpg`` in a new folder under it."""
    spec = task if isinstance(task, TaskSpec) else get_task(task)
    if is_shards(data):
        raise DataError(f"{data}: shards; data check reads a dataset's files: check it before packing "
                        "(training from shards reports each bad sample with its shard and key)")  # fmt: skip
    opts: Any = config_from_dict(spec.Options, {**options, "data": str(data)}, f"data check {spec.name}")
    read = spec.build_data(opts, TrainConfig(imgsz=64, seed=seed))
    names = list(read.names or [])
    items = {"train": spec.labelled(read.train), "val": spec.labelled(read.val)}
    splits = [_summarise(split, labelled, read) for split, labelled in items.items()]
    leaked, repeated = _same_files(items)
    report = CheckReport(spec.name, str(data), names, splits, leaked, repeated, list(read.skipped))
    report.warnings = _warnings(report)
    if out is not None:
        report.out = new_run_dir(out, spec.name, "data")
        drawn_or_logged(_draw_labels, report, report.out / "labels.png")
        chosen = random.Random(seed).sample(items["train"], min(samples, len(items["train"])))
        drawn_or_logged(_draw_samples, chosen, read, names, report.out / "samples.jpg")
    return report


def _summarise(split: str, items: list[Labelled], read: TaskData) -> SplitSummary:
    summary = SplitSummary(split, len(items), Counter(), [])
    box_task = any(i.boxes is not None for i in items)
    masks = read.train  # the segmentation dataset: how its masks are read (palette, void, threshold)
    pixel_counts: Counter[int] = Counter()
    seen = None
    for item in items:
        try:
            with open_image(item.path) as im:
                h, w = im.height, im.width
        except DataError:
            continue  # the reader already reported it
        summary.sizes.append((h, w))
        summary.per_class.update(item.classes)
        if box_task:
            boxes = torch.as_tensor(item.boxes).view(-1, 4).float()
            summary.objects.append(len(boxes))
            summary.empty += int(len(boxes) == 0)
            for x1, y1, x2, y2 in boxes.tolist():
                summary.rel_boxes.append(((x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h))
        if item.mask is not None:
            mask = read_mask(item.mask, masks.palette, masks.ignore_index, masks.threshold)
            values, counts = np.unique(mask[mask != masks.ignore_index], return_counts=True)
            pixel_counts.update(dict(zip(values.tolist(), counts.tolist())))
            summary.empty += int(len(values) == 0)
        if item.visible is not None:
            vis = torch.as_tensor(item.visible).float()
            seen = vis if seen is None else seen + vis
    total = sum(pixel_counts.values())
    summary.pixels = {k: v / total for k, v in sorted(pixel_counts.items())} if total else {}
    if seen is not None:
        summary.visible = (seen / max(1, len(items))).tolist()
    return summary


def _same_files(items: dict[str, list[Labelled]]) -> tuple[list[tuple[str, str]], int]:
    """Files of train and val with the same bytes (leakage), and files repeated inside a split."""
    first: dict[str, dict[str, str]] = {}
    repeated = 0
    for split, labelled in items.items():
        first[split] = {}
        for item in labelled:
            digest = hashlib.sha1(Path(item.path).read_bytes()).hexdigest()
            if digest in first[split]:
                repeated += 1
            first[split].setdefault(digest, str(item.path))
    leaked = [(first["train"][d], first["val"][d]) for d in first["train"].keys() & first["val"].keys()]
    return sorted(leaked), repeated


def _warnings(report: CheckReport) -> list[str]:
    out = []
    if report.leaked:
        out.append(f"{len(report.leaked)} files are in both train and val (leakage: the val score flatters)")
    if report.problems:
        out.append(f"{len(report.problems)} samples were skipped (see the problems)")
    train = report.splits[0]
    for split in report.splits if train.per_class and len(report.names) > 1 else ():
        missing = [report._name(k) for k in range(len(report.names)) if split.per_class[k] == 0]
        if missing:
            out.append(f"classes without a {split.name} sample: {missing}")
        counts = [n for n in train.per_class.values() if n]
        if counts and max(counts) > 10 * min(counts):
            out.append(f"classes are unbalanced ({min(counts)} to {max(counts)} per class)")
    if train.pixels and len(report.names) > 1:
        absent = [report._name(k) for k in range(len(report.names)) if k not in train.pixels]
        if absent:
            out.append(f"classes with no labelled pixel in train: {absent}")
    return out


def _draw_labels(report: CheckReport, path: Path) -> None:
    """Class histogram per split, then box centres and sizes, mask class fractions or point visibility."""
    plt = pyplot()
    train = report.splits[0]
    panels = 1 + (2 if train.rel_boxes else 0) + bool(train.pixels or train.visible)
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.6), squeeze=False)
    ax = axes[0][0]
    keys = sorted({k for s in report.splits for k in (s.per_class or s.pixels)})
    for i, s in enumerate(report.splits):
        values = [s.per_class[k] if s.per_class else s.pixels.get(k, 0.0) for k in keys]
        ax.bar(np.arange(len(keys)) + (i - 0.5) * 0.4, values, 0.4, label=s.name)
    ax.set_xticks(range(len(keys)), [report._name(k) for k in keys], rotation=45, ha="right")
    ax.set_title("pixel share per class" if train.pixels else "samples per class")
    ax.legend()
    k = 1
    if train.rel_boxes:
        rel = np.array(train.rel_boxes)
        axes[0][1].scatter(rel[:, 0], rel[:, 1], s=4, alpha=0.5)
        axes[0][1].set(xlim=(0, 1), ylim=(1, 0), title="box centres (train, / image)", xlabel="x", ylabel="y")
        axes[0][2].scatter(rel[:, 2], rel[:, 3], s=4, alpha=0.5)
        axes[0][2].set(xlim=(0, 1), ylim=(0, 1), title="box sizes (train, / image)", xlabel="w", ylabel="h")
        k = 3
    if train.visible:
        axes[0][k].bar(range(len(train.visible)), train.visible)
        axes[0][k].set(ylim=(0, 1), title="points visible (train)", xlabel="point")
    save_figure(fig, path)


def _draw_samples(items: list[Labelled], read: TaskData, names: list[str], path: Path) -> None:
    """A grid of images with their labels: boxes with names, mask overlays, points with indices, and
    the class name under each classification image."""
    ds = read.train
    void = getattr(ds, "ignore_index", None)
    tiles = []
    for item in items:
        mask = None if item.mask is None else read_mask(item.mask, ds.palette, ds.ignore_index, ds.threshold)
        boxes = None if item.boxes is None else torch.as_tensor(item.boxes).view(-1, 4)
        points = None if item.points is None else torch.as_tensor(item.points)
        visible = None if item.visible is None else torch.as_tensor(item.visible)
        shown = Shown(read_image(item.path), item.classes, boxes, None, mask, points, visible)
        tiles.append(draw_tile(shown, names, void=void if isinstance(void, int) else None))
    save_grid(tiles, path)
