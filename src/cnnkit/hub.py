"""Fetching torchvision's ImageNet weights for the architectures cnnkit shares with it."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from cnnkit.errors import CnnkitError

# Google-ported weights expect inputs scaled to [-1, 1]; torchvision turns on ``transform_input``.
TRANSFORM_INPUT_MODELS = {"googlenet", "inception_v3"}


def torchvision_weights_url(name: str) -> str:
    """The URL of torchvision's default ImageNet weights for ``name``."""
    from torchvision.models import get_model_weights

    try:
        weights_enum = get_model_weights(name)
    except (ValueError, KeyError):
        raise CnnkitError(f"torchvision has no pretrained weights for {name!r}") from None
    return str(weights_enum.DEFAULT.url)  # type: ignore[attr-defined]


def download_torchvision_weights(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Download (or find in the torch hub cache) torchvision's ImageNet weights for ``name``.

    Raises :class:`CnnkitError` with the URL when there is no network, so the file can be fetched
    elsewhere and passed as a path.
    """
    url = torchvision_weights_url(name)
    directory = Path(cache_dir) if cache_dir else Path(torch.hub.get_dir()) / "checkpoints"
    target = directory / os.path.basename(url)
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(target), progress=True)
    except OSError as exc:  # URLError is an OSError
        raise CnnkitError(
            f"could not download torchvision weights for {name!r} from {url} ({exc}). Without internet, "
            f"download the file elsewhere and pass its path: create_model({name!r}, weights='PATH')"
        ) from exc
    return target
