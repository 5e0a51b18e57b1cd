"""Decoding images from disk into RGB ``uint8`` tensors ``[3, H, W]``.

JPEG, PNG and WebP go through ``torchvision.io`` (libjpeg-turbo/libpng, EXIF orientation applied);
anything else (BMP, TIFF, GIF...) and anything torchvision cannot read goes through Pillow. Grayscale,
RGBA, palette and 16-bit images all come out as 8-bit RGB.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import io
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from cnnkit.data.report import DataReport
from cnnkit.data.walk import walk_files
from cnnkit.errors import DataError
from cnnkit.io import make_dir

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
_FAST = {".jpg", ".jpeg", ".png", ".webp"}
log = logging.getLogger("cnnkit")
T = TypeVar("T")

# torchvision 0.29 marks its decoders deprecated in favour of TorchCodec; they remain the fastest
# decoders available here, and Pillow takes over if they are ever removed.
warnings.filterwarnings(
    "ignore",
    message="The image decoding and encoding capabilities of TorchVision",
    category=DeprecationWarning,
)


def is_image(path: str | os.PathLike[str]) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


@dataclass
class ImageLimits:
    """The largest image any decode accepts, in pixels and in file bytes: a decompression bomb (a small
    PNG of 20000x20000 pixels) is refused before it is decoded. Set from the environment
    (``CNNKIT_MAX_IMAGE_PIXELS``, ``CNNKIT_MAX_IMAGE_BYTES``) or by assigning ``LIMITS.max_pixels``."""

    max_pixels: int = int(os.environ.get("CNNKIT_MAX_IMAGE_PIXELS", 178_956_970))  # Pillow's own bound
    max_bytes: int = int(os.environ.get("CNNKIT_MAX_IMAGE_BYTES", 512 << 20))


LIMITS = ImageLimits()

# Files held in memory under a path name (a shard's samples): read_image, open_image and everything built
# on them (masks, a dataset's first-sample checks) read these bytes instead of the disk.
_HELD: dict[str, bytes] = {}
_HOLDS: collections.Counter[str] = collections.Counter()


def hold_file(path: str | os.PathLike[str], data: bytes) -> None:
    """Make ``path`` read as ``data`` in this process, until each hold is released (:func:`release_file`);
    nothing is written."""
    _HELD[str(path)] = data
    _HOLDS[str(path)] += 1


def release_file(path: str | os.PathLike[str]) -> None:
    name = str(path)
    _HOLDS[name] -= 1
    if _HOLDS[name] <= 0:
        del _HOLDS[name]
        _HELD.pop(name, None)


@contextlib.contextmanager
def open_image(path: str | os.PathLike[str], data: bytes | None = None) -> Iterator[Image.Image]:
    """The image at ``path`` (or encoded in ``data``, named ``path``) opened lazily (header only) after
    checking it is within :data:`LIMITS`; :class:`DataError` naming the file otherwise."""
    path = Path(path)
    if data is None:
        data = _HELD.get(str(path))
    if Image.MAX_IMAGE_PIXELS is not None and LIMITS.max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = LIMITS.max_pixels  # Pillow's own guard must not refuse what is allowed
    try:
        nbytes = path.stat().st_size if data is None else len(data)
        if nbytes > LIMITS.max_bytes:
            raise DataError(
                f"{path}: {nbytes / 2**20:.0f} MB is over the {LIMITS.max_bytes / 2**20:.0f} MB limit "
                "for an image (set CNNKIT_MAX_IMAGE_BYTES to allow it)"
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the check below says it
            with Image.open(path if data is None else io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > LIMITS.max_pixels:
                    raise DataError(f"{path}: {w}x{h} pixels {_OVER_LIMIT.format(LIMITS.max_pixels)}")
                yield im
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Image.DecompressionBombError as exc:  # Pillow's own guard (twice its limit) tripped first
        size = re.search(r"\((\d+) pixels\)", str(exc))
        what = f"{int(size.group(1)):,} pixels" if size else "the image"
        raise DataError(f"{path}: {what} {_OVER_LIMIT.format(LIMITS.max_pixels)}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode image ({exc})") from None


_OVER_LIMIT = "is over the limit of {:,} (a decompression bomb?); set CNNKIT_MAX_IMAGE_PIXELS to allow it"


def read_image(path: str | os.PathLike[str]) -> torch.Tensor:
    """Decode ``path`` to an RGB ``uint8`` tensor ``[3, H, W]``; raise :class:`DataError` naming it
    (unreadable, or over :data:`LIMITS`)."""
    path = Path(path)
    data = _HELD.get(str(path))
    if path.suffix.lower() in _FAST:
        with open_image(path, data):  # the header: limits are checked before anything is decoded
            pass
        try:
            return _read_torchvision(path, data)
        except (RuntimeError, ValueError, ImportError):
            pass  # unusual variants (CMYK JPEG, 16-bit PNG with alpha...): let Pillow try
    return _read_pillow(path, data)


def _read_torchvision(path: Path, data: bytes | None = None) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image, read_file

    encoded = read_file(str(path)) if data is None else torch.frombuffer(bytearray(data), dtype=torch.uint8)
    img = decode_image(encoded, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    if img.dtype == torch.uint16:  # 16-bit PNG
        img = (img.to(torch.int32) >> 8).to(torch.uint8)
    return img


def _read_pillow(path: Path, data: bytes | None = None) -> torch.Tensor:
    with open_image(path, data) as raw:
        try:
            arr = _to_rgb_array(ImageOps.exif_transpose(raw))
        except (OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"{path}: cannot decode image ({exc})") from None
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        gray = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def verify_image(path: str | os.PathLike[str]) -> str | None:
    """A cheap integrity check (header, limits, structure, a JPEG's end marker; no full decode unless
    the end marker is missing): the reason it fails, or None."""
    try:
        with open_image(path) as im:
            jpeg = im.format == "JPEG"
            im.verify()
        if jpeg and not _jpeg_complete(Path(path)):
            with open_image(path) as im:  # no end marker: only a full decode tells junk from a cut file
                im.load()
    except DataError as exc:
        return str(exc).removeprefix(f"{path}: ")
    except (OSError, SyntaxError, ValueError) as exc:
        return f"cannot decode image ({exc})"
    return None


def _jpeg_complete(path: Path) -> bool:
    """Whether the JPEG ends with its end-of-image marker (a file cut short does not)."""
    tail = _HELD.get(str(path))
    if tail is None:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 64))
            tail = f.read()
    return tail[-64:].rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")


def keep_readable(
    samples: Sequence[T], path_of: Callable[[T], Path], report: DataReport, strict: bool = False
) -> list[T]:
    """The samples whose image passes :func:`verify_image`; each other one goes to ``report`` (or, with
    ``strict``, stops the run) — the one policy for unreadable images of every task."""
    good = []
    for sample in samples:
        reason = verify_image(path_of(sample))
        if reason is None:
            good.append(sample)
        else:
            report.add(path_of(sample), reason, strict)
    return good


def first_readable(index: int, n: int, load: Callable[[int], T]) -> T:
    """``load(index)``, or of the next index whose image decodes (an image that passed the header check
    but fails to decode, such as a truncated JPEG, is logged and replaced; an epoch never stops on it)."""
    for attempt in range(n):
        try:
            return load((index + attempt) % n)
        except DataError as exc:
            log.warning("skipping unreadable image: %s", exc)
    raise DataError("no image of the dataset could be decoded")


def iter_images(sources: Iterable[str | os.PathLike[str]], *, videos: bool = False) -> Iterator[Path]:
    """Files, folders (recursively) and glob patterns, in order; other files in folders and glob matches
    are ignored (video files are kept with ``videos=True``)."""

    def wanted(p: str | os.PathLike[str]) -> bool:
        return is_image(p) or (videos and is_video(p))

    for src in sources:
        path = Path(src)
        if path.is_dir():
            yield from walk_files(path, wanted)
        elif path.is_file():
            yield path
        else:
            matches = sorted(glob.glob(str(src), recursive=True))
            if not matches:
                raise DataError(f"{src}: no such file, folder or glob match")
            yield from (Path(m) for m in matches if wanted(m))


VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")


def is_video(path: str | os.PathLike[str]) -> bool:
    return str(path).lower().endswith(VIDEO_EXTENSIONS)


@dataclass(frozen=True)
class Frame:
    """One image to predict on: a picture, or frame ``index`` of a video file."""

    path: Path
    image: torch.Tensor  # [3, H, W] uint8 RGB
    index: int | None = None

    @property
    def name(self) -> str:
        return str(self.path) if self.index is None else f"{self.path}#{self.index}"

    @property
    def stem(self) -> str:
        return self.path.stem if self.index is None else f"{self.path.stem}_{self.index:06d}"


class OutputNames:
    """The files a prediction writes under ``out``: named after each input's stem, made unique within the
    run (``img``, ``img_2``, ...: ``a/img.png``, ``a/img.jpg`` and ``b/img.png`` never share an output),
    and never onto an input file (refused with the path)."""

    def __init__(self, out: Path | None) -> None:
        self.out = out
        self.assigned: dict[str, str] = {}  # input (frame name) -> output stem
        self.inputs: set[Path] = set()

    def path(self, frame: Frame, suffix: str, folder: str = "") -> Path:
        """``out/folder/<unique stem><suffix>`` for ``frame`` (the same stem for all of its files)."""
        assert self.out is not None
        self.inputs.add(frame.path.resolve())
        stem = self.assigned.get(frame.name)
        if stem is None:
            taken = set(self.assigned.values())
            stem, k = frame.stem, 1
            while stem in taken:
                k += 1
                stem = f"{frame.stem}_{k}"
            if k > 1:
                log.info(
                    "%s shares its name with an earlier input: its results are named %s", frame.name, stem
                )
            self.assigned[frame.name] = stem
        target = self.out / folder / f"{stem}{suffix}"
        if target.resolve() in self.inputs:
            raise DataError(
                f"{target}: writing a prediction there would overwrite an input; choose another --out"
            )
        make_dir(target.parent)
        return target


def iter_frames(sources: Iterable[Any]) -> Iterator[Frame]:
    """Decoded images and video frames of files, folders and globs, one at a time (nothing is held
    beyond the current frame), and images already in memory: :class:`Frame`, PIL images, numpy arrays
    ``[H, W(, C)]`` and tensors ``[C, H, W]`` (uint8, or float in [0, 1]), named ``image0``, ``image1``...
    by their place in ``sources``. An unreadable image or a broken video is logged and skipped."""
    for k, source in enumerate(sources):
        if isinstance(source, Frame):
            yield source
        elif not isinstance(source, str | os.PathLike):
            yield Frame(Path(f"image{k}"), to_image_tensor(source, f"image{k}"))
        elif _shards(source):  # WebDataset shards: every image of every split, named shard/key
            from cnnkit.data.shards import frames_of

            for name, data in frames_of(str(source)):
                try:
                    yield Frame(Path(name), decode_image_bytes(data, name))
                except DataError as exc:
                    log.warning("skipping %s", exc)
        else:
            for path in iter_images([source], videos=True):
                if is_video(path):
                    yield from _video_frames(path)
                    continue
                try:
                    yield Frame(path, read_image(path))
                except DataError as exc:
                    log.warning("skipping %s", exc)


def _shards(source: str | os.PathLike[str]) -> bool:
    from cnnkit.data.shards import is_shards

    return is_shards(source)


def decode_image_bytes(data: bytes, name: str) -> torch.Tensor:
    """An encoded image in memory as ``[3, H, W]`` uint8 RGB, as :func:`read_image` decodes a file
    (EXIF orientation, :data:`LIMITS`); :class:`DataError` naming ``name`` otherwise."""
    return _read_pillow(Path(name), data)


def to_image_tensor(image: Any, name: str = "image") -> torch.Tensor:
    """An in-memory image as ``[3, H, W]`` uint8 RGB: a PIL image (any mode), a numpy array ``[H, W]``,
    ``[H, W, 1|3|4]`` or a tensor ``[1|3|4, H, W]`` (``[H, W, 3]`` is taken as channels-last), uint8 or
    float in [0, 1]."""
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).contiguous()
    if isinstance(image, np.ndarray):
        t = torch.from_numpy(np.array(image, copy=None if image.flags.writeable else True, order="C"))
        t = t[None] if t.ndim == 2 else t.permute(2, 0, 1) if t.ndim == 3 else t
    elif isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        t = t[None] if t.ndim == 2 else t
        if t.ndim == 3 and t.shape[0] not in (1, 3, 4) and t.shape[-1] in (1, 3, 4):
            t = t.permute(2, 0, 1)
    else:
        raise DataError(
            f"{name}: not an image (a path, PIL image, numpy array or tensor): {type(image).__name__}"
        )
    if t.ndim != 3 or t.shape[0] not in (1, 3, 4) or min(t.shape[1:]) < 1:
        raise DataError(
            f"{name}: an image is [H, W], [H, W, C] or [C, H, W] with 1, 3 or 4 channels, not {list(t.shape)}"
        )
    if t.is_floating_point():
        low, high = float(t.min()), float(t.max())
        if low < 0 or high > 1:
            raise DataError(
                f"{name}: a float image must hold values in [0, 1], not [{low:g}, {high:g}]; "
                "pass uint8 (0-255) or divide by 255"
            )
        t = (t.float() * 255).round()
    t = t.to(torch.uint8)[:3]
    return t.expand(3, -1, -1).contiguous() if t.shape[0] == 1 else t.contiguous()


def _video_frames(path: Path) -> Iterator[Frame]:
    try:
        import av
    except ImportError:
        raise DataError(f"{path}: reading video needs PyAV: pip install av (or cnnkit[video])") from None
    try:
        with av.open(str(path)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                rgb = torch.from_numpy(frame.to_ndarray(format="rgb24"))
                yield Frame(path, rgb.permute(2, 0, 1).contiguous(), i)
    except av.FFmpegError as exc:
        log.warning("skipping the rest of %s: %s", path, exc)
