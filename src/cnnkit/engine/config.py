"""Training configuration: a typed dataclass with defaults, loadable from YAML, overridable from the CLI."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Literal

from cnnkit.errors import CnnkitError
from cnnkit.io import load_yaml

__all__ = ["TrainConfig", "config_from_dict", "load_yaml"]

Optimizer = Literal["sgd", "adam", "adamw"]
Schedule = Literal["cosine", "step", "constant"]
Amp = Literal["auto", "off", "bf16", "fp16"]


@dataclass
class TrainConfig:
    """Everything the engine needs to run a fit; task- and data-specific options live with the task."""

    epochs: int = 10
    batch: int = 32  # per process: the global batch is batch x processes x accumulate
    accumulate: int = 1  # micro-batches whose gradients add up before each optimizer step
    sync_bn: bool = False  # distributed on CUDA: BatchNorm statistics over the global batch
    imgsz: int = 224
    optimizer: Optimizer = "adamw"
    lr: float = 1e-3
    momentum: float = 0.9  # SGD momentum / Adam beta1
    weight_decay: float = 1e-4  # not applied to norm layers and biases
    schedule: Schedule = "cosine"
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01  # cosine ends at lr * min_lr_ratio
    step_epochs: int = 30  # step schedule: multiply by step_gamma every step_epochs
    step_gamma: float = 0.1
    grad_clip: float | None = 10.0  # max global gradient norm; None turns clipping off
    ema: bool = False
    ema_decay: float = 0.999
    amp: Amp = "auto"
    channels_last: bool = False
    device: str = "auto"
    seed: int = 0
    workers: int = 2
    patience: int | None = None  # early stopping: epochs without improvement
    save_period: int = 1  # epochs between checkpoints of last.pt
    quiet: bool = False
    plots: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch < 1 or self.imgsz < 1:
            raise CnnkitError(
                f"epochs, batch and imgsz must be positive (got {self.epochs}, {self.batch}, {self.imgsz})"
            )
        if self.accumulate < 1:
            raise CnnkitError(f"accumulate must be at least 1, got {self.accumulate}")
        if self.lr <= 0:
            raise CnnkitError(f"lr must be positive, got {self.lr}")
        for name, allowed in (
            ("optimizer", Optimizer.__args__),  # type: ignore[attr-defined]
            ("schedule", Schedule.__args__),  # type: ignore[attr-defined]
            ("amp", Amp.__args__),  # type: ignore[attr-defined]
        ):
            if getattr(self, name) not in allowed:
                raise CnnkitError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def config_from_dict(cls: type[Any], values: dict[str, Any], source: str = "config") -> Any:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys with the list of known ones."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise CnnkitError(f"{source}: unknown keys {unknown}; known keys: {sorted(known)}")
    return cls(**values)
