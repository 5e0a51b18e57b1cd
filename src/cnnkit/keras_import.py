"""Keras Applications models as cnnkit models: MobileNetV2, ResNet50/101/152, VGG16/19, EfficientNetB0-B7.

Reads Keras 3 ``.keras`` files, Keras 2 / tf.keras ``.h5`` models and ``.weights.h5`` / ``.h5`` weights with
h5py alone (no TensorFlow or Keras needed), including a backbone nested in a user's model with one
``Dense`` classifier on the pooled features (the transfer-learning habit). The conventions that differ
are converted, so the cnnkit model computes what the Keras one did:

- kernels ``[kh, kw, in, out]`` (depthwise ``[kh, kw, in, 1]``) become ``[out, in, kh, kw]``; a Dense
  kernel ``[in, out]`` is transposed, and after VGG's ``Flatten`` (channels last) its rows are reordered;
- Keras' "same" padding at stride 2 puts the extra pixel bottom/right (``tf_padding``), BatchNorm
  epsilon is Keras' (``bn_eps``), ResNet50 is v1 (``stride_in_1x1``); a convolution bias before a
  BatchNorm (Keras' ResNets) is folded into the BatchNorm's running mean, exactly;
- the input preprocessing becomes the mean and std on [0, 1] RGB pixels the weights expect: the file's
  ``Rescaling``/``Normalization`` layers where it has them, else the family's ``preprocess_input``
  (Caffe's BGR order is folded into the first convolution).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cnnkit.arithmetic import make_divisible
from cnnkit.arithmetic.scaling import EFFICIENTNET_B0, EFFICIENTNET_SCALING, Scaling
from cnnkit.errors import WeightsError
from cnnkit.weights import StateDict

KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
CAFFE_MEAN_RGB = (123.68, 116.779, 103.939)  # Keras' "caffe" preprocess_input subtracts these (as BGR)
Arrays = list[np.ndarray]


def is_keras_file(path: str | os.PathLike[str]) -> bool:
    return Path(path).suffix.lower() in KERAS_SUFFIXES


@dataclass
class KerasModel:
    """A Keras file read and recognised: which zoo model it is, built how, fed how."""

    path: Path
    layers: dict[str, Arrays]  # each weighted layer's variables, in Keras' order (kernel, bias; gamma...)
    model: str  # the cnnkit model name
    args: dict[str, Any]  # its builder arguments (tf_padding, bn_eps, stride_in_1x1, width, num_classes)
    backbone: list[str]  # Keras layer names in the order of the cnnkit model's modules
    head: list[str]  # the Dense layers, in order
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    bgr: bool = False  # trained on BGR input (Caffe's preprocess_input): the first conv is flipped
    imgsz: int = 224
    flatten: int = 0  # the side of the grid the first Dense layer flattens (VGG's 7), 0: pooled features
    notes: list[str] = field(default_factory=list)

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        return {"source": f"keras:{self.path.name}", "imgsz": self.imgsz, "mean": list(self.mean),
                "std": list(self.std)}  # fmt: skip

    def state_dict(self, model: nn.Module) -> StateDict:
        """The file's weights under ``model``'s names (a model built with ``self.args``; its head may
        have another class count, which ``load_weights`` then leaves out)."""
        modules = [
            (n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.BatchNorm2d | nn.Linear)
        ]
        body = [(n, m) for n, m in modules if not n.startswith("head.")]
        head = [(n, m) for n, m in modules if n.startswith("head.")]
        if len(body) != len(self.backbone):
            raise WeightsError(
                f"{self.path}: its {len(self.backbone)} weighted backbone layers do not fit cnnkit's "
                f"{self.model} ({len(body)})"
            )
        out: StateDict = {}
        bias: torch.Tensor | None = None
        for i, ((name, module), layer) in enumerate(zip(body, self.backbone)):
            arrays = [torch.from_numpy(np.array(a, dtype=np.float32)) for a in self.layers[layer]]
            if isinstance(module, nn.BatchNorm2d):
                if len(arrays) != 4:
                    raise WeightsError(f"{self.path}: BatchNorm {layer} has {len(arrays)} variables, not 4")
                gamma, beta, mean, var = arrays
                if bias is not None:  # BN(conv + b) with mean m is BN(conv) with mean m - b
                    mean, bias = mean - bias, None
                out.update({f"{name}.weight": gamma, f"{name}.bias": beta, f"{name}.running_mean": mean,
                            f"{name}.running_var": var})  # fmt: skip
                continue
            if bias is not None:
                raise WeightsError(
                    f"{self.path}: {self.backbone[i - 1]} has a bias and no BatchNorm after it"
                )
            assert isinstance(module, nn.Conv2d)
            kernel = arrays[0]
            if kernel.ndim != 4:
                raise WeightsError(f"{self.path}: {layer} is not a convolution (kernel {list(kernel.shape)})")
            if module.groups > 1:  # depthwise [kh, kw, in, multiplier] -> [in * multiplier, 1, kh, kw]
                weight = kernel.permute(2, 3, 0, 1).reshape(-1, 1, *kernel.shape[:2])
            else:
                weight = kernel.permute(3, 2, 0, 1)
            if i == 0 and self.bgr:
                weight = weight.flip(1)
            out[f"{name}.weight"] = weight.contiguous()
            if len(arrays) > 1:
                if module.bias is not None:
                    out[f"{name}.bias"] = arrays[1]
                else:
                    bias = arrays[1]
        if bias is not None:
            raise WeightsError(f"{self.path}: {self.backbone[-1]} has a bias and no BatchNorm after it")
        for (name, _), layer in zip(head, self.head):
            kernel, *rest = (torch.from_numpy(np.array(a, dtype=np.float32)) for a in self.layers[layer])
            weight = kernel.t()
            if layer == self.head[0] and self.flatten > 1:  # Flatten of [h, w, c] (channels last)
                side = self.flatten
                weight = (
                    weight.reshape(len(weight), side, side, -1).permute(0, 3, 1, 2).reshape(len(weight), -1)
                )
            out[f"{name}.weight"] = weight.contiguous()
            if rest:
                out[f"{name}.bias"] = rest[0]
        return out


def read_keras(path: str | os.PathLike[str]) -> KerasModel:
    """Read a Keras file and recognise the zoo model it holds (raises :class:`WeightsError` otherwise)."""
    path = Path(path)
    layers, config = read_layers(path)
    for recognise in (_mobilenet_v2, _resnet, _vgg, _efficientnet):
        found = recognise(path, layers)
        if found is not None:
            break
    else:
        raise WeightsError(
            f"{path}: not a Keras Applications model cnnkit maps (MobileNetV2, ResNet50/101/152, VGG16/19, "
            f"EfficientNetB0-B7); its weighted layers begin {list(layers)[:6]}"
        )
    found.head, found.flatten = _head(found)
    found.args["num_classes"] = int(found.layers[found.head[-1]][0].shape[1]) if found.head else 0
    _input_transform(found, config)
    if config is not None:
        eps = next(
            (c["epsilon"] for c in _layer_configs(config, "BatchNormalization") if "epsilon" in c), None
        )
        if eps is not None and "bn_eps" in found.args:
            found.args["bn_eps"] = float(eps)
        size = next((_input_side(c) for c in _layer_configs(config, "InputLayer")), None)
        found.imgsz = size or found.imgsz
    return found


def read_layers(path: Path) -> tuple[dict[str, Arrays], dict[str, Any] | None]:
    """Every weighted layer's variables by layer name (nested models flattened), and the model's config
    when the file has one."""
    try:
        import h5py
    except ImportError:
        raise WeightsError(f"{path}: reading Keras files needs h5py: pip install 'cnnkit[keras]'") from None
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    config = None
    try:
        if zipfile.is_zipfile(path):  # Keras 3: config.json + model.weights.h5 in a zip
            with zipfile.ZipFile(path) as z:
                if "model.weights.h5" not in z.namelist():
                    raise WeightsError(f"{path}: a zip without model.weights.h5 is not a Keras model file")
                if "config.json" in z.namelist():
                    config = json.loads(z.read("config.json"))
                data = z.read("model.weights.h5")
            with h5py.File(io.BytesIO(data), "r") as f:
                layers = _read_h5(f)
        else:
            with h5py.File(path, "r") as f:
                raw = f.attrs.get("model_config")
                if raw is not None:
                    config = json.loads(_text(raw))
                layers = _read_h5(f)
    except WeightsError:
        raise
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:  # h5py raises OSError on non-HDF5
        raise WeightsError(f"{path}: not a readable Keras file ({exc})") from None
    if not layers:
        raise WeightsError(f"{path}: no Keras layer weights in it")
    return layers, config


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _read_h5(f: Any) -> dict[str, Arrays]:
    out: dict[str, Arrays] = {}
    if "layers" in f:  # Keras 3: layers/<key>/vars/<i>, the layer's name in the vars' attributes
        _read_keras3(f, out)
        return out
    root = f.get("model_weights", f)  # Keras 2: a full model, or weights alone
    for group_name in root.attrs.get("layer_names", []):
        group = root[_text(group_name)]
        weights = [_text(w) for w in group.attrs.get("weight_names", [])]
        owners = {w.rsplit("/", 1)[0].split("/")[-1] for w in weights}
        for w in weights:  # a nested model's group holds its layers' weights as "<layer>/<var>"
            layer = _text(group_name) if len(owners) == 1 else w.rsplit("/", 1)[0].split("/")[-1]
            out.setdefault(layer, []).append(np.asarray(group[w]))
    return out


def _read_keras3(group: Any, out: dict[str, Arrays]) -> None:
    for key, layer in group["layers"].items():
        variables = layer.get("vars")
        if variables is not None and len(variables):
            name = _text(variables.attrs.get("name", key))
            out[name] = [np.asarray(variables[str(i)]) for i in range(len(variables))]
        if "layers" in layer:
            _read_keras3(layer, out)


# ------------------------------------------------------------------ the families, in cnnkit's module order
def _mobilenet_v2(path: Path, layers: dict[str, Arrays]) -> KerasModel | None:
    if "Conv1" not in layers or "block_16_project" not in layers:
        return None
    width = layers["block_16_project"][0].shape[-1] / 320  # Keras' alpha
    names = ["Conv1", "bn_Conv1"]
    names += [f"expanded_conv_{p}{bn}" for p in ("depthwise", "project") for bn in ("", "_BN")]
    names += [
        f"block_{i}_{p}{bn}"
        for i in range(1, 17)
        for p in ("expand", "depthwise", "project")
        for bn in ("", "_BN")
    ]
    names += ["Conv_1", "Conv_1_bn"]
    args: dict[str, Any] = {"tf_padding": True, "bn_eps": 1e-3} | ({"width": width} if width != 1 else {})
    return KerasModel(path, layers, "mobilenet_v2", args, names, [], mean=(0.5,) * 3, std=(0.5,) * 3)


def _resnet(path: Path, layers: dict[str, Arrays]) -> KerasModel | None:
    if "conv1_conv" not in layers or "conv2_block1_1_conv" not in layers:
        return None
    if "post_bn" in layers:
        raise WeightsError(f"{path}: a Keras ResNetV2 (pre-activation); cnnkit's ResNets are v1 and v1.5")
    repeats = tuple(
        sum(bool(re.fullmatch(rf"conv{s}_block\d+_1_conv", n)) for n in layers) for s in range(2, 6)
    )
    known: dict[tuple[int, ...], str] = {
        (3, 4, 6, 3): "resnet50",
        (3, 4, 23, 3): "resnet101",
        (3, 8, 36, 3): "resnet152",
    }
    model = known.get(repeats)
    if model is None:
        raise WeightsError(f"{path}: a Keras ResNet with {repeats} blocks per stage, not ResNet50/101/152")
    names = ["conv1_conv", "conv1_bn"]
    for s, n in zip(range(2, 6), repeats):
        for b in range(1, n + 1):
            parts = ("1", "2", "3", "0") if b == 1 else ("1", "2", "3")  # the shortcut comes last in cnnkit
            names += [f"conv{s}_block{b}_{k}_{kind}" for k in parts for kind in ("conv", "bn")]
    args = {"stride_in_1x1": True, "bn_eps": 1.001e-5}
    return KerasModel(path, layers, model, args, names, [], **_CAFFE)


def _vgg(path: Path, layers: dict[str, Arrays]) -> KerasModel | None:
    if "block1_conv1" not in layers or "block5_conv1" not in layers:
        return None
    depths = tuple(sum(bool(re.fullmatch(rf"block{i}_conv\d+", n)) for n in layers) for i in range(1, 6))
    known: dict[tuple[int, ...], str] = {(2, 2, 3, 3, 3): "vgg16", (2, 2, 4, 4, 4): "vgg19"}
    model = known.get(depths)
    if model is None:
        raise WeightsError(f"{path}: a Keras VGG with {depths} convolutions per block, not VGG16/19")
    names = [f"block{i}_conv{j}" for i, d in enumerate(depths, 1) for j in range(1, d + 1)]
    return KerasModel(path, layers, model, {}, names, [], **_CAFFE)


def _efficientnet(path: Path, layers: dict[str, Arrays]) -> KerasModel | None:
    if "stem_conv" not in layers or "top_conv" not in layers:
        return None
    blocks = sum(bool(re.fullmatch(r"block\d+[a-z]_project_conv", n)) for n in layers)
    top = layers["top_conv"][0].shape[-1]
    model = next(
        (m for m, sc in EFFICIENTNET_SCALING.items() if _efficientnet_shape(sc) == (blocks, top)), None
    )
    if model is None:
        raise WeightsError(f"{path}: a Keras EfficientNet with {blocks} blocks and {top} head channels is "
                           "not B0-B7 (EfficientNetV2 is built otherwise)")  # fmt: skip
    scaling = EFFICIENTNET_SCALING[model]
    repeats = [math.ceil(row.repeats * scaling.depth) for row in EFFICIENTNET_B0]
    names = ["stem_conv", "stem_bn"]
    for r, n in enumerate(repeats, 1):
        for j in range(n):
            p = f"block{r}{chr(ord('a') + j)}_"
            if f"{p}expand_conv" in layers:
                names += [f"{p}expand_conv", f"{p}expand_bn"]
            names += [
                f"{p}{k}" for k in ("dwconv", "bn", "se_reduce", "se_expand", "project_conv", "project_bn")
            ]
    names += ["top_conv", "top_bn"]
    args = {"tf_padding": True, "bn_eps": 1e-3}
    return KerasModel(path, layers, model, args, names, [], imgsz=scaling.resolution)


def _efficientnet_shape(scaling: Scaling) -> tuple[int, int]:
    """Blocks and head channels of a variant: what tells B0-B7 apart in a file."""
    blocks = sum(math.ceil(row.repeats * scaling.depth) for row in EFFICIENTNET_B0)
    return blocks, 4 * make_divisible(EFFICIENTNET_B0[-1].channels * scaling.width)


_CAFFE: dict[str, Any] = {"bgr": True, "mean": tuple(m / 255 for m in CAFFE_MEAN_RGB), "std": (1 / 255,) * 3}


# ------------------------------------------------------------------------------ the head and the input
def _head(found: KerasModel) -> tuple[list[str], int]:
    """The Dense layers on the backbone's features, in order (none: ``include_top=False``), and the
    side of the grid the first one flattens (VGG's 7x7, else 0 for pooled features)."""
    missing = [n for n in found.backbone if n not in found.layers]
    if missing:
        raise WeightsError(f"{found.path}: a Keras {found.model} without the layers {missing[:4]}")
    last = found.layers[found.backbone[-1]][0]
    channels = int(last.shape[0] if last.ndim == 1 else last.shape[-1])
    vgg = found.model.startswith("vgg")
    takes = {channels: 0} | ({channels * 49: 7} if vgg else {})
    dense = {
        n: a[0].shape for n, a in found.layers.items() if n not in set(found.backbone) and a[0].ndim == 2
    }

    def longest(chain: list[str]) -> list[str]:  # each Dense feeding the next; a head has a few at most
        after = [n for n, shape in dense.items() if n not in chain and shape[0] == dense[chain[-1]][1]]
        return max((longest([*chain, n]) for n in after), key=len, default=chain)

    starts = [n for n, shape in dense.items() if shape[0] in takes]
    chain = max((longest([n]) for n in starts), key=len, default=[])
    unused = [n for n in dense if n not in chain]
    grid = " or VGG's 7x7 grid (a 224 px input)" if vgg else ""
    if unused:
        raise WeightsError(
            f"{found.path}: Dense layers {unused} do not form a classifier on the {channels} pooled "
            f"features{grid} of the {found.model}; cnnkit maps that head only"
        )
    wanted = "fc1, fc2 and a classifier" if vgg else "one linear classifier"
    if chain and (len(chain) != (3 if vgg else 1) or (vgg and dense[chain[0]][0] == channels)):
        raise WeightsError(
            f"{found.path}: a head of Dense layers {chain}; cnnkit's {found.model} has {wanted}"
        )
    if vgg and not chain:
        found.notes.append("no fc1/fc2 in the file (include_top=False): VGG's 4096-wide layers start fresh")
    return chain, takes[dense[chain[0]][0]] if chain else 0


def _layer_configs(config: dict[str, Any], *classes: str) -> Iterator[dict[str, Any]]:
    """The configs of the layers of these classes, nested models included, in the order listed."""
    inner = config.get("config")
    for layer in inner.get("layers", []) if isinstance(inner, dict) else []:
        if layer.get("class_name") in classes:
            yield {"name": layer.get("name"), **layer.get("config", {})}
        yield from _layer_configs(layer, *classes)


def _input_side(config: dict[str, Any]) -> int | None:
    shape = config.get("batch_shape") or config.get("batch_input_shape")
    return int(shape[1]) if shape and len(shape) == 4 and shape[1] else None


def _input_transform(found: KerasModel, config: dict[str, Any] | None) -> None:
    """Set the mean and std on [0, 1] pixels from the file's Rescaling/Normalization layers (Keras feeds
    0-255 pixels), keeping the family's ``preprocess_input`` when it has none."""
    steps = list(_layer_configs(config, "Rescaling", "Normalization")) if config is not None else []
    if not steps and found.model.startswith("efficientnet"):  # weights alone: EfficientNet's own layers
        norm = next((n for n, a in found.layers.items() if len(a) == 3 and a[2].ndim == 0), None)
        steps = [{"scale": 1 / 255}] + ([{"name": norm}] if norm else [])
        if norm and np.allclose(np.sqrt(found.layers[norm][1]), IMAGENET_STD_RGB, atol=1e-4):
            steps.append({"scale": [1 / math.sqrt(s) for s in IMAGENET_STD_RGB]})  # Keras' ImageNet fix-up
            found.notes.append("no model config: assumed EfficientNet's ImageNet input scaling")
    if not steps:
        return
    scale, shift = np.full(3, 255.0), np.zeros(3)  # the layer input is scale * x + shift, x in [0, 1]
    for step in steps:
        if "scale" in step:
            s, o = np.asarray(step["scale"], float), np.asarray(step.get("offset", 0.0), float)
            scale, shift = scale * s, shift * s + o
        else:
            mean, var = (np.asarray(a, float).reshape(-1) for a in found.layers[step["name"]][:2])
            sd = np.maximum(np.sqrt(var), 1e-7)
            scale, shift = scale / sd, (shift - mean) / sd
    found.mean, found.std = tuple(float(v) for v in -shift / scale), tuple(float(v) for v in 1 / scale)
    found.bgr = False


IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
