"""Detection samples as network inputs: letterbox, box-moving augmentations, mosaic, and batching.

Boxes travel with the image through torchvision.transforms.v2 as ``tv_tensors.BoundingBoxes``, so
every geometric step (affine scale/translate, flip) moves them too; boxes cut below 2 pixels are
dropped. An item is ``(image [3, S, S] float normalised, target [n, 5] (class, x1, y1, x2, y2) in input
pixels, info [5] (original height, width, letterbox scale, pad x, pad y))``; :func:`collate` adds the
image index to each target row.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from cnnkit.data.detect import DetSample
from cnnkit.data.images import first_readable, read_image
from cnnkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from cnnkit.errors import DataError

log = logging.getLogger(__name__)
PAD_VALUE = 114  # the grey YOLO letterboxes with


@dataclass(frozen=True)
class DetAugment:
    """Training augmentations; all of them move the boxes with the pixels."""

    scale: tuple[float, float] = (0.6, 1.4)  # random zoom of the letterboxed image
    translate: float = 0.1  # random shift, fraction of the input size
    hflip: float = 0.5
    jitter: float = 0.3  # brightness, contrast and saturation
    hue: float = 0.015
    mosaic: float = 0.0  # probability of a 4-image mosaic instead of one image
    min_visible: float = 0.3  # mosaic: drop boxes with less than this fraction left inside the crop


def letterbox_geometry(height: int, width: int, imgsz: int) -> tuple[float, int, int, int, int]:
    """``(scale, new_h, new_w, pad_x, pad_y)``: fit the image in ``imgsz x imgsz`` keeping its aspect
    ratio, centred, the rest padded."""
    scale = min(imgsz / height, imgsz / width)
    nh, nw = max(1, round(height * scale)), max(1, round(width * scale))
    return scale, nh, nw, (imgsz - nw) // 2, (imgsz - nh) // 2


def letterbox(
    image: torch.Tensor, boxes: torch.Tensor, imgsz: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``image [3, H, W] uint8, boxes [n, 4] xyxy -> (image [3, imgsz, imgsz], boxes, info [5])``."""
    h, w = image.shape[-2:]
    scale, nh, nw, px, py = letterbox_geometry(h, w, imgsz)
    resized = v2.functional.resize(image, [nh, nw], antialias=True)
    out = F.pad(resized, (px, imgsz - nw - px, py, imgsz - nh - py), value=PAD_VALUE)
    sx, sy = nw / w, nh / h  # exact per-axis factors of the rounded size
    moved = boxes * boxes.new_tensor([sx, sy, sx, sy]) + boxes.new_tensor([px, py, px, py])
    return out, moved, torch.tensor([h, w, scale, px, py], dtype=torch.float32)


class DetectionDataset(Dataset[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """:class:`DetSample` s as letterboxed, normalised inputs (augmented when ``train``).

    An image that fails to decode is logged and replaced by the next one, so an epoch never stops on a
    bad file.
    """

    def __init__(
        self,
        samples: Sequence[DetSample],
        imgsz: int,
        train: bool,
        augment: DetAugment | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if not samples:
            raise DataError("no detection samples to train or evaluate on")
        self.samples = list(samples)
        self.imgsz = imgsz
        self.train = train
        self.aug = augment or DetAugment()
        steps: list[torch.nn.Module] = []
        if train:
            a = self.aug
            if a.scale != (1.0, 1.0) or a.translate > 0:
                steps.append(
                    v2.RandomAffine(
                        degrees=0, translate=(a.translate, a.translate), scale=a.scale, fill=PAD_VALUE
                    )
                )
            if a.hflip > 0:
                steps.append(v2.RandomHorizontalFlip(a.hflip))
            if a.jitter > 0:
                steps.append(v2.ColorJitter(a.jitter, a.jitter, a.jitter, a.hue))
            steps += [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=2)]
        self.augment = v2.Compose(steps) if steps else None
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """``(image uint8, boxes [n, 4], labels [n], index used)`` of the first decodable image from
        ``index`` on."""

        def read(i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
            s = self.samples[i]
            image = read_image(s.path)
            boxes = s.boxes
            h, w = image.shape[-2:]
            if (h, w) != s.size:  # e.g. EXIF-rotated after the annotation's size was read
                boxes = boxes * boxes.new_tensor([w / s.size[1], h / s.size[0]] * 2)
            return image, boxes.float(), s.labels, i

        return first_readable(index, len(self.samples), read)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.train and self.aug.mosaic > 0 and float(torch.rand(())) < self.aug.mosaic:
            image, boxes, labels = self._mosaic(index)
            info = torch.tensor([self.imgsz, self.imgsz, 1.0, 0.0, 0.0])
        else:
            image, boxes, labels, _ = self.load(index)
            image, boxes, info = letterbox(image, boxes, self.imgsz)
        if self.augment is not None:
            out = self.augment(
                {
                    "image": tv_tensors.Image(image),
                    "boxes": tv_tensors.BoundingBoxes(
                        boxes, format="XYXY", canvas_size=(self.imgsz, self.imgsz)
                    ),
                    "labels": labels,
                }
            )
            image, boxes, labels = out["image"].as_subclass(torch.Tensor), out["boxes"], out["labels"]
            boxes = boxes.as_subclass(torch.Tensor)
        x = (image.float() / 255 - self.mean) / self.std
        target = torch.cat([labels.float().view(-1, 1), boxes.float().view(-1, 4)], 1)
        return x, target, info

    def _mosaic(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Four images (this one and three random) around a random centre of a ``2S x 2S`` canvas, each
        resized so its long side is ``S``; the ``S x S`` window around the centre is kept."""
        s = self.imgsz
        xc, yc = (int(v) for v in torch.randint(s // 2, s + s // 2 + 1, (2,)))
        canvas = torch.full((3, 2 * s, 2 * s), PAD_VALUE, dtype=torch.uint8)
        all_boxes, all_labels = [], []
        others = torch.randint(len(self.samples), (3,)).tolist()
        for k, i in enumerate([index, *others]):
            image, boxes, labels, _ = self.load(i)
            h0, w0 = image.shape[-2:]
            r = s / max(h0, w0)
            h, w = max(1, round(h0 * r)), max(1, round(w0 * r))
            image = v2.functional.resize(image, [h, w], antialias=True)
            x1 = xc - w if k in (0, 2) else xc
            y1 = yc - h if k in (0, 1) else yc
            cx1, cy1 = max(x1, 0), max(y1, 0)
            cx2, cy2 = min(x1 + w, 2 * s), min(y1 + h, 2 * s)
            canvas[:, cy1:cy2, cx1:cx2] = image[:, cy1 - y1 : cy2 - y1, cx1 - x1 : cx2 - x1]
            moved = boxes * boxes.new_tensor([w / w0, h / h0] * 2) + boxes.new_tensor([x1, y1, x1, y1])
            all_boxes.append(moved)
            all_labels.append(labels)
        ox, oy = xc - s // 2, yc - s // 2
        image = canvas[:, oy : oy + s, ox : ox + s].clone()
        boxes = torch.cat(all_boxes) - torch.tensor([ox, oy, ox, oy], dtype=torch.float32)
        labels = torch.cat(all_labels)
        area = (boxes[:, 2:] - boxes[:, :2]).prod(1)
        clipped = boxes.clamp(0, s)
        visible = (clipped[:, 2:] - clipped[:, :2]).clamp(min=0).prod(1)
        keep = (visible >= self.aug.min_visible * area) & (visible > 0)
        return image, clipped[keep], labels[keep]


def collate(
    items: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack images and infos; targets become ``[M, 6]`` rows ``(image index, class, x1, y1, x2, y2)``."""
    images = torch.stack([it[0] for it in items])
    targets = torch.cat(
        [torch.cat([torch.full((len(it[1]), 1), float(i)), it[1]], 1) for i, it in enumerate(items)]
    )
    return images, targets.view(-1, 6), torch.stack([it[2] for it in items])


def check_imgsz(imgsz: int, stride: int) -> int:
    """``imgsz`` if the model's largest stride divides it, else a clear error naming the nearest sizes."""
    if imgsz % stride:
        lo, hi = (imgsz // stride) * stride, math.ceil(imgsz / stride) * stride
        raise DataError(
            f"--imgsz {imgsz} is not a multiple of the model's stride {stride}; use {lo or hi} or {hi}"
        )
    return imgsz
