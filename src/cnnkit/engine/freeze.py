"""Freezing part of a network for transfer learning, with BatchNorm kept in inference mode.

A frozen BatchNorm must not update its running statistics, and must keep using them even after
``model.train()``; otherwise a small new dataset silently rewrites what the base learned. cnnkit swaps
each frozen ``BatchNorm2d`` for a :class:`FrozenBatchNorm2d`, which always normalises with its running
statistics, whatever the training mode. (Keras gets the same effect by calling the base with
``training=False``.)
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from cnnkit.errors import CnnkitError
from cnnkit.layers.frozen_bn import FrozenBatchNorm2d, freeze_batchnorm

__all__ = ["FrozenBatchNorm2d", "backbone_blocks", "count_parameters", "freeze_base", "freeze_batchnorm"]


def backbone_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The base network as an ordered list of named blocks (stem, each block of each stage, final).

    ``--unfreeze-last N`` counts from the end of this list; the head is never part of it. A model of
    another shape (one registered by the user) has its top-level children with parameters as blocks,
    the last being its classifier (the head).
    """
    stages = getattr(model, "stages", None)
    if stages is None:
        children = [(n, m) for n, m in model.named_children() if any(True for _ in m.parameters())]
        if len(children) < 2:
            raise CnnkitError(
                f"{type(model).__name__} has no blocks to freeze (no stages, one child with parameters); "
                "freeze its parameters yourself (requires_grad_(False))"
            )
        return children[:-1]
    stem, final = model.stem, model.final
    assert isinstance(stem, nn.Module) and isinstance(final, nn.Module)
    blocks: list[tuple[str, nn.Module]] = [("stem", stem)]
    for i, stage in enumerate(stages):
        children = list(stage.named_children())
        blocks += [(f"stages.{i}.{n}", m) for n, m in children] if children else [(f"stages.{i}", stage)]
    blocks.append(("final", final))
    return [(n, m) for n, m in blocks if any(True for _ in m.parameters())]


def freeze_base(
    model: nn.Module, unfreeze_last: int = 0, trainable: Sequence[str] = ()
) -> tuple[list[str], list[str]]:
    """Freeze the base network except its last ``unfreeze_last`` blocks and the modules in ``trainable``.

    The classifier head (``head``, ``aux``) always stays trainable. Frozen blocks get their BatchNorms
    frozen (inference mode, no statistics updates) and ``requires_grad=False``; since the frozen blocks
    form a prefix of the network, autograd builds no graph through them.

    Returns:
        ``(frozen block names, trainable block names)``.
    """
    blocks = backbone_blocks(model)
    if not 0 <= unfreeze_last <= len(blocks):
        raise CnnkitError(
            f"unfreeze_last must be between 0 and {len(blocks)} (the base has {len(blocks)} blocks)"
        )
    names = [n for n, _ in blocks]
    unknown = [
        t for t in trainable if not any(n == t or n.startswith(t + ".") or t.startswith(n) for n in names)
    ]
    if unknown:
        raise CnnkitError(f"unknown layer names {unknown}; the base's blocks are {names}")
    cut = len(blocks) - unfreeze_last
    frozen: list[str] = []
    kept: list[str] = []
    for i, (name, block) in enumerate(blocks):
        keep = i >= cut or any(name == t or name.startswith(t + ".") for t in trainable)
        # Every BatchNorm of the base stays in inference mode, as in the Keras fine-tuning recipe.
        freeze_batchnorm(block)
        for p in block.parameters():
            p.requires_grad_(keep)
        (kept if keep else frozen).append(name)
    return frozen, kept


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, frozen)`` parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return trainable, frozen
