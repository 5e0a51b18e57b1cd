from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnkit import arithmetic as ar
from cnnkit.layers import Conv2dSame


def test_hand_worked_sizes() -> None:
    assert ar.conv_output_size(6, 3) == 4  # valid: n - f + 1
    assert ar.conv_output_size(6, 3, p=1) == 6  # same at stride 1
    assert ar.conv_output_size(7, 3, p=0, s=2) == 3  # floor((7 - 3) / 2) + 1
    assert ar.conv_output_size(224, 7, 3, 2) == 112
    assert ar.conv_output_size(112, 3, 1, 2) == 56
    assert ar.conv_output_size(7, 3, 0, 2, dilation=2) == 2
    assert ar.output_size("valid", 6, 3) == 4
    assert ar.output_size("same", 6, 3) == 6
    assert ar.output_size("same", 7, 3, 2) == 4  # ceil(7 / 2)


def test_tensorflow_same_padding_is_asymmetric_for_even_totals() -> None:
    assert ar.same_padding(224, 3, 2) == (0, 1)  # the extra pixel goes bottom/right
    assert ar.same_padding(225, 3, 2) == (1, 1)
    assert ar.same_padding(5, 1, 2) == (0, 0)
    assert ar.padding_for("valid", 10, 5) == (0, 0)
    with pytest.raises(ValueError):
        ar.padding_for("full", 10, 3)  # type: ignore[arg-type]


def test_invalid_geometry_errors() -> None:
    with pytest.raises(ValueError, match="larger than the padded input"):
        ar.conv_output_size(2, 5)
    with pytest.raises(ValueError, match="output_padding"):
        ar.conv_transpose_output_size(4, 3, s=2, output_padding=2)


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 40),
    f=st.integers(1, 7),
    p=st.integers(0, 3),
    s=st.integers(1, 4),
    d=st.integers(1, 3),
)
def test_conv_formula_equals_torch(n: int, f: int, p: int, s: int, d: int) -> None:
    if n + 2 * p < d * (f - 1) + 1:
        with pytest.raises(ValueError):
            ar.conv_output_size(n, f, p, s, d)
        return
    out = F.conv2d(
        torch.zeros(1, 1, n, 1), torch.zeros(1, 1, f, 1), stride=(s, 1), padding=(p, 0), dilation=(d, 1)
    )
    assert ar.conv_output_size(n, f, p, s, d) == out.shape[2]


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 40), f=st.integers(1, 6), s=st.integers(1, 4), ceil=st.booleans(), data=st.data())
def test_pool_formula_equals_torch(n: int, f: int, s: int, ceil: bool, data: st.DataObject) -> None:
    p = data.draw(st.integers(0, f // 2))
    if n + 2 * p < f:
        return
    out = F.max_pool2d(torch.zeros(1, 1, n, 1), (f, 1), (s, 1), (p, 0), ceil_mode=ceil)
    assert ar.conv_output_size(n, f, p, s, 1, ceil_mode=ceil) == out.shape[2]


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 30), f=st.integers(1, 6), s=st.integers(1, 4), p=st.integers(0, 2), data=st.data())
def test_transposed_formula_equals_torch(n: int, f: int, s: int, p: int, data: st.DataObject) -> None:
    op = data.draw(st.integers(0, s - 1))
    if (n - 1) * s - 2 * p + f + op < 1:
        return
    out = F.conv_transpose2d(
        torch.zeros(1, 1, n, 1),
        torch.zeros(1, 1, f, 1),
        stride=(s, 1),
        padding=(p, 0),
        output_padding=(op, 0),
    )
    assert ar.conv_transpose_output_size(n, f, p, s, op) == out.shape[2]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), f=st.integers(1, 6), s=st.integers(1, 4), d=st.integers(1, 2))
def test_same_conv_gives_ceil_n_over_s(n: int, f: int, s: int, d: int) -> None:
    conv = Conv2dSame(1, 1, f, stride=s, dilation=d, bias=False)
    assert conv(torch.zeros(1, 1, n, n)).shape[-1] == math.ceil(n / s) == ar.output_size("same", n, f, s, d)


def test_receptive_field_of_vgg16_conv5_3_is_196() -> None:
    conv = ar.LayerGeometry(3, 1, 1)
    pool = ar.LayerGeometry(2, 2, 0)
    layers = (
        [conv] * 2 + [pool] + [conv] * 2 + [pool] + [conv] * 3 + [pool] + [conv] * 3 + [pool] + [conv] * 3
    )
    rf = ar.receptive_field(layers)
    assert rf[-1].size == 196
    assert rf[-1].jump == 16
    assert rf[0] == ar.ReceptiveField(3, 1, 0.5)


def test_receptive_field_matches_gradient_support() -> None:
    # The receptive field is where the gradient of one output unit w.r.t. the input is non-zero.
    layers = [ar.LayerGeometry(3, 2, 1), ar.LayerGeometry(3, 1, 1, dilation=2), ar.LayerGeometry(5, 2, 2)]
    x = torch.ones(1, 1, 64, 64, requires_grad=True)
    y = x
    for g in layers:
        y = F.conv2d(
            y, torch.ones(1, 1, g.kernel, g.kernel), stride=g.stride, padding=g.padding, dilation=g.dilation
        )
    centre = y.shape[-1] // 2
    y[0, 0, centre, centre].backward()
    assert x.grad is not None
    cols = (x.grad[0, 0].abs().sum(0) > 0).nonzero().flatten()
    assert int(cols.max() - cols.min() + 1) == ar.receptive_field(layers)[-1].size
