"""Pretrained weights by name: torchvision's ImageNet files and timm's (from the Hugging Face hub) for
the architectures cnnkit shares with them, fetched once into a cache and checked against their
checksums.

Tags follow timm's ``model.pretrain`` form: ``resnet50.tv_in1k`` (torchvision's first ImageNet weights),
``resnet50.tv2_in1k`` (its second recipe), ``efficientnet_b0.ra_in1k`` (timm's). ``list_pretrained()``
lists them; ``create_model("resnet50", pretrained=True)`` takes the default tag of a model, and
``create_model("resnet50.tv2_in1k")`` a given one. :func:`register_pretrained` adds your own (a
private mirror, a team's weights).

* Cache: torchvision's files where torchvision keeps them (``torch.hub.get_dir()/checkpoints``), the
  others under ``$CNNKIT_CACHE`` (default ``~/.cache/cnnkit``)/``weights/TAG/``.
* Checksums: torchvision's file names carry the first hex digits of their SHA-256; the hub gives a file's
  full SHA-256 (``X-Linked-Etag``). A download that does not match is deleted and refused.
* Offline: ``CNNKIT_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``) uses the cache only; a file that is not
  there, or no network, is an error naming the URL and the cache path, so it can be fetched elsewhere.
* ``HF_ENDPOINT`` points the hub downloads at a mirror.
"""

from __future__ import annotations

import fnmatch
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cnnkit.errors import CnnkitError

# Google-ported weights expect inputs scaled to [-1, 1]; torchvision turns on ``transform_input``.
TRANSFORM_INPUT_MODELS = {"googlenet", "inception_v3"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Pretrained:
    """One set of pretrained weights: its tag, the cnnkit model it fits (with ``args``), where it is, and
    how to check it (``sha256``: the full digest or its first hex digits; None: the server's)."""

    tag: str
    model: str
    url: str
    sha256: str | None = None
    source: str = "torchvision"
    imgsz: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def reference(self) -> str | None:
        """The name of the model the file was saved from in its own library (timm's arch name)."""
        return self.tag.partition(".")[0] if self.source == "timm" else None

    @property
    def cache_path(self) -> Path:
        if self.source == "torchvision":
            return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(self.url)
        root = Path(os.environ.get("CNNKIT_CACHE") or Path.home() / ".cache" / "cnnkit")
        return root / "weights" / self.tag / os.path.basename(self.url)


_REGISTERED: dict[str, Pretrained] = {}

#: timm's weights whose architecture is the cnnkit model's (checked against timm's outputs in the tests):
#: tag -> cnnkit model
TIMM_TAGS = {
    "resnet18.a1_in1k": "resnet18",
    "resnet50.a1_in1k": "resnet50",
    "efficientnet_b0.ra_in1k": "efficientnet_b0",
    "mobilenetv2_100.ra_in1k": "mobilenet_v2",
    "mobilenetv3_large_100.ra_in1k": "mobilenet_v3_large",
    "mobilenetv3_small_100.lamb_in1k": "mobilenet_v3_small",
}
_TV_TAGS = {"IMAGENET1K_V1": "tv_in1k", "IMAGENET1K_V2": "tv2_in1k"}


def register_pretrained(entry: Pretrained) -> Pretrained:
    """Add (or replace) a tag; ``create_model(entry.tag)`` then builds ``entry.model`` with it."""
    _REGISTERED[entry.tag] = entry
    return entry


def _torchvision_tags(model: str) -> list[Pretrained]:
    from torchvision.models import get_model_weights

    try:
        weights_enum = get_model_weights(model)
    except (ValueError, KeyError):
        return []
    found = []
    for w in weights_enum:  # type: ignore[attr-defined]
        suffix = _TV_TAGS.get(w.name)
        if suffix is None:
            continue
        transforms = w.transforms()
        digest = re.search(r"-([0-9a-f]{6,})\.", os.path.basename(w.url))
        found.append(
            Pretrained(
                f"{model}.{suffix}",
                model,
                w.url,
                digest.group(1) if digest else None,
                "torchvision",
                int(transforms.crop_size[0]),
                tuple(transforms.mean),
                tuple(transforms.std),
                {"transform_input": True} if model in TRANSFORM_INPUT_MODELS else {},
            )
        )
    return found


def _timm_entry(tag: str) -> Pretrained:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return Pretrained(
        tag, TIMM_TAGS[tag], f"{endpoint}/timm/{tag}/resolve/main/model.safetensors", None, "timm"
    )


def list_pretrained(pattern: str = "*") -> list[str]:
    """The tags of every pretrained weights cnnkit knows (``fnmatch`` ``pattern``, e.g. ``"resnet*"``)."""
    from cnnkit.registry import list_models

    tags = {e.tag for name in list_models() for e in _torchvision_tags(name)}
    tags |= set(TIMM_TAGS) | set(_REGISTERED)
    return sorted(t for t in tags if fnmatch.fnmatch(t, pattern))


def find_pretrained(name: str) -> Pretrained:
    """The entry of a tag (``resnet50.tv_in1k``), or a model's default (``resnet50``: torchvision's
    default weights where it has them, else the first timm tag for it)."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in TIMM_TAGS:
        return _timm_entry(name)
    model, _, suffix = name.partition(".")
    tv = {e.tag: e for e in _torchvision_tags(model)}
    if suffix:
        if name in tv:
            return tv[name]
    else:
        from torchvision.models import get_model_weights

        if tv:
            default = get_model_weights(model).DEFAULT.name  # type: ignore[attr-defined]
            return tv[f"{model}.{_TV_TAGS.get(default, 'tv_in1k')}"]
        for tag, target in TIMM_TAGS.items():
            if target == model:
                return _timm_entry(tag)
    close = list_pretrained(f"{model}*")
    hint = f"; known for {model}: {', '.join(close)}" if close else "; see cnnkit.list_pretrained()"
    raise CnnkitError(f"no pretrained weights {name!r}{hint}")


def offline() -> bool:
    return any(
        os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("CNNKIT_OFFLINE", "HF_HUB_OFFLINE")
    )


def fetch(entry: Pretrained) -> Path:
    """The entry's file: from the cache, else downloaded there (atomically) and checked."""
    target = entry.cache_path
    if target.is_file():
        return target
    where = f"{entry.url}, into {target}"
    if offline():
        raise CnnkitError(
            f"{entry.tag} is not in the cache and downloads are off (offline mode): fetch {where}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        expected = entry.sha256 or _server_sha256(entry.url)
        torch.hub.download_url_to_file(entry.url, str(target), hash_prefix=expected, progress=False)
    except RuntimeError as exc:  # torch.hub's checksum mismatch: the partial file is already removed
        target.unlink(missing_ok=True)
        raise CnnkitError(
            f"{entry.tag}: the download from {entry.url} is corrupt ({exc}); nothing was kept"
        ) from None
    except OSError as exc:  # no network, a refused connection, HTTP errors (URLError, HTTPError)
        raise CnnkitError(
            f"could not download {entry.tag} ({exc}). Without a network, fetch {where} "
            "(or pass the file's path as weights=)"
        ) from None
    return target


def _server_sha256(url: str) -> str | None:
    """The SHA-256 the hub states for a file (``X-Linked-Etag``, or an ``ETag`` that is one)."""
    request = urllib.request.Request(url, method="HEAD")
    with urllib.request.urlopen(request, timeout=30) as response:
        headers = response.headers
    for key in ("X-Linked-Etag", "ETag"):
        value = (headers.get(key) or "").strip('"').removeprefix("W/").strip('"')
        if re.fullmatch(r"[0-9a-f]{64}", value):
            return value
    return None
