"""Built-in segmentation scenes: large textured objects on varied backgrounds, non-square images, and a
void outline around every object (as Pascal VOC marks its borders), for the demo and the segmentation
benchmark. Classes: background, disc, box, triangle; each object gets a random colour near its class's
hue and a random texture (stripes, checks or noise), so both shape and colour carry the class, as in
street scenes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from cnnkit.data.builtin import background, write_mask_splits

SCENE_CLASSES = ("background", "disc", "box", "triangle")
_HUES = {1: (0.95, 0.12), 2: (0.55, 0.7), 3: (0.25, 0.4)}  # hue range per class (HSV, wrapping)


def _colour(rng: np.random.Generator, cls: int) -> np.ndarray:
    lo, hi = _HUES[cls]
    hue = (rng.uniform(lo, hi + (1 if hi < lo else 0))) % 1.0
    sat, val = rng.uniform(0.45, 0.9), rng.uniform(0.55, 1.0)
    i, f = int(hue * 6) % 6, hue * 6 - int(hue * 6)
    p, q, t = val * (1 - sat), val * (1 - f * sat), val * (1 - (1 - f) * sat)
    rgb = [(val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val), (val, p, q)][i]
    return np.array(rgb) * 255


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A ``[h, w]`` pattern in [0.6, 1]: stripes at a random angle, checks, or blotchy noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    kind = rng.integers(3)
    if kind == 0:
        angle, period = rng.uniform(0, np.pi), rng.uniform(4, 10)
        pattern = 0.5 + 0.5 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    elif kind == 1:
        cell = int(rng.integers(3, 8))
        pattern = ((yy // cell + xx // cell) % 2).astype(np.float32)
    else:
        coarse = rng.random((h // 6 + 2, w // 6 + 2)).astype(np.float32)
        pattern = (
            np.asarray(
                Image.fromarray((coarse * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR)
            )
            / 255
        )
    return 0.6 + 0.4 * pattern


def _shape(cls: int, h: int, w: int, cy: float, cx: float, r: float, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if cls == 1:
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    if cls == 2:
        ry = r * rng.uniform(0.6, 1.0)
        return (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= r * rng.uniform(0.6, 1.0))
    angle = rng.uniform(0, 2 * np.pi)
    corners = [
        (cy + r * np.sin(angle + k * 2 * np.pi / 3), cx + r * np.cos(angle + k * 2 * np.pi / 3))
        for k in range(3)
    ]
    sides = [
        (x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0)
        for (y0, x0), (y1, x1) in zip(corners, corners[1:] + corners[:1])
    ]
    return np.all([c >= 0 for c in sides], 0) | np.all([c <= 0 for c in sides], 0)


def render_scene(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: ``(image [h, w, 3] uint8, mask [h, w] uint8)``; 255 marks the void outlines."""
    image = background(rng, h, w).astype(np.float32)
    mask = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(2, 5))):
        cls = int(rng.integers(1, 4))
        r = rng.uniform(0.14, 0.3) * min(h, w)
        region = _shape(cls, h, w, rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w, r, rng)
        fill = _colour(rng, cls)[None, None] * _texture(rng, h, w)[..., None]
        image[region] = fill[region]
        mask[region] = cls
    pad = np.pad(mask, 1, mode="edge")
    views = [pad[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    mask[np.max(views, 0) != np.min(views, 0)] = 255  # a void outline between different labels
    image += rng.normal(0, 6, image.shape)
    return image.clip(0, 255).astype(np.uint8), mask


def write_scenes(
    out: str | os.PathLike[str],
    *,
    n_train: int = 240,
    n_val: int = 60,
    size: tuple[int, int] = (96, 128),
    seed: int = 0,
) -> Path:
    """Write ``images/{train,val}/*.jpg``, ``masks/{train,val}/*.png`` (index PNGs, 255 = void) and a
    ``data.yaml`` with the class names and ``ignore_index: 255``."""
    rng = np.random.default_rng(seed)
    root = Path(out)
    write_mask_splits(root, {"train": n_train, "val": n_val}, lambda: render_scene(rng, *size), ext=".jpg")
    (root / "data.yaml").write_text(
        "# built-in segmentation scenes (cnnkit data builtin scenes --task segment)\n"
        f"names: {list(SCENE_CLASSES)}\nignore_index: 255\n"
    )
    return root
