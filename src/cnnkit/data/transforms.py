"""Training and evaluation transforms (torchvision.transforms.v2) on ``uint8`` image tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation strengths for training; evaluation is always deterministic."""

    scale: tuple[float, float] = (0.35, 1.0)  # RandomResizedCrop area range
    hflip: float = 0.5
    jitter: float = 0.2  # brightness, contrast and saturation jitter; 0 turns it off
    hue: float = 0.02
    crop_fraction: float = 0.875  # eval: resize to imgsz / crop_fraction, centre-crop imgsz


def classify_train_transform(
    imgsz: int,
    aug: AugmentConfig = AugmentConfig(),
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> v2.Compose:
    """Random resized crop, flip and colour jitter on uint8, then float scaling and normalisation."""
    steps: list[torch.nn.Module] = [v2.RandomResizedCrop(imgsz, scale=aug.scale, antialias=True)]
    if aug.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(aug.hflip))
    if aug.jitter > 0:
        steps.append(v2.ColorJitter(aug.jitter, aug.jitter, aug.jitter, aug.hue))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


def classify_eval_transform(
    imgsz: int,
    crop_fraction: float = 0.875,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> v2.Compose:
    """Resize the shorter side to ``imgsz / crop_fraction`` and centre-crop ``imgsz`` (deterministic)."""
    return v2.Compose(
        [
            v2.Resize(round(imgsz / crop_fraction), antialias=True),
            v2.CenterCrop(imgsz),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )
