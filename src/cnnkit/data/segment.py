"""Semantic segmentation data: an image folder and a mask folder matched by file stem.

Layouts found under a dataset root (the ones people publish):

- ``images/{train,val}/`` + ``masks/{train,val}/`` (also ``labels``, ``annotations``, ``SegmentationClass``)
- ``{train,val}/images/`` + ``{train,val}/masks/``
- ``images/`` + ``masks/`` without splits (split by a seeded fraction)
- Pascal VOC: ``JPEGImages/`` + ``SegmentationClass/`` + ``ImageSets/Segmentation/{train,val}.txt``

Masks are index PNGs (a pixel's value is its class), palette PNGs (the palette index is the class, as
in VOC) or colour-coded RGB images with a colour-to-class table. The ``ignore_index`` value (255 by
default, VOC's "void" border) is excluded from losses and metrics. An optional ``data.yaml`` beside the
folders gives ``names``, ``ignore_index`` and ``palette`` (one ``[r, g, b]`` per class).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from cnnkit.data.classify import split_dataset
from cnnkit.data.images import is_image, read_image
from cnnkit.data.report import DataReport
from cnnkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from cnnkit.errors import DataError
from cnnkit.io import load_yaml

log = logging.getLogger(__name__)

MASK_DIRS = ("masks", "labels", "annotations", "SegmentationClass", "gt", "mask")
IMAGE_DIRS = ("images", "imgs", "JPEGImages", "image")
VAL_NAMES = ("val", "valid", "validation", "test")


@dataclass
class SegmentationSpec:
    """What a segmentation dataset is: its samples per split and how to read its masks."""

    train: list[tuple[Path, Path]]
    val: list[tuple[Path, Path]]
    names: list[str] | None = None
    ignore_index: int = 255
    palette: list[tuple[int, int, int]] | None = None  # colour of each class, for RGB masks
    report: DataReport = field(default_factory=DataReport)  # images without masks, unlisted ids


def _find(root: Path, names: Sequence[str]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def _pairs(image_dir: Path, mask_dir: Path, report: DataReport) -> list[tuple[Path, Path]]:
    masks = {p.stem: p for p in mask_dir.iterdir() if is_image(p)}
    pairs = []
    for img in sorted(p for p in image_dir.iterdir() if is_image(p)):
        if img.stem in masks:
            pairs.append((img, masks[img.stem]))
        else:
            report.add(img, f"no mask named {img.stem}.* in {mask_dir}")
    return pairs


def resolve_segmentation_data(
    root: str | os.PathLike[str], val_fraction: float = 0.2, seed: int = 0
) -> SegmentationSpec:
    """Find images, masks and splits under ``root`` (see the module docstring for the layouts)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    config: dict[str, Any] = {}
    for name in ("data.yaml", "dataset.yaml"):
        if (root / name).is_file():
            config = load_yaml(root / name)
    report = DataReport()
    splits: dict[str, list[tuple[Path, Path]]] = {}
    image_dir, mask_dir = _find(root, IMAGE_DIRS), _find(root, MASK_DIRS)
    voc_sets = root / "ImageSets" / "Segmentation"
    if image_dir is not None and mask_dir is not None and voc_sets.is_dir():
        every = {img.stem: (img, m) for img, m in _pairs(image_dir, mask_dir, DataReport())}
        for split, fname in (("train", "train.txt"), ("val", "val.txt")):
            if (voc_sets / fname).is_file():
                ids = [
                    line.split()[0] for line in (voc_sets / fname).read_text().splitlines() if line.strip()
                ]
                splits[split] = [every[i] for i in ids if i in every]
                for i in ids:
                    if i not in every:
                        report.add(i, "listed in ImageSets but has no image/mask")
    elif image_dir is not None and mask_dir is not None:
        if (image_dir / "train").is_dir():
            splits["train"] = _pairs(image_dir / "train", mask_dir / "train", report)
            val = _find(image_dir, VAL_NAMES)
            if val is not None:
                splits["val"] = _pairs(val, mask_dir / val.name, report)
        else:
            splits["all"] = _pairs(image_dir, mask_dir, report)
    elif (root / "train").is_dir():
        for split in ("train", *VAL_NAMES):
            sdir = root / split
            if sdir.is_dir() and "val" not in splits:
                imgs, msks = _find(sdir, IMAGE_DIRS), _find(sdir, MASK_DIRS)
                if imgs is None or msks is None:
                    raise DataError(f"{sdir}: expected images/ and masks/ folders inside")
                splits["train" if split == "train" else "val"] = _pairs(imgs, msks, report)
    else:
        raise DataError(
            f"{root}: no segmentation layout found; expected images/ + masks/ (optionally with train/ and "
            "val/ inside), train/{images,masks}, or Pascal VOC's JPEGImages/ + SegmentationClass/"
        )
    if "all" in splits or "val" not in splits:
        pool = splits.pop("all", None) or splits.pop("train")
        train_idx, val_idx = split_dataset(len(pool), val_fraction, seed)
        splits = {"train": [pool[i] for i in train_idx], "val": [pool[i] for i in val_idx]}
    names = config.get("names")
    if isinstance(names, dict):
        names = [str(names[k]) for k in sorted(names)]
    palette = config.get("palette")
    return SegmentationSpec(
        splits["train"],
        splits["val"],
        list(names) if names else None,
        int(config.get("ignore_index", 255)),
        [tuple(c) for c in palette] if palette else None,
        report,
    )


def read_mask(
    path: str | os.PathLike[str],
    palette: Sequence[tuple[int, int, int]] | None = None,
    ignore_index: int = 255,
) -> np.ndarray:
    """A mask file as class indices ``[H, W] uint8``; RGB masks are mapped through ``palette``."""
    try:
        with Image.open(path) as im:
            if im.mode in ("P", "L", "I;16", "I"):
                return np.asarray(im, dtype=np.int64).astype(np.uint8)
            rgb = np.asarray(im.convert("RGB"), dtype=np.int64)
    except OSError as exc:
        raise DataError(f"{path}: cannot read mask ({exc})") from None
    if palette is None:
        raise DataError(f"{path}: an RGB mask needs a colour-to-class table (palette: in data.yaml)")
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    table = {(r << 16) | (g << 8) | b: i for i, (r, g, b) in enumerate(palette)}
    uniq, inverse = np.unique(codes, return_inverse=True)
    unknown = [u for u in uniq.tolist() if u not in table]
    if unknown:
        shown = [f"#{u:06x}" for u in unknown[:5]]
        raise DataError(f"{path}: colours {shown} are not in the palette of {len(palette)} classes")
    lut = np.array([table[u] for u in uniq.tolist()], dtype=np.uint8)
    return lut[inverse].reshape(codes.shape)


class SegmentationTransform:
    """Image and mask transformed together (``tv_tensors.Mask`` gets nearest-neighbour resampling).

    Training: random resized crop (``scale``), horizontal flip, colour jitter on the image only.
    Evaluation: a plain resize to ``imgsz x imgsz``.
    """

    def __init__(self, imgsz: int, train: bool, scale: tuple[float, float] = (0.5, 1.0), hflip: float = 0.5,
                 jitter: float = 0.2) -> None:  # fmt: skip
        steps: list[torch.nn.Module]
        if train:
            steps = [v2.RandomResizedCrop(imgsz, scale=scale, antialias=True), v2.RandomHorizontalFlip(hflip)]
            if jitter > 0:
                steps.append(v2.ColorJitter(jitter, jitter, jitter))
        else:
            steps = [v2.Resize((imgsz, imgsz), antialias=True)]
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        self.transform = v2.Compose(steps)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        img, msk = self.transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return img.as_subclass(torch.Tensor), msk.as_subclass(torch.Tensor).long()


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
    ) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.palette = list(palette) if palette else None
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
            m = read_mask(mask, self.palette, self.ignore_index)
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
        return read_image(img), torch.from_numpy(read_mask(mask, self.palette, self.ignore_index))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.load(index)
        if self.transform is None:
            return image, mask.long()
        return self.transform(image, mask)


def infer_num_classes(pairs: Sequence[tuple[Path, Path]], ignore_index: int, palette: Any = None) -> int:
    """``max class value + 1`` over the masks (the ignore value excluded)."""
    top = 0
    for _, mask in pairs:
        values = np.unique(read_mask(mask, palette, ignore_index))
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
