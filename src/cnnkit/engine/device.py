"""Device selection and mixed precision."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from cnnkit.errors import CnnkitError


def select_device(spec: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cpu``, ``cuda``, ``cuda:1`` or ``1`` choose."""
    if spec in ("auto", ""):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.isdigit():
        spec = f"cuda:{spec}"
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CnnkitError(f"device {spec!r} requested but CUDA is not available; use --device cpu")
    return device


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX); emulated bf16 is slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``mode`` (auto/off/bf16/fp16) on ``device``; None means full precision."""
    if mode == "off":
        return None
    if device.type == "cuda":
        if mode == "fp16":
            return torch.float16
        if mode == "bf16" or torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    if mode == "fp16":
        raise CnnkitError("fp16 autocast is for CUDA; on CPU use --amp bf16 or off")
    if mode == "bf16" or (mode == "auto" and cpu_supports_bf16()):
        return torch.bfloat16
    return None


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
    else:
        with torch.autocast(device_type=device.type, dtype=dtype):
            yield
