"""Reading, writing and mapping weights: cnnkit safetensors files and torchvision/timm checkpoints.

Nothing here unpickles code: ``.safetensors`` files are plain tensors, and ``.pt``/``.pth`` files are
read with ``torch.load(..., weights_only=True)``.

A foreign checkpoint of the same architecture is mapped onto cnnkit's modules by the family's explicit
key map (``ConvNet.reference_names``: torchvision's module names -> cnnkit's, like timm's checkpoint
filters). A naming no map covers (timm's for some families) falls back to position: both
``state_dict`` s list their tensors in module-registration order, which cnnkit's families keep equal to
torchvision's, so the i-th tensor of one is the i-th of the other. Every pair is checked by shape.
Auxiliary-classifier tensors (names containing ``aux``) are paired among themselves, so where the
side heads are registered does not matter, and they are used only when both sides have them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnkit.errors import WeightsError
from cnnkit.io import atomic_path
from cnnkit.layers import set_bn_eps

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
FORMAT_VERSION = "1"
_AUX = re.compile(r"aux", re.IGNORECASE)
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "weights")


@dataclass
class LoadReport:
    """What ``load_weights`` did: tensors loaded, heads left freshly initialised, conversions."""

    loaded: int = 0
    skipped_head: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    conventions: list[str] = field(default_factory=list)  # the model set to the file's (BatchNorm eps)
    mapped: bool = False  # names translated by the family's key map (torchvision's -> cnnkit's)
    by_position: bool = False

    def messages(self) -> list[str]:
        how = " (names mapped from torchvision's)" if self.mapped else ""
        out = [f"loaded {self.loaded} tensors" + (" (matched by position)" if self.by_position else how)]
        if self.skipped_head:
            out.append(
                "classifier weights with another class count were left out and the new head is freshly "
                f"initialised: {', '.join(self.skipped_head)}"
            )
        if self.adapted:
            out.append(f"adapted to the model's input channels: {', '.join(self.adapted)}")
        if self.conventions:
            out.append(f"set to the file's conventions: {', '.join(self.conventions)}")
        if self.unused:
            out.append(f"unused tensors in the file: {', '.join(self.unused)}")
        if self.missing:
            out.append(f"model tensors not in the file (kept as initialised): {', '.join(self.missing)}")
        return out


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The cnnkit metadata of a ``.safetensors`` weights file, or of an ``.onnx`` file cnnkit exported
    (the same keys, in the graph's metadata properties); JSON values decoded; ``{}`` if none."""
    path = Path(path)
    if path.suffix == ".onnx":
        raw = _onnx_properties(path)
    elif path.suffix != ".safetensors":
        return {}
    else:
        raw = raw_metadata(path)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key.startswith("cnnkit."):
            try:
                out[key.removeprefix("cnnkit.")] = json.loads(value)
            except json.JSONDecodeError:
                raise WeightsError(f"{path}: metadata {key!r} is not JSON: {value[:80]!r}") from None
    if not isinstance(out.get("args", {}), dict):
        raise WeightsError(f"{path}: metadata 'cnnkit.args' must be a JSON object, got {out['args']!r}")
    return out


def task_of(meta: dict[str, Any]) -> str:
    """The task weights with this metadata were trained for: a plain saved model (no task) classifies."""
    return str(meta.get("task") or "classify")


def raw_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """A ``.safetensors`` file's metadata as stored (strings)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from exc


def _onnx_properties(path: Path) -> dict[str, str]:
    try:
        import onnx
    except ImportError:
        raise WeightsError(f"{path}: reading ONNX files needs onnx: pip install 'cnnkit[export]'") from None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for files that are not ONNX
        raise WeightsError(f"{path}: not a readable ONNX file ({exc})") from exc
    return {p.key: p.value for p in model.metadata_props}


def max_side(imgsz: Any) -> int | None:
    """The long side of an input size a run recorded (``S``, or ``[H, W]`` for segmentation keeping the
    aspect ratio); None when there is none."""
    if isinstance(imgsz, list | tuple):
        return max(int(v) for v in imgsz) if imgsz else None
    return None if imgsz is None else int(imgsz)


def tensor_count(path: str | os.PathLike[str]) -> int:
    """The number of values the tensors of a ``.safetensors`` file hold, from its header alone."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
    except Exception as exc:
        raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from exc


def read_state_dict(path: str | os.PathLike[str]) -> StateDict:
    """Tensors of a weights file (``.safetensors``, ``.pt``, ``.pth``, ``.bin``), unwrapped.

    Training checkpoints that nest the weights (``{"state_dict": ...}``, ``{"model": ...}``) and
    DistributedDataParallel's ``module.`` prefix are unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(
            f"{path}: cannot be read as a plain state dict ({type(exc).__name__}: {str(exc)[:200]}). "
            "cnnkit never unpickles code; re-save the weights with `torch.save(model.state_dict(), path)`."
        ) from exc
    while isinstance(obj, Mapping) and not _is_state_dict(obj):
        inner = next((obj[k] for k in _CONTAINER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            raise WeightsError(f"{path}: no state dict found (top-level keys: {list(obj)[:10]})")
        obj = inner
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected a state dict, found {type(obj).__name__}")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return sd


def _is_state_dict(obj: Mapping[str, Any]) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def save_weights(
    model: nn.Module, path: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write the model's weights to a safetensors file, atomically.

    The metadata holds the model name and build arguments (when the model came from ``create_model``)
    plus ``metadata`` (JSON-serialisable values, e.g. class names), so ``load_model(path)`` can rebuild it.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    meta: dict[str, str] = {"cnnkit.format": json.dumps(FORMAT_VERSION)}
    config = getattr(model, "cnnkit_config", None)
    if config is not None:
        meta["cnnkit.model"] = json.dumps(config["name"])
        meta["cnnkit.args"] = json.dumps(config["args"])
    for key, value in (metadata or {}).items():
        meta[f"cnnkit.{key}"] = json.dumps(value)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load_weights(
    model: nn.Module,
    source: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    reference: str | None = None,
    label: str | None = None,
) -> LoadReport:
    """Load a cnnkit, torchvision or timm state dict of the same architecture into ``model``.

    ``reference``: the torchvision/timm model name the file was saved from, when it is not the cnnkit
    model's (timm's ``mobilenetv3_large_100``): a ``.safetensors`` file of foreign names gets its
    tensors' order from it. ``label``: what messages call ``source`` (the file a state dict came from).

    A classifier with another class count is left out and stays freshly initialised; a first
    convolution with another number of input channels is adapted (summed for 1 channel, repeated and
    rescaled otherwise). With ``strict`` any other mismatch raises :class:`WeightsError` naming the
    keys and shapes.
    """
    name = label or (str(source) if not isinstance(source, Mapping) else "state dict")
    src = dict(source) if isinstance(source, Mapping) else read_state_dict(source)
    target = model.state_dict()
    foreign = not set(_split(list(target))[0]) <= set(src)  # the file does not use cnnkit's names
    report = LoadReport()
    if foreign:
        renamed = _by_family_map(model, src)
        if renamed is not None:
            src, report.mapped = renamed, True
        elif not isinstance(source, Mapping) and Path(source).suffix == ".safetensors":
            src = _registration_order(src, reference or getattr(model, "cnnkit_config", {}).get("name"), name)
    if foreign and "conv_stem.weight" in src:  # timm's EfficientNet/MobileNet family naming
        _use_bn_eps(model, TIMM_BN_EPS, report)
    head = tuple(getattr(model, "classifier_modules", ())) or _last_linear(model)
    pairs = _pair_keys(target, src, report, name, head)
    new_sd: StateDict = {}
    mismatched = []
    first_conv = next((k for k, v in target.items() if v.ndim == 4), None)
    for tkey, skey in pairs:
        t, s = target[tkey], src[skey]
        if t.shape == s.shape:
            new_sd[tkey] = s.to(t.dtype)
        elif s.numel() == t.numel() and _one_by_one(s, t):  # a 1x1 convolution is a linear layer
            new_sd[tkey] = s.reshape(t.shape).to(t.dtype)
        elif any(tkey.startswith(h + ".") for h in head):
            report.skipped_head.append(f"{tkey} {list(s.shape)} -> {list(t.shape)}")
        elif tkey == first_conv and t.ndim == 4 and t.shape[0] == s.shape[0] and t.shape[2:] == s.shape[2:]:
            new_sd[tkey] = adapt_input_conv(s, t.shape[1]).to(t.dtype)
            report.adapted.append(f"{tkey} {s.shape[1]} -> {t.shape[1]} channels")
        else:
            mismatched.append(f"model {tkey} {list(t.shape)} vs file {skey} {list(s.shape)}")
    if mismatched and strict:
        raise WeightsError(
            f"{name} does not fit this model; {len(mismatched)} shape mismatches:\n  "
            + "\n  ".join(mismatched[:20])
        )
    model.load_state_dict(new_sd, strict=False)
    report.loaded = len(new_sd)
    messages = report.messages()
    log.debug("%s: %s", name, messages[0])
    for message in messages[1:]:
        log.info("%s: %s", name, message)
    return report


def _last_linear(model: nn.Module) -> tuple[str, ...]:
    """The classifier of a model that does not name it (one registered by the user): its last Linear."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return tuple(names[-1:])


TIMM_BN_EPS = 1e-5  # timm builds its EfficientNet/MobileNet family with PyTorch's default epsilon


def _use_bn_eps(model: nn.Module, eps: float, report: LoadReport) -> None:
    """Give every BatchNorm the epsilon the weights were trained with, when the model's builder records it
    (``bn_eps``, so a saved copy rebuilds the same); a model that does not take it is left as it is."""
    import inspect

    config = getattr(model, "cnnkit_config", None)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or all(m.eps == eps for m in norms):
        return
    if "bn_eps" not in inspect.signature(type(model).__init__).parameters:
        return
    set_bn_eps(model, eps)
    if isinstance(config, dict):
        config.setdefault("args", {})["bn_eps"] = eps
    report.conventions.append(f"BatchNorm epsilon {eps:g} (timm's)")


def _one_by_one(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``[O, I, 1, 1]`` and ``[O, I]``, either way round: the same map (timm's MobileNetV3 ``conv_head``
    is torchvision's and cnnkit's first head ``Linear``)."""
    conv, linear = (a, b) if a.ndim == 4 else (b, a)
    return conv.ndim == 4 and linear.ndim == 2 and conv.shape[2:] == (1, 1) and conv.shape[:2] == linear.shape


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Adapt a first-conv kernel ``[O, 3, k, k]`` to ``in_chans`` inputs, keeping the response scale."""
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = -(-in_chans // weight.shape[1])
    return weight.repeat(1, reps, 1, 1)[:, :in_chans] * (weight.shape[1] / in_chans)


def _split(keys: list[str]) -> tuple[list[str], list[str]]:
    keys = [k for k in keys if not k.endswith("num_batches_tracked")]
    return [k for k in keys if not _AUX.search(k)], [k for k in keys if _AUX.search(k)]


def _pair_keys(
    target: StateDict, src: StateDict, report: LoadReport, name: str, head: tuple[str, ...] = ()
) -> list[tuple[str, str]]:
    """Pair model keys with file keys: by name when the names agree, else by position."""
    t_main, t_aux = _split(list(target))
    s_main, s_aux = _split(list(src))
    if head and not any(k.startswith(h + ".") for k in t_main for h in head):
        # The model has no classifier (num_classes=0, a task head's backbone): leave the file's out.
        named = [k for k in s_main if any(k.startswith(h + ".") for h in head)]
        if named:
            report.unused += named
            s_main = [k for k in s_main if k not in named]
        elif len(s_main) == len(t_main) + 2:
            w, b = src[s_main[-2]], src[s_main[-1]]
            if (
                w.ndim == 2 and b.ndim == 1 and w.shape[0] == b.shape[0]
            ):  # a foreign classifier, registered last
                report.unused += s_main[-2:]
                s_main = s_main[:-2]
    by_name = set(t_main) == set(s_main)
    if by_name:
        pairs = [(k, k) for k in t_main]
    elif len(t_main) == len(s_main):
        pairs = list(zip(t_main, s_main))
        report.by_position = True
    else:
        only_t = [k for k in t_main if k not in src]
        only_s = [k for k in s_main if k not in target]
        raise WeightsError(
            f"{name} does not fit this model: the model has {len(t_main)} weight tensors, the file "
            f"{len(s_main)}. Missing from the file: {only_t[:8]}; unexpected in the file: {only_s[:8]}"
        )
    if not (t_aux and s_aux):  # side heads only on one side: nothing to pair
        report.unused += s_aux
        report.missing = t_aux
    elif by_name and set(t_aux) == set(s_aux):
        pairs += [(k, k) for k in t_aux]
    elif len(t_aux) == len(s_aux):
        pairs += list(zip(t_aux, s_aux))
    else:
        raise WeightsError(
            f"{name}: the auxiliary classifiers differ ({len(t_aux)} tensors in the model, {len(s_aux)} "
            "in the file)"
        )
    return pairs


def _by_family_map(model: nn.Module, src: StateDict) -> StateDict | None:
    """``src`` renamed by the model family's explicit key map (``reference_names``), or None when the
    family has none or it does not name every tensor of the file and of the model (another naming,
    such as timm's for some families: then tensors are paired by position, checked by shape)."""
    reference_names = getattr(model, "reference_names", None)
    names = reference_names() if callable(reference_names) else {}
    if not names:
        return None
    from cnnkit.models.base import rename_key

    renamed: StateDict = {}
    for key, value in src.items():
        new = rename_key(names, key)
        if new is None:
            return None
        renamed[new] = value
    head = tuple(getattr(model, "classifier_modules", ())) or _last_linear(model)

    def body(keys: Iterable[str]) -> set[str]:  # the tensors outside classifiers and side heads
        return {k for k in _split(list(keys))[0] if not any(k.startswith(h + ".") for h in head)}

    return renamed if body(renamed) == body(model.state_dict()) else None


def _registration_order(src: StateDict, model_name: str | None, name: str) -> StateDict:
    """Put a foreign safetensors state dict back in module-registration order.

    safetensors files store tensors sorted by name, which loses the order positional mapping needs; the
    order is recovered from the reference implementation with the same keys (torchvision's model of the
    same name, or timm's when timm is installed).
    """
    for order in _reference_orders(model_name):
        if set(order) == set(src):
            return {k: src[k] for k in order}
    import importlib.util

    timm = "" if importlib.util.find_spec("timm") else " (timm not installed: pip install 'cnnkit[timm]')"
    raise WeightsError(
        f"{name}: its tensor names are not cnnkit's, and no torchvision/timm model {model_name!r}{timm} "
        "has exactly these names to recover their order from. Save the state dict with torch.save (.pth), "
        "which keeps the order, or rename the keys to cnnkit's."
    )


def _reference_orders(model_name: str | None) -> list[list[str]]:
    import warnings

    if model_name is None:
        return []
    orders = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import torchvision

            extra = (
                {"aux_logits": True, "init_weights": False}
                if model_name in ("googlenet", "inception_v3")
                else {}
            )
            orders.append(list(torchvision.models.get_model(model_name, weights=None, **extra).state_dict()))
        except (ValueError, KeyError, TypeError):
            pass
        try:
            import timm  # type: ignore[import-not-found]

            orders.append(list(timm.create_model(model_name, pretrained=False).state_dict()))
        except (ImportError, RuntimeError, ValueError):
            pass
    return orders
