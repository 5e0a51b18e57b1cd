"""What one layer costs: output size, parameters, multiplications, and the notes' cheaper alternatives.

Sizes are square (``n x n`` inputs, ``f x f`` filters). A multiplication is one multiply-add of a
convolution: an ``n_out x n_out x c_out`` output, each value a sum over an ``f x f x c_in`` window, costs

    mults = n_out^2 * c_out * f^2 * c_in

(FLOP counters report twice this: a multiply and an add.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cnnkit.arithmetic.sizes import conv_output_size, effective_kernel, padding_for


@dataclass(frozen=True)
class ConvLayer:
    """One ``f x f`` convolution from ``n x n x c_in`` to ``out x out x c_out``.

    ``padding`` is ``(before, after)``; ``uncovered`` counts the input rows (and columns) at the end
    that no window reaches because ``(n + pad - f_eff)`` is not a multiple of the stride.
    ``receptive_growth`` is what the layer adds to the receptive field, in units of its input's jump
    (distance between neighbouring input units, in image pixels): ``d (f - 1)``.
    """

    n: int
    f: int
    stride: int
    padding: tuple[int, int]
    dilation: int
    out: int
    c_in: int
    c_out: int
    uncovered: int

    @property
    def weights(self) -> int:
        return self.f * self.f * self.c_in * self.c_out

    @property
    def params(self) -> int:
        """Weights plus one bias per output channel."""
        return self.weights + self.c_out

    @property
    def mults(self) -> int:
        return self.out * self.out * self.weights

    @property
    def receptive_growth(self) -> int:
        return effective_kernel(self.f, self.dilation) - 1


def parse_padding(text: str | int) -> str | int:
    """``'same'``, ``'valid'`` or a number of pixels per side, as the command line gives it."""
    if isinstance(text, int):
        return text
    if text in ("same", "valid"):
        return text
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"padding must be 'same', 'valid' or a number of pixels, got {text!r}") from None
    if value < 0:
        raise ValueError(f"padding must not be negative, got {value}")
    return value


def conv_layer(
    n: int,
    f: int,
    s: int = 1,
    p: str | int = "valid",
    c_in: int = 1,
    c_out: int = 1,
    dilation: int = 1,
) -> ConvLayer:
    """The output size, padding, cost and coverage of one convolution; ``ValueError`` says what to change.

    ``p`` is ``'same'`` (TensorFlow's rule: output ``ceil(n / s)``, the odd pixel of padding after),
    ``'valid'`` (none) or pixels per side.
    """
    for name, value in (
        ("n", n),
        ("f", f),
        ("s", s),
        ("c_in", c_in),
        ("c_out", c_out),
        ("dilation", dilation),
    ):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    p = parse_padding(p)
    pad = (p, p) if isinstance(p, int) else padding_for(p, n, f, s, dilation)  # type: ignore[arg-type]
    k = effective_kernel(f, dilation)
    if n + sum(pad) < k:
        smallest = k - sum(pad)
        raise ValueError(
            f"a {f}x{f} filter{_dilated(dilation)} does not fit a {n}x{n} input with padding {pad[0]}: "
            f"the input must be at least {smallest} (or pad by {math.ceil((k - n) / 2)})"
        )
    out = conv_output_size(n, f, pad, s, dilation)
    uncovered = (n + sum(pad) - k) % s
    return ConvLayer(n, f, s, pad, dilation, out, c_in, c_out, uncovered)


def _dilated(dilation: int) -> str:
    return f" with dilation {dilation}" if dilation > 1 else ""


def fitting_sizes(layer: ConvLayer) -> list[int]:
    """The nearest input sizes below and above ``layer.n`` (the one below only when there is one) that
    the windows cover exactly, with the layer's padding."""
    k, total = effective_kernel(layer.f, layer.dilation), sum(layer.padding)
    below = layer.n - layer.uncovered
    above = below + layer.stride
    return [below, above] if below >= 1 and below + total >= k else [above]


@dataclass(frozen=True)
class Bottleneck:
    """A direct ``f x f`` convolution against a 1x1 reduction to ``c_mid`` channels then the ``f x f``
    ('same' padding, stride 1: the notes' Inception example)."""

    n: int
    f: int
    c_in: int
    c_mid: int
    c_out: int

    @property
    def direct(self) -> int:
        return self.n * self.n * self.f * self.f * self.c_in * self.c_out

    @property
    def reduce(self) -> int:
        return self.n * self.n * self.c_in * self.c_mid

    @property
    def conv(self) -> int:
        return self.n * self.n * self.f * self.f * self.c_mid * self.c_out

    @property
    def total(self) -> int:
        return self.reduce + self.conv

    @property
    def ratio(self) -> float:
        return self.total / self.direct


@dataclass(frozen=True)
class Separable:
    """A standard ``f x f`` convolution against depthwise + pointwise (MobileNet v1), 'same' padding.

    With ``expand`` (MobileNetV2's ``t``) the separable path first widens ``c_in`` to ``t * c_in`` with
    a 1x1 convolution at the input resolution, then runs the depthwise and the 1x1 projection on the
    wide tensor.
    """

    n: int
    f: int
    stride: int
    c_in: int
    c_out: int
    expand: int = 1

    @property
    def out(self) -> int:
        return math.ceil(self.n / self.stride)

    @property
    def hidden(self) -> int:
        return self.c_in * self.expand

    @property
    def standard(self) -> int:
        return self.out * self.out * self.f * self.f * self.c_in * self.c_out

    @property
    def expansion(self) -> int:
        return self.n * self.n * self.c_in * self.hidden if self.expand > 1 else 0

    @property
    def depthwise(self) -> int:
        return self.out * self.out * self.f * self.f * self.hidden

    @property
    def pointwise(self) -> int:
        return self.out * self.out * self.hidden * self.c_out

    @property
    def total(self) -> int:
        return self.expansion + self.depthwise + self.pointwise

    @property
    def ratio(self) -> float:
        """``total / standard``; without expansion exactly ``1 / c_out + 1 / f^2``."""
        return self.total / self.standard


def separable(n: int, c_in: int, c_out: int, f: int = 3, s: int = 1, expand: int = 1) -> Separable:
    for name, value in (("n", n), ("f", f), ("s", s), ("c_in", c_in), ("c_out", c_out), ("expand", expand)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    return Separable(n, f, s, c_in, c_out, expand)


def bottleneck(n: int, c_in: int, c_mid: int, c_out: int, f: int = 5) -> Bottleneck:
    for name, value in (("n", n), ("f", f), ("c_in", c_in), ("c_mid", c_mid), ("c_out", c_out)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    return Bottleneck(n, f, c_in, c_mid, c_out)


Grid = list[list[float]]


@dataclass(frozen=True)
class TransposedStep:
    """One input value ``value`` at ``(row, col)`` times the filter, added at ``(row * s, col * s)``."""

    row: int
    col: int
    value: float
    placed: Grid  # the product, in the uncropped output's coordinates (zeros elsewhere)
    total: Grid  # the running sum after this step


def transposed_steps(
    x: Grid, w: Grid, stride: int, padding: int = 0, output_padding: int = 0
) -> tuple[list[TransposedStep], Grid]:
    """The notes' transposed convolution, one input value at a time, in plain Python (one channel).

    Returns each step and the final output: the running sum with ``padding`` rows and columns cropped
    from each side (``output_padding`` extra rows/columns are added at the bottom/right first).
    """
    n, f = len(x), len(w)
    full = (n - 1) * stride + f + output_padding
    total = [[0.0] * full for _ in range(full)]
    steps = []
    for i in range(n):
        for j in range(len(x[i])):
            placed = [[0.0] * full for _ in range(full)]
            for a in range(f):
                for b in range(f):
                    placed[i * stride + a][j * stride + b] = x[i][j] * w[a][b]
                    total[i * stride + a][j * stride + b] += x[i][j] * w[a][b]
            steps.append(TransposedStep(i, j, x[i][j], placed, [row[:] for row in total]))
    size = full - 2 * padding
    if size < 1:
        raise ValueError(f"padding {padding} crops the whole {full}x{full} output")
    cropped = [row[padding : padding + size] for row in total[padding : padding + size]]
    return steps, cropped
