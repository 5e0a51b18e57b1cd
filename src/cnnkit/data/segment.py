"""Semantic segmentation datasets: image/mask pairs (found by :mod:`cnnkit.data.formats.masks`, which
knows the published layouts and mask encodings), the paired transforms, and a class colour map."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from cnnkit.data.formats.masks import (  # re-exported: the names of the first release
    SegmentationSpec as SegmentationSpec,
)
from cnnkit.data.formats.masks import read_mask
from cnnkit.data.formats.masks import resolve_segmentation_data as resolve_segmentation_data
from cnnkit.data.images import read_image
from cnnkit.data.report import DataReport
from cnnkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from cnnkit.errors import DataError

log = logging.getLogger(__name__)


class SegmentationTransform:
    """Image and mask transformed together (``tv_tensors.Mask`` gets nearest-neighbour resampling).

    Training: random resized crop (``scale``), horizontal flip, colour jitter on the image only.
    Evaluation: the image resized to ``imgsz x imgsz`` and the mask kept at its own resolution, so
    metrics are computed at the original size (predictions are upsampled to it), the way published
    segmentation results are; ``full_res=False`` resizes the mask too.
    """

    def __init__(
        self,
        imgsz: int,
        train: bool,
        scale: tuple[float, float] = (0.5, 1.0),
        hflip: float = 0.5,
        jitter: float = 0.2,
        full_res: bool = True,
    ) -> None:
        steps: list[torch.nn.Module]
        self.image_only = not train and full_res
        if train:
            steps = [v2.RandomResizedCrop(imgsz, scale=scale, antialias=True), v2.RandomHorizontalFlip(hflip)]
            if jitter > 0:
                steps.append(v2.ColorJitter(jitter, jitter, jitter))
        else:
            steps = [v2.Resize((imgsz, imgsz), antialias=True)]
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        self.transform = v2.Compose(steps)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.image_only:
            return self.transform(tv_tensors.Image(image)).as_subclass(torch.Tensor), mask.long()
        img, msk = self.transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return img.as_subclass(torch.Tensor), msk.as_subclass(torch.Tensor).long()


def collate_segmentation(
    batch: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor | list[torch.Tensor]]:
    """Images stacked; masks stacked when they share a size, else a list (full-resolution evaluation
    of images of different sizes)."""
    images = torch.stack([b[0] for b in batch])
    masks = [b[1] for b in batch]
    same = all(m.shape == masks[0].shape for m in masks)
    return images, torch.stack(masks) if same else masks


class SegmentationDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Image/mask pairs. Every pair is checked when the dataset is built: a missing or unreadable file,
    a mask whose size differs from its image, or a mask value outside the classes is reported with its
    path and the pair is skipped (``strict=True`` raises instead)."""

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path]],
        num_classes: int,
        transform: SegmentationTransform | None = None,
        *,
        ignore_index: int = 255,
        palette: Sequence[tuple[int, int, int]] | None = None,
        strict: bool = False,
        source: str = "dataset",
        threshold: int | None = None,
    ) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.palette = list(palette) if palette else None
        self.threshold = threshold
        self.transform = transform
        self.skipped = DataReport()
        good = []
        for img, mask in pairs:
            reason = self._check(img, mask)
            if reason is None:
                good.append((img, mask))
            elif strict:
                raise DataError(reason)
            else:
                self.skipped.add(mask, reason)
        if self.skipped:
            log.warning(
                "%s: skipped %d image/mask pairs:\n%s", source, len(self.skipped), self.skipped.report()
            )
        if not good:
            raise DataError(f"{source}: no usable image/mask pair ({len(pairs)} found)")
        self.pairs = good

    def _check(self, img: Path, mask: Path) -> str | None:
        try:
            with Image.open(img) as im:
                size = im.size
            m = read_mask(mask, self.palette, self.ignore_index, self.threshold)
        except (OSError, DataError) as exc:
            return str(exc) if isinstance(exc, DataError) else f"{img}: cannot read ({exc})"
        if (m.shape[1], m.shape[0]) != size:
            return (
                f"{mask}: mask is {m.shape[1]}x{m.shape[0]} but its image {img.name} is {size[0]}x{size[1]}"
            )
        values = np.unique(m)
        bad = [int(v) for v in values if v >= self.num_classes and v != self.ignore_index]
        if bad:
            return (
                f"{mask}: values {bad[:8]} are outside the {self.num_classes} classes "
                f"(and not the ignore value {self.ignore_index})"
            )
        return None

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, mask = self.pairs[index]
        return read_image(img), torch.from_numpy(
            read_mask(mask, self.palette, self.ignore_index, self.threshold)
        )

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.load(index)
        if self.transform is None:
            return image, mask.long()
        return self.transform(image, mask)


def infer_num_classes(
    pairs: Sequence[tuple[Path, Path]], ignore_index: int, palette: Any = None, threshold: int | None = None
) -> int:
    """``max class value + 1`` over the masks (the ignore value excluded)."""
    top = 0
    for _, mask in pairs:
        values = np.unique(read_mask(mask, palette, ignore_index, threshold))
        values = values[values != ignore_index]
        if values.size:
            top = max(top, int(values.max()))
    return top + 1


# A palette for drawing classes (VOC's bit-interleaved colour map).
def color_map(n: int = 256) -> np.ndarray:
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap
