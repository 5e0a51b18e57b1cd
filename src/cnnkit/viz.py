"""Pictures: a headless pyplot, atomic figure saving, and the one drawer of labelled images (boxes with
names, mask overlays with a legend, points with indices, a class line) that ``data check``, the
training pictures (``train_batch*.jpg``, ``val_pred.jpg``) and ``explain`` share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from cnnkit.io import atomic_path

TILE = 192  # pixels of the long side of each image in a grid


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (works without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out, write atomically as PNG, and close ``fig``."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    pyplot().close(fig)
    return path


def color_map(n: int = 256) -> np.ndarray:
    """Pascal VOC's palette: ``[n, 3]`` uint8, class 0 black, 255 (void) light grey."""
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


_BOX_COLOURS = (
    (255, 56, 56),
    (72, 249, 10),
    (0, 194, 255),
    (255, 157, 151),
    (146, 204, 23),
    (255, 178, 29),
    (132, 56, 255),
    (0, 212, 187),
    (255, 55, 199),
    (61, 219, 134),
)


def box_colour(k: int) -> tuple[int, int, int]:
    """The colour of class ``k``'s boxes (bright, distinct for neighbouring classes)."""
    return _BOX_COLOURS[k % len(_BOX_COLOURS)]


def draw_overlay(
    image: torch.Tensor, mask: np.ndarray, cmap: np.ndarray, names: Sequence[str], alpha: float = 0.5
) -> Image.Image:
    """The class colours blended over ``image [3, H, W] uint8`` (background left as it is), with a legend
    below naming the classes present; small images are enlarged first so the legend stays readable."""
    rgb = image.permute(1, 2, 0).numpy().astype(np.float32)
    blend = np.where(mask[..., None] > 0, (1 - alpha) * rgb + alpha * cmap[mask].astype(np.float32), rgb)
    picture = Image.fromarray(blend.clip(0, 255).astype(np.uint8))
    if picture.width < 256:
        scale = 256 / picture.width
        picture = picture.resize((256, max(1, round(picture.height * scale))), Image.Resampling.NEAREST)
    present = [int(c) for c in np.unique(mask)]
    rows = max(1, -(-len(present) // 3))
    canvas = Image.new("RGB", (picture.width, picture.height + 14 * rows + 4), (0, 0, 0))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    col_w = picture.width // 3
    for k, c in enumerate(present):
        x, y = 4 + (k % 3) * col_w, picture.height + 3 + 14 * (k // 3)
        draw.rectangle(
            (x, y + 1, x + 10, y + 11), fill=tuple(int(v) for v in cmap[c]), outline=(255, 255, 255)
        )
        name = names[c] if c < len(names) else str(c)
        draw.text((x + 14, y), name[: max(4, col_w // 7)], fill=(255, 255, 255))
    return canvas


@dataclass
class Shown:
    """One image with what to draw on it, in the image's pixels: the truth of a sample or a model's
    prediction. Tasks turn their batches and outputs into these (``Task.show``)."""

    image: torch.Tensor  # [3, H, W] uint8
    classes: list[int] = field(default_factory=list)  # of each box; classification: [label]
    boxes: torch.Tensor | None = None  # [n, 4] xyxy
    scores: list[float] | None = None  # of each box, or of the class line
    mask: np.ndarray | None = None  # [H, W] class indices
    points: torch.Tensor | None = None  # [K, 2] x, y
    visible: torch.Tensor | None = None  # [K] bool
    caption: str | None = None  # a line under the image (default: the class of a classification)
    ok: bool | None = None  # a prediction judged right (green caption) or wrong (red)


def draw_tile(item: Shown, names: Sequence[str], size: int = TILE, void: int | None = None) -> Image.Image:
    """``item`` drawn with its labels, the long side ``size`` pixels; ``void``: the mask value shown as
    "void" in the legend."""
    names = list(names)
    if item.mask is not None:
        mask_names = [*names, *map(str, range(len(names), 256))]
        if void is not None and void < 256:
            mask_names[void] = "void"
        tile = draw_overlay(item.image, item.mask.astype(np.int64).clip(0, 255), color_map(256), mask_names)
        grown = tile.width / item.image.shape[2]  # the overlay enlarges small images
    else:
        tile = Image.fromarray(item.image.permute(1, 2, 0).numpy())
        grown = 1.0
    scale = size / max(tile.size)
    tile = tile.resize((max(1, round(tile.width * scale)), max(1, round(tile.height * scale))))
    scale *= grown
    draw = ImageDraw.Draw(tile)
    if item.boxes is not None:
        scores: Sequence[float | None] = item.scores or [None] * len(item.classes)
        for (x1, y1, x2, y2), c, s in zip((item.boxes.float() * scale).tolist(), item.classes, scores):
            colour = box_colour(c)
            draw.rectangle((x1, y1, x2, y2), outline=colour, width=2)
            label = _class_name(names, c) + ("" if s is None else f" {s:.2f}")
            top = y1 - 12 if y1 >= 12 else y1  # above the box, or inside it at the image's top
            draw.rectangle((x1, top, x1 + draw.textlength(label) + 4, top + 12), fill=colour)
            draw.text((x1 + 2, top), label, fill=(0, 0, 0) if sum(colour) > 400 else (255, 255, 255))
    if item.points is not None:
        seen = item.visible if item.visible is not None else torch.ones(len(item.points), dtype=torch.bool)
        for i, ((px, py), v) in enumerate(zip((item.points.float() * scale).tolist(), seen.tolist())):
            if v:
                r = 3
                draw.ellipse((px - r, py - r, px + r, py + r), fill=(64, 255, 64))
                draw.text((px + r, py - r), str(i), fill=(255, 255, 255))
    caption = item.caption
    if caption is None and item.boxes is None and item.mask is None and item.classes:
        caption = _class_name(names, item.classes[0])
        if item.scores:
            caption += f" {item.scores[0]:.2f}"
    if caption:
        colour = {None: (255, 255, 0), True: (64, 255, 64), False: (255, 80, 80)}[item.ok]
        top = 0 if item.mask is not None else tile.height - 14  # a mask's legend is at the bottom
        draw.rectangle((0, top, draw.textlength(caption) + 6, top + 14), fill=(0, 0, 0))
        draw.text((3, top + 1), caption, fill=colour)
    return tile


def _class_name(names: Sequence[str], k: int) -> str:
    return names[k] if 0 <= k < len(names) else str(k)


def save_grid(tiles: Sequence[Image.Image], path: Path, cols: int = 4, size: int = TILE) -> Path:
    """Tiles in rows of ``cols``, written atomically as JPEG."""
    cols = min(cols, max(1, len(tiles)))
    rows = -(-len(tiles) // cols)
    grid = Image.new("RGB", (cols * (size + 4), rows * (size + 4)), (32, 32, 32))
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % cols) * (size + 4) + 2, (i // cols) * (size + 4) + 2))
    with atomic_path(path) as tmp:
        grid.save(tmp, format="JPEG", quality=90)
    return path


def plot_confusion(
    confusion: torch.Tensor, path: Path, class_names: Sequence[str] | None = None, note: str = ""
) -> Path:
    """The confusion matrix (rows: truth, columns: prediction) normalised per row: each cell is the share
    of a true class predicted as each class (the diagonal is each class's recall), written in the cell
    with its count below, and a colour bar. ``note``: how the matrix was counted (thresholds)."""
    plt = pyplot()
    cm = confusion.double()
    norm = cm / cm.sum(1, keepdim=True).clamp(min=1)
    n = cm.shape[0]
    names = list(class_names) if class_names else [str(i) for i in range(n)]
    size = min(max(4.5, 0.55 * n + 2.5), 22)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    shown = ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if cm[i, j] > 0:
                    text = f"{norm[i, j]:.2f}" + (f"\n{int(cm[i, j])}" if n <= 15 else "")
                    colour = "white" if norm[i, j] > 0.5 else "black"
                    ax.text(j, i, text, ha="center", va="center", fontsize=7, color=colour)
        ax.set_xticks(range(n), names, rotation=90)
        ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    title = "confusion matrix, normalised per true class (cells: share, count)"
    ax.set_title(title + (f"\n{note}" if note else ""), fontsize=9)
    return save_figure(fig, path)
