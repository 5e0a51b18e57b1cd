"""The fast inference path: BatchNorm folded into the convolution before it, channels-last memory,
reduced-precision autocast (bf16 on CPUs with native bf16, fp16 on CUDA) and ``torch.inference_mode``.

:func:`fold_batchnorm` is exact up to rounding (``y = gamma * (conv(x) - mean) / sqrt(var + eps) + beta``
becomes one convolution with scaled weights and a bias); the reduced precision is what changes results,
which is why ``predict``/``val`` use it only for tasks where it keeps them (measured in the tests) and
take ``fast=False`` to turn it off.
"""

from __future__ import annotations

import copy
import itertools
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from cnnkit.engine.device import amp_dtype, autocast
from cnnkit.errors import CnnkitError
from cnnkit.layers.frozen_bn import FrozenBatchNorm2d


def _fuse(conv: nn.Conv2d, bn: nn.BatchNorm2d | FrozenBatchNorm2d) -> nn.Conv2d:
    fused = copy.deepcopy(conv)
    assert bn.running_mean is not None and bn.running_var is not None
    w, b = fuse_conv_bn_weights(
        conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
    )
    fused.weight, fused.bias = w, b
    return fused


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """A copy of ``model`` (in eval mode) whose ``Conv2d -> BatchNorm2d`` pairs inside ``nn.Sequential``
    containers (every :class:`~cnnkit.layers.ConvNormAct`, projection shortcuts, VGG-BN...) are one
    convolution; returns ``(model, number of folded pairs)``."""
    model = copy.deepcopy(model).eval()
    folded = 0
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for a, b in itertools.pairwise(names):
            conv, bn = module._modules[a], module._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d | FrozenBatchNorm2d):
                if bn.running_mean is None:  # BatchNorm without running statistics cannot be folded
                    continue
                module._modules[a] = _fuse(conv, bn)
                module._modules[b] = nn.Identity()
                folded += 1
    return model, folded


@dataclass
class FastModel:
    """A model prepared for inference; calling it moves the input and runs it the prepared way."""

    model: nn.Module
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype, None for fp32
    channels_last: bool
    folded: int = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(self.device, self.dtype):
            return self.model(x)


class OnnxModel(nn.Module):
    """An exported ONNX graph run by ONNX Runtime, used where a cnnkit model is (predict, val): the input
    goes to the session as fp32 and its outputs come back as CPU tensors (one, or a tuple). ``meta``:
    the cnnkit metadata the export stored in the graph."""

    def __init__(self, path: str | os.PathLike[str], meta: dict[str, Any]) -> None:
        super().__init__()
        try:
            import onnxruntime
        except ImportError:
            raise CnnkitError(
                f"{path}: running ONNX models needs onnxruntime: pip install 'cnnkit[export]'"
            ) from None
        self.path, self.meta = str(path), meta
        self.session = onnxruntime.InferenceSession(self.path, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        args = meta.get("args") or {}
        self.outputs = list(meta.get("onnx_outputs") or [])
        if meta.get("task") == "detect":  # what the detection task needs from a detector
            self.register_buffer(
                "anchors", torch.tensor(args["anchors"], dtype=torch.float32), persistent=False
            )
            self.strides = tuple(int(s) for s in args["strides"])
        self.num_classes = len(meta.get("class_names") or []) or None

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        feed = {self.input_name: x.detach().float().contiguous().cpu().numpy()}
        outputs = tuple(torch.from_numpy(o) for o in self.session.run(None, feed))
        return outputs[0] if len(outputs) == 1 else outputs

    def __deepcopy__(self, memo: dict[int, Any]) -> OnnxModel:  # a session is not copied; it is stateless
        return self


def prepare(model: nn.Module, device: torch.device, fast: bool = True, *, reduced: bool = True) -> FastModel:
    """``model`` on ``device`` in eval mode; with ``fast``, BatchNorm folded and channels-last, plus
    reduced-precision autocast where the device has it (unless ``reduced=False``: fp32). An ONNX model
    runs as exported, on ONNX Runtime's CPU provider."""
    if isinstance(model, OnnxModel):
        return FastModel(model.eval(), torch.device("cpu"), None, False)
    if not fast:
        return FastModel(model.eval().to(device), device, None, False)
    folded_model, n = fold_batchnorm(model)
    folded_model.to(device)
    folded_model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return FastModel(folded_model, device, amp_dtype("auto", device) if reduced else None, True, n)
