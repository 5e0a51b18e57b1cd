"""Built-in datasets written to disk in standard formats, from scikit-learn's bundled handwritten digits.

Each 8x8 digit (1,797 of them, 16 grey levels) is upsampled, coloured and placed on a varied
background: gradients, noise and colours differ per image, and image sizes vary, as in real sets.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class Glyph:
    """A digit rendered as an RGB patch with its mask (glyph pixels) and class."""

    rgb: np.ndarray  # [h, w, 3] uint8
    mask: np.ndarray  # [h, w] bool
    label: int


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images ``[N, 8, 8]`` in [0, 1] and labels ``[N]``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)


def background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random dark background: a two-colour gradient in a random direction plus noise, ``[h, w, 3]``."""
    c0, c1 = rng.uniform(0, 110, 3), rng.uniform(0, 110, 3)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (np.cos(angle) * xx / max(w - 1, 1) + np.sin(angle) * yy / max(h - 1, 1) + 1) / 2
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    return img + rng.normal(0, rng.uniform(2, 12), (h, w, 1))


def render_glyph(digit: np.ndarray, label: int, size: int, rng: np.random.Generator, bg: np.ndarray) -> Glyph:
    """Upsample an 8x8 digit to ``size`` px (bilinear) and colour it against the local background."""
    img = Image.fromarray((digit * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR)
    alpha = np.asarray(img, dtype=np.float32) / 255.0
    # A light glyph of random hue on the (darker) background, so it always stands out.
    colour = rng.uniform(150, 255, 3)
    rgb = bg * (1 - alpha[..., None]) + colour * alpha[..., None]
    return Glyph(np.clip(rgb, 0, 255).astype(np.uint8), alpha > 0.5, label)


def split_indices(n: int, val_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(n)
    n_val = round(n * val_fraction)
    return order[n_val:], order[:n_val]


def write_classification(
    out: str | os.PathLike[str],
    *,
    classes: Sequence[int] = tuple(range(10)),
    size_range: tuple[int, int] = (28, 48),
    val_fraction: float = 0.2,
    seed: int = 0,
    limit: int | None = None,
    copies: int = 2,
    ext: str = "png",
) -> Path:
    """Write an ImageFolder classification set: ``out/{train,val}/<digit name>/<n>_<copy>.png``.

    Each digit is rendered ``copies`` times (another size, position, colour and background each time);
    all renderings of one digit land in the same split. Image sizes vary in ``size_range`` (odd sizes
    included); the digit fills 60-95% of the shorter side at a random offset. ``ext`` picks the file
    format (png, jpg, bmp, webp). Returns ``out``.
    """
    rng = np.random.default_rng(seed)
    images, labels = load_digits_arrays()
    keep = np.isin(labels, np.asarray(classes))
    images, labels = images[keep], labels[keep]
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    train_idx, val_idx = split_indices(len(images), val_fraction, rng)
    root = Path(out)
    for split, idx in (("train", train_idx), ("val", val_idx)):
        for c in classes:
            (root / split / DIGIT_NAMES[c]).mkdir(parents=True, exist_ok=True)
        for i, copy in ((i, c) for i in idx for c in range(copies)):
            h, w = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, 2))
            bg = background(rng, h, w)
            size = int(min(h, w) * rng.uniform(0.6, 0.95))
            y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
            glyph = render_glyph(images[i], int(labels[i]), size, rng, bg[y : y + size, x : x + size])
            canvas = np.clip(bg, 0, 255).astype(np.uint8)
            canvas[y : y + size, x : x + size] = glyph.rgb
            Image.fromarray(canvas).save(root / split / DIGIT_NAMES[int(labels[i])] / f"{i:04d}_{copy}.{ext}")
    return root


def place_digits(
    images: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    size: tuple[int, int],
    count: tuple[int, int] = (1, 3),
    glyph_range: tuple[int, int] = (18, 36),
    max_overlap: float = 0.1,
) -> tuple[np.ndarray, list[tuple[Glyph, int, int]]]:
    """A scene of ``size`` (h, w) with a random number of digits at random positions and scales.

    Returns the RGB canvas and the placed glyphs with their top-left corners; glyphs overlap by at most
    ``max_overlap`` of the smaller box (tries a few positions, then skips the digit).
    """
    h, w = size
    bg = background(rng, h, w)
    canvas = bg.copy()
    placed: list[tuple[Glyph, int, int]] = []
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(int(rng.integers(count[0], count[1] + 1))):
        i = int(rng.integers(0, len(images)))
        gsize = int(rng.integers(glyph_range[0], min(glyph_range[1], h, w) + 1))
        for _attempt in range(10):
            y, x = int(rng.integers(0, h - gsize + 1)), int(rng.integers(0, w - gsize + 1))
            box = (x, y, x + gsize, y + gsize)
            if all(_overlap(box, b) <= max_overlap for b in boxes):
                break
        else:
            continue
        glyph = render_glyph(images[i], int(labels[i]), gsize, rng, canvas[y : y + gsize, x : x + gsize])
        canvas[y : y + gsize, x : x + gsize] = glyph.rgb  # blended over what is already there
        placed.append((glyph, y, x))
        boxes.append(box)
    return np.clip(canvas, 0, 255).astype(np.uint8), placed


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller


def write_segmentation(
    out: str | os.PathLike[str],
    *,
    n_train: int = 600,
    n_val: int = 150,
    size_range: tuple[int, int] = (48, 72),
    glyph_range: tuple[int, int] = (22, 40),
    seed: int = 0,
) -> Path:
    """Write a segmentation set: ``images/{train,val}/*.png``, ``masks/{train,val}/*.png`` and
    ``data.yaml``. Each glyph's pixels are labelled with its digit's class (1-10), background 0; masks
    are palette PNGs (the pixel value is the class, the palette only helps viewing)."""
    rng = np.random.default_rng(seed)
    images, labels = load_digits_arrays()
    root = Path(out)

    def scene() -> tuple[np.ndarray, np.ndarray]:
        h, w = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, 2))
        canvas, placed = place_digits(images, labels, rng, (h, w), glyph_range=glyph_range)
        mask = np.zeros((h, w), dtype=np.uint8)
        for glyph, y, x in placed:
            gh, gw = glyph.mask.shape
            region = mask[y : y + gh, x : x + gw]
            region[glyph.mask] = glyph.label + 1
        return canvas, mask

    write_mask_splits(root, {"train": n_train, "val": n_val}, scene)
    names = ["background", *DIGIT_NAMES]
    (root / "data.yaml").write_text(
        "# built-in digits segmentation (cnnkit data builtin digits --task segment)\n"
        f"names: {names}\nignore_index: 255\n"
    )
    return root


def write_mask_splits(
    root: Path, counts: dict[str, int], render: Callable[[], tuple[np.ndarray, np.ndarray]], ext: str = ".png"
) -> None:
    """``images/<split>/<n><ext>`` and ``masks/<split>/<n>.png`` (palette PNGs: the pixel value is the
    class, the palette only helps viewing) for ``counts[split]`` scenes of ``render()`` each."""
    from cnnkit.data.segment import color_map

    palette = color_map(256).flatten().tolist()
    for split, n in counts.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "masks" / split).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            image, mask = render()
            Image.fromarray(image).save(root / "images" / split / f"{k:05d}{ext}", quality=90)
            m = Image.fromarray(mask, mode="P")
            m.putpalette(palette)
            m.save(root / "masks" / split / f"{k:05d}.png")


def write_localization(
    out: str | os.PathLike[str],
    *,
    n_train: int = 800,
    n_val: int = 200,
    size_range: tuple[int, int] = (48, 72),
    empty_fraction: float = 0.15,
    seed: int = 0,
) -> Path:
    """Write a localization set: ``images/{train,val}/*.png`` and ``train.csv``/``val.csv`` with the header
    ``image,class,x1,y1,x2,y2`` (pixels, paths relative to the CSV). One digit per image at a random
    position and scale; ``empty_fraction`` of the images have none (empty class and box)."""
    rng = np.random.default_rng(seed)
    images, labels = load_digits_arrays()
    root = Path(out)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        rows = ["image,class,x1,y1,x2,y2"]
        for k in range(n):
            h, w = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, 2))
            name = f"images/{split}/{k:05d}.png"
            placed: list[tuple[Glyph, int, int]]
            if rng.random() < empty_fraction:
                canvas, placed = np.clip(background(rng, h, w), 0, 255).astype(np.uint8), []
            else:
                canvas, placed = place_digits(images, labels, rng, (h, w), count=(1, 1), glyph_range=(20, 40))
            Image.fromarray(canvas).save(root / name)
            if placed:
                glyph, y, x = placed[0]
                ys, xs = np.nonzero(glyph.mask)  # the tight box of the glyph's pixels
                rows.append(
                    f"{name},{DIGIT_NAMES[glyph.label]},{x + xs.min()},{y + ys.min()},"
                    f"{x + xs.max() + 1},{y + ys.max() + 1}"
                )
            else:
                rows.append(f"{name},,,,,")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def write_landmarks(
    out: str | os.PathLike[str],
    *,
    n_train: int = 800,
    n_val: int = 200,
    size: int = 64,
    seed: int = 0,
) -> Path:
    """Write a landmark set of kites: four vertices (top, right, bottom, left), the points to find.

    ``images/{train,val}/*.png``, ``train.csv``/``val.csv`` (``image,x0,y0,...,x3,y3`` with a header) and
    ``data.yaml`` with ``flip_pairs: [[1, 3]]`` (a horizontal flip swaps the right and left vertices).
    """
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    root = Path(out)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        rows = ["image," + ",".join(f"x{i},y{i}" for i in range(4))]
        for k in range(n):
            img = Image.fromarray(np.clip(background(rng, size, size), 0, 255).astype(np.uint8))
            cx, cy = rng.uniform(0.35, 0.65, 2) * size
            pts = []
            for base in (-90.0, 0.0, 90.0, 180.0):  # top, right, bottom, left
                angle = np.deg2rad(base + rng.uniform(-20, 20))
                radius = rng.uniform(0.15, 0.32) * size
                pts.append((float(cx + radius * np.cos(angle)), float(cy + radius * np.sin(angle))))
            ImageDraw.Draw(img).polygon(pts, fill=tuple(int(v) for v in rng.uniform(150, 255, 3)))
            name = f"images/{split}/{k:05d}.png"
            img.save(root / name)
            rows.append(name + "," + ",".join(f"{x:.2f},{y:.2f}" for x, y in pts))
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    (root / "data.yaml").write_text("# kites: vertices top, right, bottom, left\nflip_pairs: [[1, 3]]\n")
    return root


def write_detection(
    out: str | os.PathLike[str],
    *,
    n_train: int = 600,
    n_val: int = 150,
    size_range: tuple[int, int] = (64, 96),
    seed: int = 0,
) -> Path:
    """Write a detection set of digit scenes (1-3 digits at random positions and scales) in two formats:
    ultralytics YOLO (``images/{split}``, ``labels/{split}`` with ``class cx cy w h``, ``data.yaml``) and
    COCO (``annotations/instances_{split}.json`` over the same images). Boxes are the glyphs' tight boxes."""
    rng = np.random.default_rng(seed)
    images, labels = load_digits_arrays()
    root = Path(out)
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(DIGIT_NAMES)]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        coco: dict[str, Any] = {"images": [], "annotations": [], "categories": categories}
        for k in range(n):
            h, w = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, 2))
            canvas, placed = place_digits(images, labels, rng, (h, w), count=(1, 3), glyph_range=(18, 40))
            name = f"{k:05d}.png"
            Image.fromarray(canvas).save(root / "images" / split / name)
            coco["images"].append(
                {"id": k + 1, "file_name": f"images/{split}/{name}", "height": h, "width": w}
            )
            lines = []
            for glyph, y, x in placed:
                ys, xs = np.nonzero(glyph.mask)
                x1, y1, x2, y2 = x + xs.min(), y + ys.min(), x + xs.max() + 1, y + ys.max() + 1
                lines.append(
                    f"{glyph.label} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} "
                    f"{(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}"
                )
                coco["annotations"].append(
                    {
                        "id": len(coco["annotations"]) + 1,
                        "image_id": k + 1,
                        "category_id": glyph.label + 1,
                        "bbox": [int(x1), int(y1), int(x2 - x1), int(y2 - y1)],
                        "area": int((x2 - x1) * (y2 - y1)),
                        "iscrowd": 0,
                    }
                )
            (root / "labels" / split / f"{k:05d}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    (root / "data.yaml").write_text(
        "# built-in digit detection (cnnkit data builtin digits --task detect)\n"
        f"path: .\ntrain: images/train\nval: images/val\nnames: {list(DIGIT_NAMES)}\n"
    )
    return root
