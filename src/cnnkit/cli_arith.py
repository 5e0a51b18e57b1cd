"""``cnnkit arith``: the notes' calculations one layer at a time (:mod:`cnnkit.arithmetic`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from cnnkit import arithmetic as ar
from cnnkit.errors import CnnkitError


def _n(value: int) -> str:
    """``120,422,400 (120.4M)``: exact, and readable."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value:,} ({value / scale:.1f}{unit})"
    return f"{value:,}"


def _times(ratio: float) -> str:
    return f"{1 / ratio:.1f}x fewer" if ratio <= 1 else f"{ratio:.1f}x more"


def _checked(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run an arithmetic function; its ``ValueError`` is the user's mistake, said in one line."""
    try:
        return fn(*args, **kwargs)
    except ValueError as exc:
        raise CnnkitError(str(exc)) from None


def cmd_conv(args: argparse.Namespace) -> int:
    layer: ar.ConvLayer = _checked(
        ar.conv_layer, args.n, args.f, args.s, args.p, args.c_in, args.c_out, args.dilation
    )
    before, after = layer.padding
    pad = (
        f"{before}" if before == after else f"{before} before, {after} after (asymmetric, as TensorFlow pads)"
    )
    k = ar.effective_kernel(layer.f, layer.dilation)
    print(f"input      {layer.n}x{layer.n}x{layer.c_in}, filter {layer.f}x{layer.f}, stride {layer.stride}")
    if layer.dilation > 1:
        print(f"dilation   {layer.dilation}: the filter spans {k}x{k} input pixels")
    print(f"padding    {pad}")
    print(
        f"output     floor(({layer.n} + {before + after} - {k}) / {layer.stride}) + 1 = {layer.out}"
        f"  ->  {layer.out}x{layer.out}x{layer.c_out}"
    )
    print(
        f"params     {layer.f}*{layer.f}*{layer.c_in}*{layer.c_out} + {layer.c_out} bias = {_n(layer.params)}"
    )
    print(
        f"mults      {layer.out}*{layer.out}*{layer.c_out} outputs x {layer.f}*{layer.f}*{layer.c_in} each "
        f"= {_n(layer.mults)}"
    )
    print(
        f"receptive  +{layer.receptive_growth} x the input's jump (one output sees {k}x{k} of its input); "
        f"the jump to the next layer is x{layer.stride}"
    )
    if layer.uncovered:
        sizes = " or ".join(map(str, ar.fitting_sizes(layer)))
        print(
            f"note       the last {layer.uncovered} row(s) and column(s) are never covered by a window; "
            f"an input of {sizes} fits exactly"
        )
    return 0


def cmd_bottleneck(args: argparse.Namespace) -> int:
    b: ar.Bottleneck = _checked(ar.bottleneck, args.n, args.c_in, args.c_mid, args.c_out, args.f)
    print(f"input {b.n}x{b.n}x{b.c_in} -> output {b.n}x{b.n}x{b.c_out} ('same' {b.f}x{b.f})")
    print(f"direct {b.f}x{b.f}:     {b.n}*{b.n}*{b.c_out} x {b.f}*{b.f}*{b.c_in} = {_n(b.direct)}")
    print(f"1x1 to {b.c_mid}:        {b.n}*{b.n}*{b.c_mid} x {b.c_in} = {_n(b.reduce)}")
    print(f"then {b.f}x{b.f}:       {b.n}*{b.n}*{b.c_out} x {b.f}*{b.f}*{b.c_mid} = {_n(b.conv)}")
    print(f"bottleneck total: {_n(b.total)}  ({b.ratio:.3f} of direct, {_times(b.ratio)})")
    return 0


def cmd_separable(args: argparse.Namespace) -> int:
    sep: ar.Separable = _checked(ar.separable, args.n, args.c_in, args.c_out, args.f, args.s, args.expand)
    o = sep.out
    shape = f"{sep.f}x{sep.f}, stride {sep.stride}, 'same'"
    print(f"input {sep.n}x{sep.n}x{sep.c_in} -> output {o}x{o}x{sep.c_out} ({shape})")
    print(f"standard conv:  {o}*{o}*{sep.c_out} x {sep.f}*{sep.f}*{sep.c_in} = {_n(sep.standard)}")
    if sep.expand > 1:
        print(f"1x1 expand x{sep.expand}:  {sep.n}*{sep.n}*{sep.hidden} x {sep.c_in} = {_n(sep.expansion)}")
    print(f"depthwise:      {o}*{o}*{sep.hidden} x {sep.f}*{sep.f} = {_n(sep.depthwise)}")
    print(f"pointwise 1x1:  {o}*{o}*{sep.c_out} x {sep.hidden} = {_n(sep.pointwise)}")
    print(f"separable total: {_n(sep.total)}  ({sep.ratio:.4f} of standard, {_times(sep.ratio)})")
    if sep.expand == 1:
        ratio = 1 / sep.c_out + 1 / sep.f**2
        print(f"ratio = 1/c_out + 1/f^2 = 1/{sep.c_out} + 1/{sep.f * sep.f} = {ratio:.4f}")
    return 0


def _grid(rows: list[list[float]], indent: str = "  ") -> str:
    width = max(len(f"{v:g}") for row in rows for v in row)
    return "\n".join(indent + " ".join(f"{v:g}".rjust(width) for v in row) for row in rows)


def cmd_transposed(args: argparse.Namespace) -> int:
    out = _checked(ar.conv_transpose_output_size, args.n, args.f, args.p, args.s, args.output_padding)
    print(
        f"output = ({args.n} - 1)*{args.s} - 2*{args.p} + {args.f} + {args.output_padding} = {out}"
        f"  ({args.n}x{args.n} -> {out}x{out})"
    )
    if not args.show:
        return 0
    if args.n > 6 or args.f > 7:
        raise CnnkitError("--show prints every step: keep it to --n 6 and --f 7 or less")
    x = [[float(args.n * i + j + 1) for j in range(args.n)] for i in range(args.n)]
    w = [[float(args.f * a + b + 1) for b in range(args.f)] for a in range(args.f)]
    steps, result = ar.transposed_steps(x, w, args.s, args.p, args.output_padding)
    print(f"input (values 1..{args.n * args.n}):\n{_grid(x)}\nfilter:\n{_grid(w)}")
    for step in steps:
        print(
            f"input[{step.row}][{step.col}] = {step.value:g} times the filter, "
            f"added at row {step.row * args.s}, column {step.col * args.s}; running sum:\n{_grid(step.total)}"
        )
    print(f"crop {args.p} from each side -> output:\n{_grid(result)}")
    same = _matches_torch(x, w, args, result)
    print(f"matches conv_transpose2d_reference and torch's conv_transpose2d: {same}")
    return 0


def _matches_torch(x: list[list[float]], w: list[list[float]], args: argparse.Namespace, result: Any) -> str:
    import torch
    import torch.nn.functional as F

    from cnnkit.ops.transposed import conv_transpose2d_reference

    xt, wt = torch.tensor(x)[None, None], torch.tensor(w)[None, None]
    ours = torch.tensor(result)[None, None]
    ref = conv_transpose2d_reference(
        xt, wt, stride=args.s, padding=args.p, output_padding=args.output_padding
    )
    lib = F.conv_transpose2d(xt, wt, stride=args.s, padding=args.p, output_padding=args.output_padding)
    return "yes" if torch.equal(ours, ref) and torch.equal(ours, lib) else "NO (please report this)"


def cmd_efficientnet(args: argparse.Namespace) -> int:
    factor = ar.flops_factor(args.alpha, args.beta, args.gamma)
    verdict = "ok" if abs(factor - 2) <= 0.2 else "far from 2: each phi will not double the cost"
    scaling = ar.compound_scaling(args.phi, args.alpha, args.beta, args.gamma)
    print(
        f"alpha*beta^2*gamma^2 = {args.alpha}*{args.beta}^2*{args.gamma}^2 = {factor:.3f} ({verdict});"
        f" cost grows about {factor**args.phi:.2f}x from B0"
    )
    print(
        f"phi {args.phi:g}: depth x{scaling.depth:.3f} (alpha^phi), width x{scaling.width:.3f} (beta^phi), "
        f"resolution {scaling.resolution} (224*gamma^phi, to 8 px)"
    )
    rows = ar.efficientnet_table(scaling, num_classes=args.num_classes)
    b0 = sum(r.mults for r in ar.efficientnet_table(ar.EFFICIENTNET_SCALING["efficientnet_b0"]))
    cols = ("stage", "operator", "input", "channels", "layers", "params", "mults")
    table = [
        (str(i + 1), r.operator, f"{r.resolution}x{r.resolution}", str(r.channels), str(r.layers), *_pm(r))
        for i, r in enumerate(rows)
    ]
    print()
    print(_table(cols, table, left=2))
    params, mults = sum(r.params for r in rows), sum(r.mults for r in rows)
    print(
        f"total {params / 1e6:.2f}M parameters, {mults / 1e9:.3f}G multiply-adds "
        f"({mults / b0:.2f}x B0's: rounding widths to 8, depths up and the resolution to 8 px"
        f" moves it from {factor:.3f}^phi)\n"
    )
    published = []
    for name, s in ar.EFFICIENTNET_SCALING.items():
        stages = ar.efficientnet_table(s, num_classes=args.num_classes)
        p, m = sum(r.params for r in stages) / 1e6, sum(r.mults for r in stages) / 1e9
        paper_p, paper_m = ar.PUBLISHED_COST[name]
        published.append(
            (name, f"{s.width}", f"{s.depth}", f"{s.resolution}", f"{p:.2f}M", f"{paper_p}M", *_g(m, paper_m))
        )
    print("the released models (published width, depth, resolution; the paper's Table 2 beside ours):")
    print(_table(("model", "width", "depth", "res", "params", "paper", "mults", "paper"), published, left=1))
    return 0


def _pm(row: ar.StageRow) -> tuple[str, str]:
    return f"{row.params:,}", f"{row.mults:,}"


def _g(ours: float, paper_millions: float) -> tuple[str, str]:
    return f"{ours:.2f}G", f"{paper_millions / 1000:.2f}G"


def _padding(text: str) -> str | int:
    try:
        return ar.parse_padding(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]], left: int) -> str:
    """Fixed-width columns: the first ``left`` columns left-aligned, the rest right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    return "\n".join(line(r) for r in (header, *rows))


def add_commands(sub: argparse._SubParsersAction) -> None:
    arith = sub.add_parser("arith", help="the notes' arithmetic: conv sizes, 1x1 bottlenecks, separable, ...")
    cmds = arith.add_subparsers(dest="question", required=True)

    p = cmds.add_parser("conv", help="output size, padding, parameters and multiplications of one conv")
    p.add_argument("--n", type=int, required=True, help="input height = width")
    p.add_argument("--f", type=int, required=True, help="filter size")
    p.add_argument("--s", type=int, default=1, help="stride (default 1)")
    p.add_argument("--p", type=_padding, default="valid", help="same, valid or pixels per side")
    p.add_argument("--c-in", type=int, default=1, help="input channels (default 1)")
    p.add_argument("--c-out", type=int, default=1, help="filters (default 1)")
    p.add_argument("--dilation", type=int, default=1, help="spacing between filter taps")
    p.set_defaults(func=cmd_conv)

    p = cmds.add_parser("bottleneck", help="a direct conv against a 1x1 reduction then the conv")
    p.add_argument("--n", type=int, default=28, help="input height = width")
    p.add_argument("--c-in", type=int, default=192, help="input channels")
    p.add_argument("--c-mid", type=int, default=16, help="bottleneck channels (the 1x1 reduction)")
    p.add_argument("--c-out", type=int, default=32, help="output channels")
    p.add_argument("--f", type=int, default=5, help="filter size of the expensive convolution")
    p.set_defaults(func=cmd_bottleneck)

    p = cmds.add_parser("separable", help="a standard conv against depthwise + pointwise (MobileNet)")
    p.add_argument("--n", type=int, default=112, help="input height = width")
    p.add_argument("--c-in", type=int, default=32, help="input channels")
    p.add_argument("--c-out", type=int, default=64, help="output channels")
    p.add_argument("--f", type=int, default=3, help="depthwise filter size")
    p.add_argument("--s", type=int, default=1, help="stride")
    p.add_argument("--expand", type=int, default=1, help="MobileNetV2's expansion factor t (e.g. 6)")
    p.set_defaults(func=cmd_separable)

    p = cmds.add_parser("transposed", help="a transposed conv's output size, worked by hand with --show")
    p.add_argument("--n", type=int, default=2, help="input height = width")
    p.add_argument("--f", type=int, default=3, help="filter size")
    p.add_argument("--s", type=int, default=2, help="stride (the upsampling factor)")
    p.add_argument("--p", type=int, default=1, help="padding removed per side")
    p.add_argument("--output-padding", type=int, default=0, help="extra rows/columns on one side")
    p.add_argument("--show", action="store_true", help="print each input value times the filter")
    p.set_defaults(func=cmd_transposed)

    p = cmds.add_parser("efficientnet", help="compound scaling: multipliers, stage table, cost")
    p.add_argument("--phi", type=float, default=0.0, help="compound coefficient")
    p.add_argument("--alpha", type=float, default=1.2, help="depth base (default 1.2)")
    p.add_argument("--beta", type=float, default=1.1, help="width base (default 1.1)")
    p.add_argument("--gamma", type=float, default=1.15, help="resolution base (default 1.15)")
    p.add_argument("--num-classes", type=int, default=1000, help="classes of the head")
    p.set_defaults(func=cmd_efficientnet)
