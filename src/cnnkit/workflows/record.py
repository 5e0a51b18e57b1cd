"""The typed record of a training run, stored in every weights file's metadata and in ``last.pt``.

It says what was trained (task, model and build arguments), how (training configuration and task
options), on what (data reference, class names) and how images are prepared (input size, mean, std).
Facts a task derives from its data (a segmentation palette, landmark flip pairs...) are kept in
``extra``. Files written before the record existed hold the same keys flat and load unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from cnnkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from cnnkit.engine.config import TrainConfig
from cnnkit.errors import CnnkitError

#: keys the weights file carries beside the record (written by save_weights and the checkpoint)
_NOT_RECORD = {"format", "model", "args", "epoch", "metrics"}


@dataclass
class RunRecord:
    task: str
    model: str
    model_args: dict[str, Any]
    train: dict[str, Any]  # TrainConfig fields
    data: str | None = None
    val: str | None = None
    val_fraction: float = 0.2
    class_names: list[str] | None = None
    imgsz: int | list[int] = 224  # S, or [H, W] (segmentation keeping the aspect ratio)
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    options: dict[str, Any] = field(default_factory=dict)
    stage: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def new(cls, task: str, model_config: dict[str, Any], cfg: TrainConfig, **values: Any) -> RunRecord:
        """A record for a run starting now: ``values`` that are fields fill them, the rest go to ``extra``."""
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in values.items() if k in names}
        extra = {k: v for k, v in values.items() if k not in names}
        return cls(
            task=task,
            model=model_config["name"],
            model_args=_jsonable(dict(model_config["args"])),
            train=_jsonable(cfg.to_dict()),
            imgsz=cfg.imgsz if isinstance(cfg.imgsz, int) else list(cfg.imgsz),
            extra=_jsonable(extra),
            **_jsonable(known),
        )

    @property
    def train_config(self) -> TrainConfig:
        return TrainConfig(**self.train)

    def to_metadata(self) -> dict[str, Any]:
        """The flat mapping stored in weights metadata (the keys every reader of cnnkit files knows)."""
        out = {
            k: v
            for k, v in dataclasses.asdict(self).items()
            if k not in ("model", "model_args", "train", "extra")
        }
        out["model_config"] = {"name": self.model, "args": self.model_args}
        out["train_config"] = self.train
        return _jsonable({**out, **self.extra})

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> RunRecord:
        """Read a record back from metadata, including files written before the record existed."""
        if "task" not in meta or "model_config" not in meta or "train_config" not in meta:
            raise CnnkitError("no cnnkit run record in this metadata (task, model_config, train_config)")
        names = {f.name for f in dataclasses.fields(cls)} - {"model", "model_args", "train", "extra"}
        values = {k: v for k, v in meta.items() if k in names}
        skip = names | _NOT_RECORD | {"model_config", "train_config"}
        extra = {k: v for k, v in meta.items() if k not in skip}
        config = meta["model_config"]
        return cls(
            model=config["name"],
            model_args=dict(config.get("args", {})),
            train=dict(meta["train_config"]),
            extra=extra,
            **values,
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunRecord:
        return cls(**json.loads(text))


def _jsonable(obj: Any) -> Any:
    """Tuples become lists (what JSON stores), so a record read back compares equal."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj
