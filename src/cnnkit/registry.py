"""The model registry: named builders, looked up by exact name or glob pattern, and ``create_model``,
which builds one (and loads its weights). Model families that build backbones use it from here."""

from __future__ import annotations

import difflib
import fnmatch
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from cnnkit.errors import CnnkitError
from cnnkit.hub import Pretrained, fetch, find_pretrained
from cnnkit.keras_import import is_keras_file, read_keras
from cnnkit.weights import load_weights, read_metadata, save_weights, tensor_count

ModelBuilder = Callable[..., nn.Module]
F = TypeVar("F", bound=ModelBuilder)

_MODELS: dict[str, ModelBuilder] = {}
log = logging.getLogger(__name__)


def register_model(name: str) -> Callable[[F], F]:
    """Decorator that registers a builder under ``name``; a name can be registered only once."""

    def decorator(builder: F) -> F:
        if name in _MODELS:
            raise CnnkitError(f"model name {name!r} is already registered (by {_MODELS[name].__module__})")
        _MODELS[name] = builder
        return builder

    return decorator


def _ensure_zoo_loaded() -> None:
    # Importing the package registers every family; kept lazy so `registry` has no import cycle.
    import cnnkit.models  # noqa: F401


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted names of the registered models, optionally filtered by a glob such as ``"efficientnet*"``."""
    _ensure_zoo_loaded()
    names = sorted(_MODELS)
    if pattern is not None:
        names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    return names


def get_builder(name: str) -> ModelBuilder:
    """The builder registered as ``name``; an unknown name errors with the closest names."""
    _ensure_zoo_loaded()
    if name.startswith(("timm/", "unet_timm/")):  # any timm model, as a backbone or a U-Net encoder
        from cnnkit.models.timm_backbone import timm_builder

        return timm_builder(name)  # type: ignore[no-any-return]
    try:
        return _MODELS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_MODELS), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `cnnkit.list_models()`"
        raise CnnkitError(f"unknown model {name!r}{hint}") from None


def build(name: str, **kwargs: Any) -> nn.Module:
    """Call the builder registered as ``name``."""
    return get_builder(name)(**kwargs)


def create_model(
    name: str | None = None,
    *,
    pretrained: bool | str = False,
    num_classes: int | None = None,
    in_chans: int | None = None,
    weights: str | os.PathLike[str] | None = None,
    features_only: bool = False,
    out_indices: tuple[int, ...] | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build a registered model, optionally loading weights.

    Args:
        name: a registered name (``list_models()``), or a pretrained tag (``"resnet50.tv2_in1k"``,
            ``list_pretrained()``), which builds its model and, with ``pretrained=True``, loads those
            weights (as timm does); may be ``None`` when ``weights`` is a cnnkit file, whose metadata
            names the model and its build arguments.
        pretrained: ``True``: the tag's weights, or the model's default (torchvision's where it has
            them, else timm's); a tag: those (see :mod:`cnnkit.hub`: cached, checksummed, offline).
        num_classes: classifier outputs (default: the weights file's, else the builder's own default,
            1000 for the ImageNet classifiers); 0 keeps pooled features.
        in_chans: input channels (default 3); pretrained first convolutions are adapted.
        weights: a path to a cnnkit ``.safetensors`` file, a torchvision/timm state dict of the same
            architecture, a Keras Applications file (``.keras``/``.h5``, see :mod:`cnnkit.keras_import`;
            the model and its build arguments are recognised from it), a pretrained tag, or
            ``"torchvision"`` (torchvision's default). A classifier with another class count is left
            out and trained anew (transfer learning).
        features_only: return a :class:`FeatureExtractor` yielding each stage's feature map (no head).
        out_indices: the stages a features-only model returns (default all).
        **overrides: architecture arguments of the builder (``width``, ``drop_rate``, ``aux_logits``...).

    Returns:
        The model, in training mode, with ``model.cnnkit_config`` recording how it was built.
    """
    meta: dict[str, Any] = {}
    path: Path | None = None
    hidden: dict[str, Any] = {}  # build arguments not recorded (timm's weights: the file holds them)
    if name is not None and name.startswith("timm/") and (pretrained or _foreign(weights)):
        hidden = {"pretrained": True} | (
            {"checkpoint": str(weights)} if weights not in (None, "timm") else {}
        )
        pretrained, weights = False, None
    elif name is not None and "." in name and name not in list_models():  # a tag names its model (timm's)
        tagged = find_pretrained(name)
        name, pretrained = tagged.model, tagged.tag if pretrained is True else pretrained
    entry = _pretrained_entry(name, pretrained, weights)
    keras = None
    if entry is None and weights is not None:
        path = Path(weights)
        if is_keras_file(path):  # the model and its build arguments recognised from the Keras layers
            keras = read_keras(path)
            if name is not None and name != keras.model:
                raise CnnkitError(f"{path} holds a Keras {keras.model}, not a {name}")
            meta = {"model": keras.model, "args": keras.args}
        else:
            meta = read_metadata(path)
    if name is None:
        name = meta.get("model") or (entry.model if entry is not None else None)
        if name is None:
            raise CnnkitError("create_model needs a model name unless `weights` is a cnnkit weights file")
    args: dict[str, Any] = dict(meta.get("args", {})) if meta.get("model") == name else {}
    args.update(overrides)
    if num_classes is not None:
        args["num_classes"] = num_classes
    if in_chans is not None:
        args["in_chans"] = in_chans
    if entry is not None:
        path = fetch(entry)
        for key, value in entry.args.items():
            args.setdefault(key, value)
    builder = get_builder(name)
    from cnnkit.models.base import ConvNet, FeatureExtractor

    if path is not None and keras is None and meta.get("model") == name:
        _check_size(name, builder, args, path)
    try:
        model = builder(**args, **hidden)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, TypeError) and "unexpected keyword" not in str(exc):
            raise
        raise CnnkitError(f"{name}: {exc}; see help(cnnkit.models) for the builder's arguments") from None
    model.cnnkit_config = {"name": name, "args": _jsonable(args)}  # type: ignore[assignment]
    if keras is not None:
        load_weights(model, keras.state_dict(model), label=str(path))
        model.pretrained_cfg = keras.pretrained_cfg  # type: ignore[assignment]
        for note in keras.notes:
            log.info("%s: %s", path, note)
    elif path is not None:
        load_weights(model, path, reference=None if entry is None else entry.reference)
    if entry is not None:  # what the weights expect, as timm's pretrained_cfg
        model.pretrained_cfg = {  # type: ignore[assignment]
            "tag": entry.tag, "imgsz": entry.imgsz, "mean": list(entry.mean), "std": list(entry.std)
        }  # fmt: skip
    if features_only:
        if not isinstance(model, ConvNet):
            raise CnnkitError(f"{name} has no stages to extract features from")
        return FeatureExtractor(model, out_indices)
    return model


def _foreign(weights: str | os.PathLike[str] | None) -> bool:
    """Weights that are not a cnnkit file (for a timm backbone: ``"timm"``, or a timm checkpoint)."""
    if weights is None:
        return False
    path = Path(weights)
    return not (path.suffix == ".safetensors" and path.is_file() and "model" in read_metadata(path))


def _pretrained_entry(
    name: str | None, pretrained: bool | str, weights: str | os.PathLike[str] | None
) -> Pretrained | None:
    """The pretrained weights asked for: ``pretrained=True|TAG``, or ``weights`` that is a tag or
    ``"torchvision"`` rather than a file."""
    if pretrained:
        if weights is not None:
            raise CnnkitError("pass pretrained= or weights=, not both")
        if pretrained is True and name is None:
            raise CnnkitError("pretrained=True needs a model name")
        entry = find_pretrained(name if pretrained is True else str(pretrained))  # type: ignore[arg-type]
    elif weights is not None and not Path(weights).exists() and _is_tag(str(weights)):
        entry = find_pretrained(str(name) if str(weights) == "torchvision" else str(weights))
    else:
        return None
    if name is not None and name not in (entry.model, entry.tag):
        raise CnnkitError(f"{entry.tag} holds {entry.model} weights, not {name}'s")
    return entry


def _is_tag(text: str) -> bool:
    """``"torchvision"`` or ``model.pretrain`` (no folder, no weights-file suffix)."""
    if text == "torchvision":
        return True
    file_like = Path(text).suffix in (".pt", ".pth", ".safetensors", ".bin", ".onnx")
    return "." in text and "/" not in text and os.sep not in text and not file_like


def _check_size(name: str, builder: Any, args: dict[str, Any], path: Path) -> None:
    """Refuse build arguments (from a weights file's metadata) that would build a model much larger than
    the file's tensors, before anything is allocated: the model is built on the ``meta`` device (shapes
    only) and its size compared with the file's header. An edited ``width: 40`` is an error, not an
    exhausted memory."""
    try:
        with torch.device("meta"):
            shapes = builder(**args)
    except (TypeError, ValueError) as exc:
        raise CnnkitError(f"{path}: its metadata does not build {name} ({exc})") from None
    except Exception:  # a builder that needs real tensors: the weights' own shape check still applies
        return
    needed = sum(t.numel() for t in (*shapes.parameters(), *shapes.buffers()))
    held = tensor_count(path)
    if needed > 2 * held + 1_000_000:
        raise CnnkitError(
            f"{path}: its metadata builds a {name} of {needed:,} values but the file holds {held:,}: "
            "the metadata does not match the tensors (an edited or corrupt file)"
        )


def load_model(path: str | os.PathLike[str], **overrides: Any) -> nn.Module:
    """Rebuild a model from a cnnkit weights file written by :func:`save_weights`."""
    return create_model(None, weights=path, **overrides)


def expected_normalisation(weights: str | os.PathLike[str] | None) -> tuple[list[float], list[float]] | None:
    """The mean and std on [0, 1] RGB pixels that pretrained weights expect (a Keras file's
    preprocessing, a tag's, a cnnkit file's recorded ones); None when they do not say (ImageNet's)."""
    if weights is None:
        return None
    path = Path(weights)
    if path.is_file() and is_keras_file(path):
        keras = read_keras(path)
        return list(keras.mean), list(keras.std)
    if path.is_file():
        meta = read_metadata(path)
        return (list(meta["mean"]), list(meta["std"])) if "mean" in meta and "std" in meta else None
    if _is_tag(str(weights)) and str(weights) != "torchvision":
        entry = find_pretrained(str(weights))
        return list(entry.mean), list(entry.std)
    return None


def import_keras(
    path: str | os.PathLike[str],
    *,
    out: str | os.PathLike[str] | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
) -> nn.Module:
    """A Keras Applications model file (``.keras``, ``.h5``, ``.weights.h5``: MobileNetV2, ResNet50/101/152,
    VGG16/19, EfficientNetB0-B7, alone or as the backbone of a model with one Dense classifier) as the
    zoo model computing the same outputs; ``model.pretrained_cfg`` holds the input size and the mean/std
    on [0, 1] RGB pixels it expects. With ``out``, also written as cnnkit weights (with that size and
    normalisation) for ``cnnkit.load``, ``predict``, ``val``, ``export`` and fine-tuning; an existing
    file is never overwritten."""
    if out is not None and Path(out).with_suffix(".safetensors").exists():
        raise CnnkitError(f"{Path(out).with_suffix('.safetensors')} exists; choose another output")
    model = create_model(None, weights=path, num_classes=num_classes, in_chans=in_chans)
    if out is not None:
        cfg: dict[str, Any] = model.pretrained_cfg  # type: ignore[assignment]
        # Keras Applications take the whole image resized: no centre crop at prediction
        save_weights(
            model, out, {**{k: cfg[k] for k in ("imgsz", "mean", "std", "source")}, "crop_fraction": 1.0}
        )
    return model


def _jsonable(args: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in args.items():
        try:
            json.dumps(value)
        except TypeError:
            continue  # e.g. a norm-layer factory: rebuilt from the builder's own default
        out[key] = value
    return out
