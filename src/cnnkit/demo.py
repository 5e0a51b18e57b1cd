"""``cnnkit demo``: the main job end to end on built-in data."""

from __future__ import annotations

from collections.abc import Sequence

from cnnkit.api import create_model
from cnnkit.summary import summarize

DEMO_ZOO = (
    "vgg16",
    "resnet50",
    "googlenet",
    "inception_v3",
    "mobilenet_v1",
    "mobilenet_v2",
    "efficientnet_b0",
)


def zoo_table(names: Sequence[str] = DEMO_ZOO) -> str:
    """Parameters, multiply-adds and final receptive field of each model at its default input size."""
    lines = [f"{'model':<18} {'input':>7} {'params':>13} {'MACs':>9} {'RF':>6}"]
    for name in names:
        model = create_model(name, **({"aux_logits": False} if name == "googlenet" else {}))
        size = getattr(model, "default_imgsz", 224)
        s = summarize(model, size)
        rf = max(r.receptive_field or 0 for r in s.rows)
        lines.append(f"{name:<18} {size:>7} {s.params:>13,} {s.macs / 1e9:>8.2f}G {rf:>6}")
    return "\n".join(lines)


def run_demo() -> int:
    print("cnnkit architecture zoo (parameters and multiply-adds from `cnnkit summary`):")
    print(zoo_table())
    return 0
