"""Training configuration: a typed dataclass with defaults, loadable from YAML, overridable from the CLI."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Literal, TypeVar

from cnnkit.errors import CnnkitError
from cnnkit.io import load_yaml

__all__ = ["TrainConfig", "config_from_dict", "load_yaml"]

Optimizer = Literal["sgd", "adam", "adamw"]
Schedule = Literal["cosine", "step", "constant"]
Amp = Literal["auto", "off", "bf16", "fp16"]
T = TypeVar("T")
LOGGERS = ("csv", "tensorboard", "mlflow")  # --log names (csv is always on; the others: engine.loggers)


def _help(default: Any, text: str) -> Any:
    """A field with a command-line flag whose help is ``text`` (fields without one are set in YAML)."""
    return field(default=default, metadata={"help": text})


@dataclass
class TrainConfig:
    """Everything the engine needs to run a fit; task- and data-specific options live with the task."""

    epochs: int = _help(10, "passes over the training data")
    batch: int = _help(32, "per-process batch size (global batch = batch x processes x accumulate)")
    accumulate: int = _help(1, "micro-batches per optimizer step (gradient accumulation)")
    sync_bn: bool = _help(False, "BatchNorm statistics over the global batch (CUDA, distributed)")
    imgsz: int | tuple[int, int] = field(
        default=224,
        metadata={
            "help": "input size: S (square), or H W (segmentation: keeps each image's aspect ratio)",
            "parse": int,
            "nargs": "+",
            "metavar": "SIZE",
        },
    )
    optimizer: Optimizer = _help("adamw", "optimizer")
    lr: float = _help(1e-3, "learning rate")
    momentum: float = 0.9  # SGD momentum / Adam beta1
    weight_decay: float = _help(1e-4, "weight decay (not applied to norm layers and biases)")
    schedule: Schedule = _help("cosine", "learning-rate schedule")
    warmup_epochs: float = _help(1.0, "linear warm-up of the learning rate")
    min_lr_ratio: float = 0.01  # cosine ends at lr * min_lr_ratio
    step_epochs: int = 30  # step schedule: multiply by step_gamma every step_epochs
    step_gamma: float = 0.1
    grad_clip: float | None = _help(10.0, "max global gradient norm (0 turns clipping off)")
    ema: bool = _help(False, "evaluate and save an exponential moving average of the weights")
    ema_decay: float = 0.999
    amp: Amp = _help("auto", "autocast: bf16 on CPUs that have it, fp16/bf16 on CUDA")
    channels_last: bool = _help(False, "channels-last memory format")
    device: str = _help("auto", "auto, cpu, cuda, cuda:N")
    seed: int = _help(0, "seed of the run (data order, initialisation, augmentation)")
    workers: int = _help(2, "data loading processes")
    patience: int | None = _help(None, "early stopping after N epochs without improvement")
    save_period: int = _help(1, "epochs between checkpoints of last.pt")
    quiet: bool = _help(False, "no progress bar")
    plots: bool = _help(True, "draw results.png and the task's plots")
    log: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "experiment trackers, comma-separated: tensorboard,mlflow (results.csv is always on)",
            "parse": lambda text: tuple(t.strip() for t in text.split(",") if t.strip()),
            "metavar": "NAMES",
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.imgsz, list | tuple):  # from the command line, YAML or a run record
            sizes = tuple(int(v) for v in self.imgsz)
            if len(sizes) not in (1, 2):
                raise CnnkitError(f"imgsz is one size or H W, got {list(sizes)}")
            self.imgsz = sizes[0] if len(sizes) == 1 else (sizes[0], sizes[1])
        if min(self.hw) < 8:
            raise CnnkitError(f"imgsz must be at least 8, got {self.imgsz}")
        at_least = {"epochs": 1, "batch": 1, "accumulate": 1, "save_period": 1, "workers": 0}
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise CnnkitError(f"{name} must be at least {low}, got {getattr(self, name)}")
        self.log = tuple(self.log)
        unknown = sorted(set(self.log) - set(LOGGERS))
        if unknown:
            raise CnnkitError(f"log: unknown loggers {unknown}; choose from {', '.join(LOGGERS)}")
        if self.patience is not None and self.patience < 1:
            raise CnnkitError(f"patience must be at least 1 epoch, got {self.patience}")
        for name in ("lr", "weight_decay", "warmup_epochs", "grad_clip", "momentum", "ema_decay"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise CnnkitError(f"{name} must be a finite number >= 0, got {value}")
        if self.lr == 0:
            raise CnnkitError("lr must be positive, got 0")
        for name, allowed in (
            ("optimizer", Optimizer.__args__),  # type: ignore[attr-defined]
            ("schedule", Schedule.__args__),  # type: ignore[attr-defined]
            ("amp", Amp.__args__),  # type: ignore[attr-defined]
        ):
            if getattr(self, name) not in allowed:
                raise CnnkitError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    @property
    def hw(self) -> tuple[int, int]:
        """``(height, width)`` of the input."""
        return (self.imgsz, self.imgsz) if isinstance(self.imgsz, int) else self.imgsz

    @property
    def square(self) -> int:
        """The one input size of a task whose inputs are square; ``--imgsz H W`` is refused in words."""
        if not isinstance(self.imgsz, int):
            raise CnnkitError(
                f"--imgsz {self.imgsz[0]} {self.imgsz[1]}: this task takes one size (e.g. --imgsz "
                f"{max(self.imgsz)}); H W is for segmentation"
            )
        return self.imgsz

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def unwrap_optional(tp: Any) -> Any:
    """``X | None`` -> ``X``; any other type unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _tuples(value: Any) -> Any:
    """Lists become tuples, all the way down (a tuple field's items are tuples too: anchors, pairs)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def config_from_dict(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping (command-line values, YAML, run metadata): unknown keys are
    refused with the list of known ones, and lists become tuples where the field is a tuple (JSON and
    YAML have no tuples)."""
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise CnnkitError(f"{source}: unknown keys {unknown}; known keys: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    clean = {
        k: _tuples(v) if isinstance(v, list) and typing.get_origin(unwrap_optional(hints[k])) is tuple else v
        for k, v in values.items()
    }
    try:
        return cls(**clean)
    except (TypeError, ValueError) as exc:
        raise CnnkitError(f"{source}: {exc}") from None
