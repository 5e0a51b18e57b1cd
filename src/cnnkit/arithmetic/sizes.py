"""Convolution arithmetic: output sizes, 'same'/'valid' padding, transposed convolutions, receptive fields.

All sizes are along one spatial axis. For an input of size ``n``, kernel ``f``, padding ``p`` on each
side, stride ``s`` and dilation ``d`` the effective kernel is ``d * (f - 1) + 1`` and

    out = floor((n + 2p - d(f - 1) - 1) / s) + 1        (= floor((n + 2p - f) / s) + 1 when d = 1)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Padding = Literal["same", "valid"]


def effective_kernel(f: int, dilation: int = 1) -> int:
    """Extent of a dilated kernel: ``d * (f - 1) + 1``."""
    return dilation * (f - 1) + 1


def conv_output_size(
    n: int, f: int, p: int | tuple[int, int] = 0, s: int = 1, dilation: int = 1, ceil_mode: bool = False
) -> int:
    """Output size of a convolution or pooling window along one axis.

    Args:
        n: input size.
        f: kernel size.
        p: padding per side, or ``(before, after)`` for asymmetric padding.
        s: stride.
        dilation: kernel dilation.
        ceil_mode: round up instead of down (pooling's ``ceil_mode``); as in PyTorch, a last window
            that would start inside the right padding is dropped.

    Returns:
        The number of output positions. Raises ``ValueError`` when the kernel does not fit.
    """
    before, after = (p, p) if isinstance(p, int) else p
    if n < 1 or f < 1 or s < 1 or dilation < 1 or before < 0 or after < 0:
        raise ValueError(f"invalid conv geometry n={n} f={f} p={p} s={s} dilation={dilation}")
    span = n + before + after - effective_kernel(f, dilation)
    if span < 0:
        raise ValueError(
            f"kernel {f} (dilation {dilation}) is larger than the padded input {n + before + after}"
        )
    if not ceil_mode:
        return span // s + 1
    out = -(-span // s) + 1
    if (out - 1) * s >= n + before:  # the last window would start in the padding
        out -= 1
    return out


def same_padding(n: int, f: int, s: int = 1, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow's 'same' padding ``(before, after)``: output size ``ceil(n / s)``.

    The total padding is ``max((ceil(n/s) - 1) * s + d(f - 1) + 1 - n, 0)``; when it is odd the extra
    pixel goes after (bottom/right), which is why 'same' with stride > 1 can be asymmetric.
    """
    out = math.ceil(n / s)
    total = max((out - 1) * s + effective_kernel(f, dilation) - n, 0)
    return total // 2, total - total // 2


def padding_for(mode: Padding, n: int, f: int, s: int = 1, dilation: int = 1) -> tuple[int, int]:
    """Padding ``(before, after)`` for ``'same'`` (TensorFlow rule) or ``'valid'`` (none)."""
    if mode == "valid":
        return 0, 0
    if mode == "same":
        return same_padding(n, f, s, dilation)
    raise ValueError(f"padding mode must be 'same' or 'valid', got {mode!r}")


def output_size(mode: Padding, n: int, f: int, s: int = 1, dilation: int = 1) -> int:
    """Output size for 'same' (``ceil(n/s)``) or 'valid' (``floor((n - d(f-1) - 1)/s) + 1``) padding."""
    return conv_output_size(n, f, padding_for(mode, n, f, s, dilation), s, dilation)


def conv_transpose_output_size(
    n: int, f: int, p: int = 0, s: int = 1, output_padding: int = 0, dilation: int = 1
) -> int:
    """Output size of a transposed convolution: ``(n - 1) s - 2p + d(f - 1) + output_padding + 1``."""
    if n < 1 or f < 1 or s < 1 or dilation < 1 or p < 0 or output_padding < 0:
        raise ValueError(f"invalid transposed conv n={n} f={f} p={p} s={s} dilation={dilation}")
    if output_padding >= max(s, dilation):
        raise ValueError(f"output_padding {output_padding} must be smaller than stride or dilation")
    out = (n - 1) * s - 2 * p + effective_kernel(f, dilation) + output_padding
    if out < 1:
        raise ValueError(f"transposed conv n={n} f={f} p={p} s={s} gives an empty output")
    return out


@dataclass(frozen=True)
class LayerGeometry:
    """Kernel, stride, padding and dilation of one sliding-window layer along one axis."""

    kernel: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1


@dataclass(frozen=True)
class ReceptiveField:
    """Receptive field after a layer.

    ``size``: input pixels seen by one output unit; ``jump``: input pixels between neighbouring output
    units (the product of strides); ``start``: centre of the first output unit's field, in input
    pixel coordinates (negative when padding puts it outside the image).
    """

    size: int
    jump: int
    start: float


def receptive_field(layers: Iterable[LayerGeometry]) -> list[ReceptiveField]:
    """Receptive field, jump and start after each layer of a chain (Dumoulin & Visin; Araujo et al.).

    ``size_out = size_in + d(f - 1) * jump_in``, ``jump_out = jump_in * s``,
    ``start_out = start_in + ((d(f - 1)) / 2 - p) * jump_in``.
    """
    size, jump, start = 1, 1, 0.5
    result = []
    for layer in layers:
        k = effective_kernel(layer.kernel, layer.dilation)
        size += (k - 1) * jump
        start += ((k - 1) / 2 - layer.padding) * jump
        jump *= layer.stride
        result.append(ReceptiveField(size, jump, start))
    return result
