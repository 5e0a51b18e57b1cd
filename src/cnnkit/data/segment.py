"""Semantic segmentation datasets: image/mask pairs (found by :mod:`cnnkit.data.formats.masks`, which
knows the published layouts and mask encodings), the paired transforms, and a class colour map."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from cnnkit.data.formats.masks import (  # re-exported: the names of the first release
    SegmentationSpec as SegmentationSpec,
)
from cnnkit.data.formats.masks import read_mask
from cnnkit.data.formats.masks import resolve_segmentation_data as resolve_segmentation_data
from cnnkit.data.images import first_readable, open_image, read_image, verify_image
from cnnkit.data.report import DataReport
from cnnkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from cnnkit.errors import DataError
from cnnkit.viz import color_map as color_map  # re-exported: where the first release had it

log = logging.getLogger(__name__)


def fit_within(h: int, w: int, size: Sequence[float]) -> tuple[int, int]:
    """``(h', w')`` of an ``h x w`` image resized to fit inside ``size = (H, W)``, aspect ratio kept."""
    scale = min(size[0] / h, size[1] / w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def frame_of(imgsz: int | Sequence[int], rect: bool = False) -> tuple[tuple[int, int], bool]:
    """The input frame ``(H, W)`` of an ``imgsz`` (``S``, or ``(H, W)`` as given or recorded) and whether
    images keep their aspect ratio inside it: ``rect``, and always with two sizes."""
    if isinstance(imgsz, int):
        return (imgsz, imgsz), rect
    return (int(imgsz[0]), int(imgsz[1])), True


def fit_long_side(h: int, w: int, size: int) -> tuple[int, int]:
    """``(h', w')`` of an ``h x w`` image resized so its long side is ``size``, aspect ratio kept."""
    return fit_within(h, w, (size, size))


class SegmentationTransform:
    """Image and mask transformed together (``tv_tensors.Mask`` gets nearest-neighbour resampling).

    ``imgsz``: ``S`` or ``(H, W)``. Square (an ``S`` without ``rect``): training takes a random resized
    crop (``scale``) to ``S x S``, evaluation resizes the image to ``S x S``. ``rect`` (always with
    ``(H, W)``): the aspect ratio is kept: training resizes the image to fit ``H x W`` times a random
    factor (``sqrt`` of the ``scale`` range around 1) and takes a random ``H x W`` crop (padded where the
    image is smaller; padded mask pixels are ignored), evaluation resizes it to fit ``H x W`` and pads the
    bottom/right. Both flip and jitter colours when training. Evaluation keeps the mask at its own
    resolution (``full_res``), so metrics are computed at the original size.
    """

    def __init__(
        self,
        imgsz: int | tuple[int, int],
        train: bool,
        scale: tuple[float, float] = (0.5, 1.0),
        hflip: float = 0.5,
        jitter: float = 0.2,
        full_res: bool = True,
        rect: bool = False,
        ignore_index: int = 255,
    ) -> None:
        self.size, self.rect = frame_of(imgsz, rect)
        self.train, self.ignore_index = train, ignore_index
        self.image_only = not train and full_res
        self.zoom = (scale[0] ** 0.5, max(scale[1], 1 / scale[0]) ** 0.5)
        steps: list[torch.nn.Module] = []
        if train and not self.rect:
            steps = [v2.RandomResizedCrop(self.size, scale=scale, antialias=True)]
        elif train:
            fill = {tv_tensors.Image: 0, tv_tensors.Mask: ignore_index}
            steps = [v2.RandomCrop(self.size, pad_if_needed=True, fill=fill)]  # type: ignore[arg-type]
        elif not self.rect:
            steps = [v2.Resize(self.size, antialias=True)]
        if train:
            steps.append(v2.RandomHorizontalFlip(hflip))
            if jitter > 0:
                steps.append(v2.ColorJitter(jitter, jitter, jitter))
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        self.transform = v2.Compose(steps)

    def _resize(self, image: tv_tensors.Image, mask: tv_tensors.Mask) -> tuple[Any, Any]:
        """``rect``: to fit ``H x W`` (training: times a random zoom)."""
        h, w = image.shape[-2:]
        zoom = float(torch.empty(1).uniform_(*self.zoom)) if self.train else 1.0
        nh, nw = fit_within(h, w, (self.size[0] * zoom, self.size[1] * zoom))
        image = v2.functional.resize(image, [nh, nw], antialias=True)
        if not self.image_only:
            mask = v2.functional.resize(mask, [nh, nw], interpolation=v2.InterpolationMode.NEAREST)
        return image, mask

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        img, msk = tv_tensors.Image(image), tv_tensors.Mask(mask)
        if self.rect:
            img, msk = self._resize(img, msk)
        if self.image_only:
            out = self.transform(img).as_subclass(torch.Tensor)
            return (self._pad(out) if self.rect else out), mask.long()
        img, msk = self.transform(img, msk)
        img, msk = img.as_subclass(torch.Tensor), msk.as_subclass(torch.Tensor).long()
        if self.rect and not self.train:  # a resized mask is padded like its image, with ignored pixels
            msk = self._pad(msk, self.ignore_index)
            img = self._pad(img)
        return img, msk

    def _pad(self, x: torch.Tensor, value: float = 0.0) -> torch.Tensor:
        """Evaluation in ``rect``: pad the bottom/right to ``H x W`` (images with zeros: the mean colour)."""
        h, w = x.shape[-2:]
        return torch.nn.functional.pad(x, (0, self.size[1] - w, 0, self.size[0] - h), value=value)


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
        reason = verify_image(img)
        if reason is not None:
            return f"{img}: {reason}"
        try:
            with open_image(img) as im:
                size = im.size
            m = read_mask(mask, self.palette, self.ignore_index, self.threshold)
        except DataError as exc:
            return str(exc)
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

    @property
    def samples(self) -> list[tuple[Path, Path]]:
        """The pairs (the name every task's dataset gives its samples)."""
        return self.pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, mask = self.pairs[index]
        return read_image(img), torch.from_numpy(
            read_mask(mask, self.palette, self.ignore_index, self.threshold)
        )

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = first_readable(index, len(self.pairs), self.load)
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
