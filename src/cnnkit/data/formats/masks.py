"""Segmentation data as people publish it: an image folder and a mask folder, matched by file stem.

Layouts found under a dataset root:

- an image folder and a mask folder side by side, named in the singular or the plural (``images`` /
  ``image`` / ``imgs`` / ``img`` / ``JPEGImages`` / ``PNGImages`` / ``inputs``; ``masks`` / ``mask`` /
  ``labels`` / ``label`` / ``annotations`` / ``gt`` / ``groundtruth`` / ``SegmentationClass`` /
  ``PedMasks`` / ``targets``), flat or with ``train``/``val``/``valid``/``test`` folders inside;
- split folders each holding both (``train/{images,masks}``);
- SegNet-style splits with their masks beside them (``train/`` + ``trainannot/``, ``val_labels/``...);
- Pascal VOC (``ImageSets/Segmentation/{train,val}.txt``), or ``train.txt``/``val.txt`` id lists at
  the root.

A mask matches its image by stem, also with a suffix (``x_mask.png``, ``x_label.png``, ``x_gt.png``,
CamVid's ``x_L.png``); a ``.png`` mask of a ``.jpg`` image is the usual case.

Mask values: index PNGs (a pixel's value is its class), palette PNGs (VOC), colour RGB masks with a
``palette`` in ``data.yaml``, and **binary masks as people store them**: values only {0, 255} are
background/foreground (255 → class 1), {0, 1} likewise, and masks near 0/255 with compression noise
(JPEG) are thresholded at 128; the log says which. ``data.yaml`` may give ``names``, ``ignore_index``
(then 255 is void, not foreground), ``palette`` and ``mask_threshold``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnnkit.data.classify import split_dataset
from cnnkit.data.formats.base import SPLIT_NAMES, VAL_NAMES, images_under, relative
from cnnkit.data.images import is_image, open_image
from cnnkit.data.report import DataReport
from cnnkit.errors import DataError
from cnnkit.io import load_yaml

log = logging.getLogger("cnnkit")

IMAGE_DIRS = ("images", "image", "imgs", "img", "jpegimages", "pngimages", "inputs", "input", "rgb")
MASK_DIRS = ("masks", "mask", "labels", "label", "annotations", "annotation", "gt", "gts", "groundtruth",
             "ground_truth", "segmentationclass", "pedmasks", "segmentations", "segmentation", "targets",
             "target")  # fmt: skip
MASK_SUFFIXES = ("_mask", "_masks", "-mask", "_label", "_labels", "_gt", "_seg", "_segmentation", "_L", "_m")
ANNOT_SUFFIXES = ("annot", "_annot", "_labels", "_label", "_masks", "_mask", "_gt")


@dataclass
class SegmentationSpec:
    """What a segmentation dataset is: its samples per split and how to read its masks."""

    train: list[tuple[Path, Path]]
    val: list[tuple[Path, Path]]
    names: list[str] | None = None
    ignore_index: int = 255
    palette: list[tuple[int, int, int]] | None = None  # colour of each class, for RGB masks
    report: DataReport = field(default_factory=DataReport)  # images without masks, unlisted ids
    threshold: int | None = None  # binary masks: value >= threshold is foreground (class 1)
    found: str = ""  # what the layout was, said in the log


def read_mask(
    path: str | os.PathLike[str],
    palette: Sequence[tuple[int, int, int]] | None = None,
    ignore_index: int = 255,
    threshold: int | None = None,
) -> np.ndarray:
    """A mask file as class indices ``[H, W] uint8``: binary masks thresholded (``threshold``), RGB masks
    mapped through ``palette`` (grey masks saved as RGB read as grey)."""
    with open_image(path) as im:  # within the image size limits, or a DataError naming the file
        try:
            if threshold is not None:
                return (np.asarray(im.convert("L")) >= threshold).astype(np.uint8)
            if im.mode in ("P", "L", "I;16", "I", "1"):
                return np.asarray(im, dtype=np.int64).astype(np.uint8)
            rgb = np.asarray(im.convert("RGB"), dtype=np.int64)
        except (OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"{path}: cannot read mask ({exc})") from None
    if palette is None:
        if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
            return rgb[..., 0].astype(np.uint8)  # a grey mask stored as RGB
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


# -- finding the pairs ---------------------------------------------------------------------------------
def _find(root: Path, names: Sequence[str]) -> Path | None:
    """The first sub-folder of ``root`` named (case-insensitively) like one of ``names``."""
    if not root.is_dir():
        return None
    dirs = {d.name.lower(): d for d in sorted(root.iterdir()) if d.is_dir()}
    return next((dirs[n] for n in names if n in dirs), None)


def _find_masks(root: Path) -> Path | None:
    """The first mask-named folder that holds images (VOC's ``Annotations/`` holds xml, not masks)."""
    for name in MASK_DIRS:
        d = _find(root, (name,))
        if d is not None and images_under(d, max_depth=1):  # its images, or those of its split folders
            return d
    return None


def _mask_key(stem: str) -> str:
    for suffix in MASK_SUFFIXES:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def _pairs(image_dir: Path, mask_dir: Path, report: DataReport) -> list[tuple[Path, Path]]:
    """Images of ``image_dir`` with the mask of the same stem (or stem + a mask suffix) in ``mask_dir``
    (which may be the same folder: masks beside the images, told apart by their suffix)."""
    files = sorted(p for p in mask_dir.iterdir() if is_image(p))
    masks = {_mask_key(p.stem): p for p in files if mask_dir != image_dir or _mask_key(p.stem) != p.stem}
    pairs = []
    for img in sorted(p for p in image_dir.iterdir() if is_image(p)):
        if image_dir == mask_dir and _mask_key(img.stem) != img.stem:
            continue  # a mask beside its image
        if img.stem in masks:
            pairs.append((img, masks[img.stem]))
        else:
            report.add(img, f"no mask named {img.stem}.* (or {img.stem}_mask.*) in {mask_dir}")
    return pairs


def _split_dirs(folder: Path) -> dict[str, Path]:
    """``train``/``val`` sub-folders (``valid``, ``validation``, ``test`` count as validation)."""
    found: dict[str, Path] = {}
    for name in SPLIT_NAMES:
        d = _find(folder, (name,))
        if d is not None:
            split = "train" if name == "train" else "val"
            found.setdefault(split, d)
    return found


def _annot_dir(root: Path, split_dir: Path) -> Path | None:
    return _find(root, tuple(f"{split_dir.name.lower()}{s}" for s in ANNOT_SUFFIXES))


def _layout(root: Path, report: DataReport) -> tuple[dict[str, list[tuple[Path, Path]]], str]:
    """Pairs per split (``all``: no split) and a sentence saying what was found."""
    image_dir, mask_dir = _find(root, IMAGE_DIRS), _find_masks(root)
    if image_dir is not None and mask_dir is not None:
        inside = _split_dirs(image_dir)
        where = f"images in {relative(image_dir, root)}/, masks in {relative(mask_dir, root)}/"
        if "train" in inside:
            splits = {}
            for split, d in inside.items():
                m = _find(mask_dir, (d.name.lower(),))
                if m is None:
                    raise DataError(
                        f"{root}: {relative(d, root)}/ has no matching {relative(mask_dir, root)}/{d.name}/"
                    )
                splits[split] = _pairs(d, m, report)
            return splits, f"{where} with split folders"
        return {"all": _pairs(image_dir, mask_dir, report)}, where
    splits_at_root = _split_dirs(root)
    if "train" in splits_at_root:
        train = splits_at_root["train"]
        if _find(train, IMAGE_DIRS) and _find_masks(train):
            out = {}
            for split, d in splits_at_root.items():
                images, masks = _find(d, IMAGE_DIRS), _find_masks(d)
                if images is None or masks is None:
                    raise DataError(
                        f"{d}: expected an image folder and a mask folder inside, like {train.name}/"
                    )
                out[split] = _pairs(images, masks, report)
            return out, "split folders, each with an image and a mask folder"
        if _annot_dir(root, train) is not None:
            out = {}
            for split, d in splits_at_root.items():
                annot = _annot_dir(root, d)
                if annot is not None:
                    out[split] = _pairs(d, annot, report)
            return out, f"split folders with their masks beside them ({_annot_dir(root, train).name}/...)"  # type: ignore[union-attr]
    if image_dir is not None and any(_mask_key(p.stem) != p.stem for p in image_dir.iterdir() if is_image(p)):
        return {
            "all": _pairs(image_dir, image_dir, report)
        }, f"images and *_mask files together in {image_dir.name}/"
    raise DataError(
        f"{root}: no segmentation layout found. Looked for an image folder ({'/'.join(IMAGE_DIRS)}) beside a "
        f"mask folder ({'/'.join(MASK_DIRS)}), flat or with train/val inside; train/ and val/ folders each "
        "holding both; SegNet's train/ + trainannot/; Pascal VOC's JPEGImages/ + SegmentationClass/"
        + _class_folders_hint(root)
    )


def _class_folders_hint(root: Path) -> str:
    """A hint when ``root`` holds class folders (each sub-folder only images, or train/ of them)."""
    base = root / "train" if (root / "train").is_dir() else root
    subs = sorted(d for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(subs) >= 2 and all(images_under(d, max_depth=0) for d in subs[:20]):
        return (
            f". It looks like class folders ({', '.join(d.name for d in subs[:5])}...): cnnkit train classify"
        )
    return ""


def _lists(root: Path) -> dict[str, set[str]] | None:
    """``train.txt``/``val.txt`` id lists (VOC's ``ImageSets/Segmentation`` or at the root)."""
    for folder in (root / "ImageSets" / "Segmentation", root):
        if (folder / "train.txt").is_file():
            out = {"train": _ids(folder / "train.txt")}
            val = next((folder / f"{n}.txt" for n in VAL_NAMES if (folder / f"{n}.txt").is_file()), None)
            if val is not None:
                out["val"] = _ids(val)
            return out
    return None


def _ids(path: Path) -> set[str]:
    return {Path(line.split()[0]).stem for line in path.read_text().splitlines() if line.strip()}


# -- the mask encoding -----------------------------------------------------------------------------------
def infer_threshold(pairs: Sequence[tuple[Path, Path]], config: dict[str, Any], source: Path) -> int | None:
    """A threshold when the masks are binary as people store them (see the module docstring), else
    None; said in the log. ``data.yaml``'s ``ignore_index`` or ``palette`` mean index masks as written."""
    if "mask_threshold" in config:
        return int(config["mask_threshold"])
    if "ignore_index" in config or config.get("palette") or not pairs:
        return None
    step = max(1, len(pairs) // 32)
    counts = np.zeros(256, dtype=np.int64)
    for _, mask in list(pairs)[::step][:32]:
        with open_image(mask) as im:
            if im.mode == "P":
                return None  # palette masks (VOC) are index masks
            counts += np.bincount(np.asarray(im.convert("L")).ravel(), minlength=256)
    values = np.flatnonzero(counts)
    if set(values.tolist()) <= {0, 255} and 255 in values:
        log.info("%s: binary masks 0/255: 255 = foreground (class 1); set ignore_index in data.yaml if 255 "
                 "means void", source)  # fmt: skip
        return 128
    extremes = counts[:48].sum() + counts[208:].sum()
    if len(values) > 2 and counts[208:].sum() > 0 and extremes >= 0.98 * counts.sum() and values.max() > 200:
        log.info("%s: masks are 0/255 with compression noise (%d grey levels): thresholded at 128",
                 source, len(values))  # fmt: skip
        return 128
    if set(values.tolist()) == {0, 1}:
        log.info("%s: binary masks 0/1: 1 = foreground", source)
    return None


def resolve_segmentation_data(
    root: str | os.PathLike[str], val_fraction: float = 0.2, seed: int = 0
) -> SegmentationSpec:
    """Find images, masks, splits and the mask encoding under ``root`` (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    config: dict[str, Any] = next(
        (load_yaml(root / n) for n in ("data.yaml", "dataset.yaml") if (root / n).is_file()), {}
    )
    report = DataReport()
    splits, found = _layout(root, report)
    lists = _lists(root)
    if lists is not None:
        every = [p for pairs in splits.values() for p in pairs]
        splits = {s: [p for p in every if p[0].stem in ids] for s, ids in lists.items()}
        for s, ids in lists.items():
            for i in sorted(ids - {p[0].stem for p in splits[s]}):
                report.add(i, f"listed in {s}.txt but has no image/mask pair")
        found += "; splits from train.txt/val.txt"
    if "all" in splits or "val" not in splits:
        pool = splits.pop("all") if "all" in splits else splits.pop("train", [])
        train_idx, val_idx = split_dataset(len(pool), val_fraction, seed)
        splits = {"train": [pool[i] for i in train_idx], "val": [pool[i] for i in val_idx]}
        found += (
            f"; no validation split: seeded {100 - 100 * val_fraction:.0f}/{100 * val_fraction:.0f} split"
        )
    if not splits["train"]:
        first = f"; first: {report.problems[0]}" if report.problems else ""
        raise DataError(f"{root}: {found}, but no image has a mask{first}")
    log.info("%s: %s (%d train, %d val pairs)", root, found, len(splits["train"]), len(splits["val"]))
    threshold = infer_threshold(splits["train"], config, root)
    names = config.get("names")
    if isinstance(names, dict):
        names = [str(names[k]) for k in sorted(names)]
    if names is None and threshold is not None:
        names = ["background", "foreground"]
    palette = config.get("palette")
    return SegmentationSpec(
        splits["train"],
        splits["val"],
        list(names) if names else None,
        int(config.get("ignore_index", 255)),
        [tuple(c) for c in palette] if palette else None,
        report,
        threshold,
        found,
    )
