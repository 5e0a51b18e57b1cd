"""The public model API: create, load and save models."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from cnnkit.errors import CnnkitError
from cnnkit.hub import TRANSFORM_INPUT_MODELS, download_torchvision_weights
from cnnkit.models.base import ConvNet, FeatureExtractor
from cnnkit.registry import get_builder, list_models
from cnnkit.weights import LoadReport, load_weights, read_metadata, save_weights

__all__ = ["LoadReport", "create_model", "list_models", "load_model", "load_weights", "save_weights"]

PRETRAINED_SOURCES = ("torchvision",)


def create_model(
    name: str | None = None,
    *,
    num_classes: int | None = None,
    in_chans: int | None = None,
    weights: str | os.PathLike[str] | None = None,
    features_only: bool = False,
    out_indices: tuple[int, ...] | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build a registered model, optionally loading weights.

    Args:
        name: a registered name (``list_models()``); may be ``None`` when ``weights`` is a cnnkit file,
            whose metadata names the model and its build arguments.
        num_classes: classifier outputs (default: the weights file's, else 1000); 0 keeps pooled features.
        in_chans: input channels (default 3); pretrained first convolutions are adapted.
        weights: a path to a cnnkit ``.safetensors`` file or a torchvision/timm state dict of the same
            architecture, or ``"torchvision"`` to download torchvision's ImageNet weights. A classifier
            with another class count is left out and trained anew (transfer learning).
        features_only: return a :class:`FeatureExtractor` yielding each stage's feature map (no head).
        out_indices: the stages a features-only model returns (default all).
        **overrides: architecture arguments of the builder (``width``, ``drop_rate``, ``aux_logits``...).

    Returns:
        The model, in training mode, with ``model.cnnkit_config`` recording how it was built.
    """
    meta: dict[str, Any] = {}
    path: Path | None = None
    if weights is not None and str(weights) not in PRETRAINED_SOURCES:
        path = Path(weights)
        meta = read_metadata(path)
    if name is None:
        name = meta.get("model")
        if name is None:
            raise CnnkitError("create_model needs a model name unless `weights` is a cnnkit weights file")
    args: dict[str, Any] = dict(meta.get("args", {})) if meta.get("model") == name else {}
    args.update(overrides)
    if num_classes is not None:
        args["num_classes"] = num_classes
    if in_chans is not None:
        args["in_chans"] = in_chans
    args.setdefault("num_classes", 1000)
    args.setdefault("in_chans", 3)
    if weights is not None and str(weights) == "torchvision":
        path = download_torchvision_weights(name)
        if name in TRANSFORM_INPUT_MODELS:
            args.setdefault("transform_input", True)
    builder = get_builder(name)
    try:
        model = builder(**args)
    except TypeError as exc:
        if "unexpected keyword" not in str(exc):
            raise
        raise CnnkitError(f"{name}: {exc}; see help(cnnkit.models) for the builder's arguments") from None
    model.cnnkit_config = {"name": name, "args": _jsonable(args)}  # type: ignore[assignment]
    if path is not None:
        load_weights(model, path)
    if features_only:
        if not isinstance(model, ConvNet):
            raise CnnkitError(f"{name} has no stages to extract features from")
        return FeatureExtractor(model, out_indices)
    return model


def load_model(path: str | os.PathLike[str], **overrides: Any) -> nn.Module:
    """Rebuild a model from a cnnkit weights file written by :func:`save_weights`."""
    return create_model(None, weights=path, **overrides)


def _jsonable(args: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in args.items():
        try:
            json.dumps(value)
        except TypeError:
            continue  # e.g. a norm-layer factory: rebuilt from the builder's own default
        out[key] = value
    return out
