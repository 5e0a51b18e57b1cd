"""Per-layer summary of a model: shapes, receptive fields, parameters and multiply-adds.

Shapes of sliding-window layers are computed from :mod:`cnnkit.arithmetic` and checked against a real
forward pass; a disagreement is a bug (in the formula or the layer) and raises.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from cnnkit import arithmetic

_WINDOW = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
_ADAPTIVE = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
# Layers that pass their input through unchanged at inference: traced, but not listed.
_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Flatten, nn.Sequential, nn.ModuleList)


@dataclass(frozen=True)
class LayerRow:
    name: str
    type: str
    kernel: str
    stride: str
    padding: str
    output_shape: tuple[int, ...]
    receptive_field: int | None  # input pixels seen by one output unit (None once flattened)
    params: int
    macs: int


@dataclass(frozen=True)
class ModelSummary:
    rows: list[LayerRow]
    input_shape: tuple[int, ...]
    params: int
    trainable_params: int
    macs: int

    def table(self) -> str:
        """The summary as a fixed-width text table with totals."""
        header = ("layer", "type", "kernel", "stride", "pad", "output", "RF", "params", "MACs")
        lines = [
            (
                r.name,
                r.type,
                r.kernel,
                r.stride,
                r.padding,
                "x".join(map(str, r.output_shape)),
                "-" if r.receptive_field is None else str(r.receptive_field),
                f"{r.params:,}",
                _si(r.macs),
            )
            for r in self.rows
        ]
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
        right = {6, 7, 8}

        def fmt(cells: Sequence[str]) -> str:
            return "  ".join(
                c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
            )

        rule = "-" * len(fmt(header))
        out = [fmt(header), rule, *(fmt(line) for line in lines), rule]
        out.append(f"input {'x'.join(map(str, self.input_shape))}")
        out.append(f"parameters {self.params:,} (trainable {self.trainable_params:,})")
        out.append(f"multiply-adds {_si(self.macs)} ({self.macs:,})")
        return "\n".join(out)


def _si(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _pair(v: int | tuple[int, ...] | str) -> tuple[int, int]:
    if isinstance(v, str):
        raise ValueError(v)
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[-1]))


def _fmt(v: tuple[int, int]) -> str:
    return str(v[0]) if v[0] == v[1] else f"{v[0]}x{v[1]}"


def summarize(model: nn.Module, imgsz: int | tuple[int, int] = 224, in_chans: int = 3) -> ModelSummary:
    """Run one forward pass of a ``[1, in_chans, H, W]`` zero input and describe every leaf layer.

    Receptive fields follow the tensors through the network: a layer's input field is that of the
    tensor it receives; a tensor made outside a module (a residual sum, a concatenation) takes the
    largest field recorded at its resolution, which is the field of the deepest branch feeding it.
    """
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    x = torch.zeros(1, in_chans, h, w)
    fields: dict[int, tuple[int, int]] = {}  # id(tensor) -> (receptive field, jump) along H
    by_size: dict[tuple[int, ...], tuple[int, int]] = {(h, w): (1, 1)}
    keep: list[torch.Tensor] = [x]  # hold the tensors so their ids stay unique during the pass
    fields[id(x)] = (1, 1)
    rows: list[LayerRow] = []

    def hook(name: str, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        inp = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        if not isinstance(output, torch.Tensor):
            return
        rf_in: tuple[int, int] | None = None
        if inp is not None:
            rf_in = fields.get(id(inp)) or (by_size.get(tuple(inp.shape[-2:])) if inp.ndim == 4 else None)
        kernel, stride, padding, rf_out = _geometry(name, module, inp, output, rf_in)
        if rf_out is not None and output.ndim == 4:
            fields[id(output)] = rf_out
            size = tuple(output.shape[-2:])
            if rf_out[0] >= by_size.get(size, (0, 0))[0]:
                by_size[size] = rf_out
            keep.append(output)
        if isinstance(module, _PASS_THROUGH) or type(module).__name__ == "DropPath":
            return
        params = sum(p.numel() for p in module.parameters(recurse=False))
        rows.append(
            LayerRow(
                name,
                type(module).__name__,
                kernel,
                stride,
                padding,
                tuple(output.shape[1:]),
                rf_out[0] if (rf_out is not None and output.ndim == 4) else None,
                params,
                _macs(module, inp, output),
            )
        )

    handles = [
        m.register_forward_hook(lambda mod, i, o, name=name: hook(name, mod, i, o))
        for name, m in model.named_modules()
        if not list(m.children())
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ModelSummary(rows, tuple(x.shape[1:]), params, trainable, sum(r.macs for r in rows))


Field = tuple[int, int]  # (receptive field, jump) along H


def _geometry(
    name: str, module: nn.Module, inp: torch.Tensor | None, output: torch.Tensor, rf_in: Field | None
) -> tuple[str, str, str, Field | None]:
    """Kernel, stride and padding of a sliding-window layer (``-`` for others) and the receptive field
    after it; the formula's output size is checked against the forward pass."""
    if inp is None:
        return "-", "-", "-", rf_in
    if isinstance(module, _WINDOW):
        k, s = _pair(module.kernel_size), _pair(module.stride or module.kernel_size)
        d, p = _pair(getattr(module, "dilation", 1)), _pair(module.padding)
        ceil = bool(getattr(module, "ceil_mode", False))
        _check_shape(
            name,
            tuple(
                arithmetic.conv_output_size(int(n), k[i], p[i], s[i], d[i], ceil)
                for i, n in enumerate(inp.shape[-2:])
            ),
            output,
        )
        grown = (
            None
            if rf_in is None
            else (rf_in[0] + (arithmetic.effective_kernel(k[0], d[0]) - 1) * rf_in[1], rf_in[1] * s[0])
        )
        return f"{k[0]}x{k[1]}", _fmt(s), _fmt(p), grown
    if isinstance(module, nn.ConvTranspose2d):
        k, s, p = _pair(module.kernel_size), _pair(module.stride), _pair(module.padding)
        op, d = _pair(module.output_padding), _pair(module.dilation)
        _check_shape(
            name,
            tuple(
                arithmetic.conv_transpose_output_size(int(n), k[i], p[i], s[i], op[i], d[i])
                for i, n in enumerate(inp.shape[-2:])
            ),
            output,
        )
        grown = (
            None if rf_in is None else (rf_in[0] + (k[0] - 1) * rf_in[1] // s[0], max(rf_in[1] // s[0], 1))
        )
        return f"{k[0]}x{k[1]}", _fmt(s), _fmt(p), grown
    if isinstance(module, _ADAPTIVE) and rf_in is not None:
        n_in, n_out = int(inp.shape[-2]), int(output.shape[-2])
        win = -(-n_in // n_out)  # the widest adaptive window
        return "-", "-", "-", (rf_in[0] + (win - 1) * rf_in[1], rf_in[1] * max(n_in // n_out, 1))
    return "-", "-", "-", rf_in


def _check_shape(name: str, expected: tuple[int, ...], output: torch.Tensor) -> None:
    """The formula's output size must be what the layer produced; a difference is a bug."""
    if expected != tuple(output.shape[-2:]):
        raise AssertionError(f"{name}: formula gives {expected}, forward gave {tuple(output.shape[-2:])}")


def _macs(module: nn.Module, inp: torch.Tensor | None, out: torch.Tensor) -> int:
    """Multiply-accumulates of one sample through ``module`` (convolutions and linear layers)."""
    if isinstance(module, nn.Conv2d):
        kh, kw = _pair(module.kernel_size)
        return out[0].numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.ConvTranspose2d) and inp is not None:
        kh, kw = _pair(module.kernel_size)
        return inp[0].numel() * (module.out_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return out[0].numel() * module.in_features
    return 0
