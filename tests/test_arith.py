"""``cnnkit arith``: every number checked against a PyTorch forward, FlopCounterMode or ``cnnkit summary``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cnnkit import arithmetic as ar
from cnnkit import create_model
from cnnkit.cli import main
from cnnkit.ops.transposed import conv_transpose2d_reference
from cnnkit.summary import summarize


def _flops(module: nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of one forward, as PyTorch counts them (it counts two FLOPs per multiply-add)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x)
    return counter.get_total_flops() // 2


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40),
    f=st.integers(1, 7),
    s=st.integers(1, 4),
    d=st.integers(1, 3),
    p=st.one_of(st.sampled_from(["same", "valid"]), st.integers(0, 4)),
    c_in=st.integers(1, 5),
    c_out=st.integers(1, 5),
)
@example(n=1, f=1, s=3, d=1, p=1, c_in=1, c_out=1)  # no smaller input fits: only the larger is suggested
def test_conv_layer_matches_a_torch_forward(
    n: int, f: int, s: int, d: int, p: str | int, c_in: int, c_out: int
) -> None:
    try:
        layer = ar.conv_layer(n, f, s, p, c_in, c_out, d)
    except ValueError:
        pad = (p, p) if isinstance(p, int) else ar.padding_for(p, n, f, s, d)
        assert n + sum(pad) < d * (f - 1) + 1  # refused only when the filter does not fit
        return
    conv = nn.Conv2d(c_in, c_out, f, s, dilation=d)
    x = F.pad(torch.zeros(1, c_in, n, n), (*layer.padding, *layer.padding))
    y = conv(x)
    assert tuple(y.shape) == (1, c_out, layer.out, layer.out)
    assert layer.params == sum(t.numel() for t in conv.parameters())
    assert layer.mults == _flops(conv, x)
    if p == "same":
        assert layer.out == math.ceil(n / s)
    # the uncovered rows: the last window ends exactly `uncovered` pixels before the padded input does
    last_end = (layer.out - 1) * s + d * (f - 1) + 1
    assert n + sum(layer.padding) - last_end == layer.uncovered
    if layer.uncovered:
        for size in ar.fitting_sizes(layer):
            assert ar.conv_layer(size, f, s, layer.padding[0], c_in, c_out, d).uncovered == 0


def test_conv_refuses_a_filter_larger_than_the_input_and_names_the_fix() -> None:
    with pytest.raises(ValueError, match=r"must be at least 5 \(or pad by 2\)"):
        ar.conv_layer(2, 5)
    with pytest.raises(ValueError, match="padding must be"):
        ar.conv_layer(8, 3, p="half")
    with pytest.raises(ValueError, match="c_in must be at least 1"):
        ar.conv_layer(8, 3, c_in=0)


def test_bottleneck_is_the_notes_example_and_matches_summary() -> None:
    b = ar.bottleneck(28, 192, 16, 32, 5)
    assert (b.direct, b.total) == (120_422_400, 12_443_648)  # "about 120M vs 12.4M"
    direct = nn.Conv2d(192, 32, 5, padding=2)
    reduced = nn.Sequential(nn.Conv2d(192, 16, 1), nn.Conv2d(16, 32, 5, padding=2))
    assert summarize(direct, 28, 192).macs == b.direct
    assert summarize(reduced, 28, 192).macs == b.total


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(4, 24),
    c_in=st.integers(1, 12),
    c_out=st.integers(1, 12),
    f=st.sampled_from([1, 3, 5]),
    s=st.integers(1, 2),
    expand=st.integers(1, 6),
)
def test_separable_costs_match_summary(n: int, c_in: int, c_out: int, f: int, s: int, expand: int) -> None:
    sep = ar.separable(n, c_in, c_out, f, s, expand)
    hidden = c_in * expand
    pad = ar.same_padding(n, f, s)
    layers: list[nn.Module] = [nn.Conv2d(c_in, hidden, 1)] if expand > 1 else []
    layers += [
        nn.ZeroPad2d((*pad, *pad)),
        nn.Conv2d(hidden, hidden, f, s, groups=hidden),
        nn.Conv2d(hidden, c_out, 1),
    ]
    standard = nn.Sequential(nn.ZeroPad2d((*pad, *pad)), nn.Conv2d(c_in, c_out, f, s))
    x = torch.zeros(1, c_in, n, n)
    assert nn.Sequential(*layers)(x).shape[-1] == sep.out == standard(x).shape[-1]
    assert summarize(nn.Sequential(*layers), n, c_in).macs == sep.total
    assert summarize(standard, n, c_in).macs == sep.standard
    if expand == 1:
        assert sep.ratio == pytest.approx(1 / c_out + 1 / f**2)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 5), f=st.integers(1, 4), s=st.integers(1, 3), data=st.data())
def test_transposed_worked_example_is_the_reference(n: int, f: int, s: int, data: st.DataObject) -> None:
    p = data.draw(st.integers(0, max(0, ((n - 1) * s + f - 1) // 2)))
    op = data.draw(st.integers(0, s - 1))
    x = [[float(data.draw(st.integers(-3, 3))) for _ in range(n)] for _ in range(n)]
    w = [[float(data.draw(st.integers(-3, 3))) for _ in range(f)] for _ in range(f)]
    steps, out = ar.transposed_steps(x, w, s, p, op)
    xt, wt = torch.tensor(x)[None, None], torch.tensor(w)[None, None]
    expected = F.conv_transpose2d(xt, wt, stride=s, padding=p, output_padding=op)[0, 0]
    assert torch.equal(torch.tensor(out), expected)
    assert torch.equal(torch.tensor(out), conv_transpose2d_reference(xt, wt, None, s, p, op)[0, 0])
    assert len(out) == ar.conv_transpose_output_size(n, f, p, s, op)
    assert len(steps) == n * n and steps[-1].total[p][p] == out[0][0]


@settings(max_examples=6, deadline=None)
@given(phi=st.floats(0.0, 2.0), resolution=st.integers(32, 96))
def test_efficientnet_table_is_the_built_model(phi: float, resolution: int) -> None:
    scaling = ar.compound_scaling(phi)
    rows = ar.efficientnet_table(scaling, resolution=resolution, num_classes=10)
    model = create_model("efficientnet", phi=phi, num_classes=10)
    summary = summarize(model, resolution)
    assert sum(r.mults for r in rows) == summary.macs
    assert sum(r.params for r in rows) == summary.params
    depths = [len(stage) for stage in model.stages]
    assert sum(r.layers for r in rows[1:-2]) == sum(depths)


def test_efficientnet_b0_to_b7_are_near_the_papers_table() -> None:
    for name, scaling in ar.EFFICIENTNET_SCALING.items():
        rows = ar.efficientnet_table(scaling)
        params, mults = sum(r.params for r in rows) / 1e6, sum(r.mults for r in rows) / 1e6
        paper_params, paper_mults = ar.PUBLISHED_COST[name]
        assert params == pytest.approx(paper_params, rel=0.05), name
        assert mults == pytest.approx(paper_mults, rel=0.05), name
    assert ar.flops_factor(1.2, 1.1, 1.15) == pytest.approx(1.92, abs=0.005)


def test_arith_commands_print_the_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["arith", "conv", "--n", "28", "--f", "5", "--p", "same", "--c-in", "192", "--c-out", "32"]) == 0
    )
    assert "120,422,400" in capsys.readouterr().out
    assert main(["arith", "conv", "--n", "28", "--f", "4", "--s", "1", "--p", "same"]) == 0
    assert "1 before, 2 after" in capsys.readouterr().out
    assert main(["arith", "conv", "--n", "28", "--f", "5", "--s", "2"]) == 0
    assert "an input of 27 or 29 fits exactly" in capsys.readouterr().out
    assert main(["arith", "bottleneck"]) == 0
    assert "12,443,648" in capsys.readouterr().out
    assert main(["arith", "separable", "--expand", "6"]) == 0
    assert "1x1 expand x6" in capsys.readouterr().out
    assert main(["arith", "transposed", "--n", "2", "--show"]) == 0
    assert "torch's conv_transpose2d: yes" in capsys.readouterr().out
    assert main(["arith", "efficientnet", "--phi", "2"]) == 0
    out = capsys.readouterr().out
    assert "1.920 (ok)" in out and "efficientnet_b7" in out
    assert main(["arith", "conv", "--n", "2", "--f", "5"]) == 2
    assert "must be at least 5" in capsys.readouterr().err
