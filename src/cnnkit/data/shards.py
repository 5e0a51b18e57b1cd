"""Datasets as WebDataset shards: tar files of samples read as a stream (``pip install 'cnnkit[shards]'``).

One sample is the image's bytes as they were (never re-encoded), ``json`` labels and, for segmentation,
the mask file's bytes (``mask.<ext>``). ``dataset.yaml`` beside the shards says the task, the classes,
what the reader found (palette, flip pairs...), the count of every split and every shard, and each
shard's SHA-256.

Reading (:class:`~cnnkit.data.shard_stream.ShardStream`) never holds more than a shuffle buffer of
samples: each process of a distributed run and each data-loading worker reads its own shards (or, with
fewer shards than readers, its own samples of them), every epoch in a new order (shards, then a buffer
of samples). The samples in the buffer are held in memory under their names (``SHARD/KEY.EXT``) and read
by the task's own dataset class as files (:func:`cnnkit.data.images.hold_file`): the same decoding, checks
and augmentation as files on disk. Tars are parsed by :mod:`cnnkit.data.tarstream`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from cnnkit.data import tarstream
from cnnkit.data.formats.base import DetSample
from cnnkit.data.localize import LocSample, PointSample
from cnnkit.errors import DataError

log = logging.getLogger("cnnkit")
MANIFEST = "dataset.yaml"
FORMAT = "cnnkit-webdataset/1"
EXTRA = "pip install 'cnnkit[shards]'"


def webdataset() -> Any:
    try:
        import webdataset as wds
    except ImportError:
        raise DataError(f"reading or writing shards needs webdataset: {EXTRA}") from None
    return wds


# -- one sample as JSON labels and files ----------------------------------------------------------------
def sample_labels(sample: Any) -> tuple[dict[str, Any], dict[str, Path]]:
    """A task's sample (what its dataset holds) -> its labels as JSON and its files by role."""
    if isinstance(sample, DetSample):
        labels = {"boxes": sample.boxes.tolist(), "labels": sample.labels.tolist(), "size": list(sample.size)}
        return {"kind": "boxes", **labels}, {"image": sample.path}
    if isinstance(sample, LocSample):
        return {"kind": "object", "label": sample.label, "box": sample.box}, {"image": sample.path}
    if isinstance(sample, PointSample):
        points = [[None if v != v else v for v in p] for p in sample.points.tolist()]  # NaN: not JSON
        return {"kind": "points", "points": points, "visible": sample.visible.tolist()}, {
            "image": sample.path
        }
    if isinstance(sample, tuple) and len(sample) == 2 and isinstance(sample[1], int):
        return {"kind": "class", "label": sample[1]}, {"image": Path(sample[0])}
    if isinstance(sample, tuple) and len(sample) == 2:
        return {"kind": "mask"}, {"image": Path(sample[0]), "mask": Path(sample[1])}
    raise DataError(f"cannot pack a sample of type {type(sample).__name__}")


def sample_from(labels: dict[str, Any], files: dict[str, Path]) -> Any:
    """The inverse of :func:`sample_labels`, on the files written out of a shard."""
    kind, image = labels.get("kind"), files["image"]
    if kind == "boxes":
        boxes = torch.tensor(labels["boxes"], dtype=torch.float32).view(-1, 4)
        return DetSample(
            image, boxes, torch.tensor(labels["labels"], dtype=torch.int64), tuple(labels["size"])
        )
    if kind == "object":
        box = labels["box"]
        return LocSample(image, labels["label"], tuple(box) if box is not None else None)  # type: ignore[arg-type]
    if kind == "points":
        points = [[float("nan") if v is None else v for v in p] for p in labels["points"]]
        return PointSample(image, torch.tensor(points).view(-1, 2), torch.tensor(labels["visible"]))
    if kind == "class":
        return (image, int(labels["label"]))
    if kind == "mask":
        return (image, files["mask"])
    raise DataError(f"unknown sample kind {kind!r}")


# -- writing ----------------------------------------------------------------------------------------------
def parse_size(text: str | int) -> int:
    """``1GB``, ``500MB``, ``64k`` or a number of bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise DataError(f"--shard-size {text!r}: give bytes, or a number with KB, MB or GB")
    return int(float(m.group(1)) * 1024 ** "_kmgt".index(m.group(2) or "_"))


def pack(
    splits: Mapping[str, Sequence[Any]],
    out: str | os.PathLike[str],
    *,
    task: str,
    names: Sequence[str] | None,
    record: dict[str, Any],
    facts: dict[str, Any] | None = None,
    shard_size: int = 1 << 30,
    source: str = "",
    seed: int | None = None,
    progress: bool = True,
) -> Path:
    """Write each split's samples, in the order given, into ``out/{split}-000000.tar``... (a new shard
    before one would pass ``shard_size`` bytes, unless a single sample is larger) and
    ``out/dataset.yaml`` (``seed``: that of the shuffle that made the order, recorded); file bytes are
    copied as they are. ``out`` must be new or empty."""
    from tqdm import tqdm

    wds = webdataset()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: exists and is not empty; pack into a new folder")
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "task": task,
        "names": list(names) if names else None,
        "record": json.loads(json.dumps(record)),  # JSON first: tuples become lists YAML can write
        "source": source,
        "shuffled_with_seed": seed,
        "splits": {},
    }
    if facts:
        manifest["facts"] = json.loads(json.dumps(facts))
    for split, samples in splits.items():
        counts: list[int] = []
        pattern = str(out / f"{split}-%06d.tar")
        # an integer time: no PAX header per file (half the parsing when read); the same data packs into
        # the same bytes
        writer = {"maxsize": float("inf"), "maxcount": 1 << 40, "verbose": 0, "mtime": 0}
        with wds.ShardWriter(pattern, **writer) as sink:
            written = 0  # bytes of the shard being written, tar headers and padding included
            for i, sample in enumerate(tqdm(samples, desc=f"pack {split}", disable=not progress or None)):
                labels, files = sample_labels(sample)
                entry = {"__key__": f"{split}{i:09d}", "json": json.dumps(labels).encode()}
                for role, path in files.items():
                    ext = path.suffix.lower().lstrip(".") or "bin"
                    entry[ext if role == "image" else f"{role}.{ext}"] = path.read_bytes()
                size = sum(512 + -(-len(v) // 512) * 512 for k, v in entry.items() if k != "__key__")
                if written and written + size > shard_size:  # (ShardWriter's own count leaves headers out)
                    sink.next_stream()
                    written = 0
                written += size
                sink.write(entry)
                shard = sink.shard - 1  # ShardWriter numbers the shard it is writing from 1
                while len(counts) <= shard:
                    counts.append(0)
                counts[shard] += 1
        shards = []
        for k, n in enumerate(counts):
            path = out / f"{split}-{k:06d}.tar"
            shards.append(
                {"name": path.name, "count": n, "bytes": path.stat().st_size, "sha256": _sha256(path)}
            )
        manifest["splits"][split] = {"count": sum(counts), "shards": shards}
    (out / MANIFEST).write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- finding shards -----------------------------------------------------------------------------------------
@dataclass
class Manifest:
    """``dataset.yaml`` read, and where its shards are: ``urls[split]`` in order, ``counts[split]`` (each
    shard's SHA-256 stays in the file, for checking a download with ``sha256sum``)."""

    task: str
    names: list[str] | None
    record: dict[str, Any]
    facts: dict[str, Any]
    urls: dict[str, list[str]] = field(default_factory=dict)
    counts: dict[str, list[int]] = field(default_factory=dict)


_URL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)


def is_url(text: str) -> bool:
    return bool(_URL.match(text)) and not re.match(r"^[a-zA-Z]:[\\/]", text)  # not a Windows drive


def is_shards(source: str | os.PathLike[str] | None) -> bool:
    """Whether ``source`` names shards: a folder or file ``dataset.yaml`` of format cnnkit-webdataset, a
    ``.tar`` shard (brace patterns allowed), or a URL of one of those."""
    if source is None:
        return False
    text = str(source)
    if is_url(text):
        return text.endswith((".tar", "}", MANIFEST)) or ".tar" in text
    path = Path(text)
    if path.is_dir():
        path = path / MANIFEST
    elif text.endswith(".tar"):  # a shard, or a brace pattern of them (an image named a{1}.png is not)
        return True
    if path.name != MANIFEST or not path.is_file():
        return False
    try:
        return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("format") == FORMAT
    except (OSError, yaml.YAMLError):
        return False


def read_manifest(source: str | os.PathLike[str]) -> Manifest:
    """The manifest of ``source`` (a shards folder, its ``dataset.yaml``, a shard or shard pattern beside
    one, or URLs of those). A manifest's ``base`` (e.g. ``"pipe:aws s3 cp s3://bucket/data/{name} -"``)
    says how to open each shard; else shards are beside the manifest."""
    text = str(source)
    if not is_url(text) and Path(text).is_dir():
        text = str(Path(text) / MANIFEST)
    elif not text.endswith(MANIFEST):
        first = expand(text)[0]
        if first.startswith("pipe:"):
            raise DataError(f"{text}: a pipe: source needs its {MANIFEST}; pass --data PATH/{MANIFEST} "
                            "with base: 'pipe:COMMAND {name}' in it")  # fmt: skip
        text = first.rsplit("/", 1)[0] + "/" + MANIFEST if "/" in first else MANIFEST
    try:
        with open_stream(text) as f:
            data = yaml.safe_load(f.read().decode("utf-8")) or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError, DataError) as exc:
        raise DataError(f"{text}: cannot read the shards' manifest ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DataError(
            f"{text}: not a cnnkit shard manifest (format: {FORMAT}); write one with cnnkit data pack"
        )
    base = data.get("base") or (text.rsplit("/", 1)[0] + "/{name}" if "/" in text else "{name}")
    m = Manifest(data["task"], data.get("names"), data.get("record") or {}, data.get("facts") or {})
    for split, entry in (data.get("splits") or {}).items():
        m.urls[split] = [base.format(name=s["name"]) for s in entry["shards"]]
        m.counts[split] = [int(s["count"]) for s in entry["shards"]]
    return m


def expand(pattern: str) -> list[str]:
    """Brace patterns as WebDataset writes them: ``shard-{000000..000127}.tar``, ``{a,b}``."""
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


def open_stream(url: str) -> Any:
    """A binary stream of a local path or URL: WebDataset's openers (``pipe:``, ``http(s)``, ``gs``...),
    else fsspec's (``s3://``... with the filesystem's package installed)."""
    if not is_url(url) or url.startswith("file:"):
        path = url.removeprefix("file://").removeprefix("file:")
        try:
            return open(path, "rb")
        except OSError as exc:
            raise DataError(f"{path}: {exc.strerror or exc}") from None
    scheme = url.split(":", 1)[0].lower()
    wds = webdataset()
    if scheme in wds.gopen_schemes:
        return wds.gopen(url, "rb")
    try:
        import fsspec
    except ImportError:
        raise DataError(f"{url}: opening {scheme}:// needs fsspec: {EXTRA}") from None
    try:
        return fsspec.open(url, "rb").open()
    except (ImportError, ValueError, OSError) as exc:
        raise DataError(f"{url}: {exc}") from None


# -- reading ---------------------------------------------------------------------------------------------
def read_shard(
    url: str, problem: Callable[[str], None], expected: int | None = None
) -> Iterator[dict[str, Any]]:
    """The samples of one shard (``__key__`` and a bytes value per file ending); a shard cut short or
    corrupt is reported once (samples read of ``expected``, the last key) and its remaining samples are
    lost."""
    key, n = None, 0
    try:
        with open_stream(url) as stream:
            for sample in tarstream.samples(stream):
                key, n = sample["__key__"], n + 1
                yield sample
    except (tarfile.TarError, OSError, ValueError, EOFError, DataError) as exc:
        read = f"{n} of {expected}" if expected is not None else str(n)
        last = f", the last {key}" if key else ""
        problem(f"{url}: a shard cut short or corrupt ({read} samples read{last}): {exc}")


def frames_of(source: str) -> Iterator[tuple[str, bytes]]:
    """``(name, image bytes)`` of every sample of a shard source (every split), for prediction."""
    m = read_manifest(source)
    for urls in m.urls.values():
        for url in urls:
            for raw in read_shard(url, lambda message: log.warning("skipping %s", message)):
                ext = image_key(raw)
                if ext is not None:
                    yield f"{Path(url).name}/{raw['__key__']}.{ext}", raw[ext]


def image_key(raw: dict[str, Any]) -> str | None:
    """The image's entry of a sample read from a shard: its file ending (``jpg``, ``png``...)."""
    return next((k for k in raw if not k.startswith("__") and k != "json" and "." not in k), None)
