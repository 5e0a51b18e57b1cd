"""The notebook front door: ``cnnkit.load(weights)`` gives a predictor for any task, called on paths,
folders, globs, PIL images, numpy arrays or tensors (or a list of them), returning :class:`Result`
objects that draw themselves.

```python
import cnnkit
model = cnnkit.load("runs/detect/exp/weights/best.safetensors")
(r,) = model(pil_image, conf=0.5)
r.boxes, r.scores, r.labels          # detection; .topk, .mask, .points for the other tasks
r.plot()                             # a PIL image (shown as is in Jupyter), r.save("out.jpg"), r.to_json()
```
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cnnkit.data.images import iter_frames
from cnnkit.engine.config import config_from_dict
from cnnkit.errors import CnnkitError
from cnnkit.io import atomic_path
from cnnkit.tasks.base import TTA
from cnnkit.viz import Shown, draw_tile
from cnnkit.weights import read_metadata, task_of
from cnnkit.workflows import run
from cnnkit.workflows.common import Loaded
from cnnkit.workflows.spec import get_task


@dataclass
class Result:
    """One image's prediction: ``data`` is what ``predict --json`` prints for it; the properties give the
    task's outputs as tensors and lists."""

    task: str
    path: str
    image: torch.Tensor  # [3, H, W] uint8, the image as given
    data: dict[str, Any]
    names: list[str] = field(default_factory=list)
    arrays: dict[str, Any] = field(default_factory=dict)

    @property
    def topk(self) -> list[tuple[str, float]] | None:
        """Classification: ``(class, probability)``, most likely first."""
        return [(t["class"], t["prob"]) for t in self.data["topk"]] if self.task == "classify" else None

    @property
    def boxes(self) -> torch.Tensor | None:
        """Detection and localization: ``[n, 4]`` xyxy pixels of the image."""
        if self.task == "detect":
            xywh = torch.tensor([r["bbox"] for r in self.data["results"]], dtype=torch.float32).view(-1, 4)
            return torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
        if self.task == "localize":
            box = self.data.get("box")
            return torch.tensor([box], dtype=torch.float32) if box else torch.zeros(0, 4)
        return None

    @property
    def scores(self) -> torch.Tensor | None:
        if self.task == "detect":
            return torch.tensor([r["score"] for r in self.data["results"]], dtype=torch.float32)
        if self.task == "localize":
            return torch.tensor(
                [self.data["class_prob"]] if self.data.get("box") else [], dtype=torch.float32
            )
        return None

    @property
    def classes(self) -> list[int]:
        """Class indices: of each box, or the top class of a classification."""
        if self.task == "detect":
            return [int(r["category_id"]) for r in self.data["results"]]
        if self.task == "localize":
            return [self.names.index(self.data["class"])] if self.data.get("box") else []
        if self.task == "classify":
            return [self.names.index(self.data["topk"][0]["class"])]
        return []

    @property
    def labels(self) -> list[str]:
        """Class names of :attr:`classes`."""
        return [self.names[k] if k < len(self.names) else str(k) for k in self.classes]

    @property
    def mask(self) -> np.ndarray | None:
        """Segmentation: ``[H, W]`` class indices at the image's size."""
        return self.arrays.get("mask")

    @property
    def points(self) -> torch.Tensor | None:
        """Landmarks: ``[K, 2]`` x, y pixels of the image."""
        return torch.tensor(self.data["points"], dtype=torch.float32) if self.task == "landmarks" else None

    def to_json(self) -> dict[str, Any]:
        return dict(self.data)

    def plot(self) -> Image.Image:
        """The image with the prediction drawn, at the image's own size (its long side at least 256 px)."""
        topk = self.topk
        caption = ", ".join(f"{c} {p:.2f}" for c, p in topk[:3]) if topk else None
        shown = Shown(
            self.image,
            self.classes,
            self.boxes,
            None if self.scores is None else self.scores.tolist(),
            self.mask,
            self.points,
            caption=caption,
        )
        return draw_tile(shown, self.names, size=max(256, *self.image.shape[1:]))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`plot` (the format from the suffix); never onto the predicted image's own file."""
        target = Path(path)
        if Path(self.path).is_file() and target.resolve() == Path(self.path).resolve():
            raise CnnkitError(f"{target}: saving there would overwrite the input; choose another path")
        with atomic_path(target) as tmp:
            self.plot().save(tmp, format=Image.registered_extensions().get(target.suffix.lower(), "PNG"))
        return target

    def _repr_png_(self) -> bytes:  # Jupyter shows the drawn prediction
        buffer = io.BytesIO()
        self.plot().save(buffer, format="PNG")
        return buffer.getvalue()

    def __repr__(self) -> str:
        return f"Result({self.task}, {self.path!r}, {self.data})"


class Predictor:
    """Trained weights of any task (cnnkit ``.safetensors``, or the ``.onnx`` file ``cnnkit export`` wrote,
    run by ONNX Runtime), ready to predict (see the module's example). Keyword arguments of a call are the
    task's predict options (``conf=``, ``iou=``, ``topk=``...). ``fast``: the fast inference path
    (folded BatchNorm, reduced-precision autocast where the device has it); False: plain fp32.
    ``backend``: what runs it (:mod:`cnnkit.backends`: ``auto``, ``onnxruntime``, ``openvino``...);
    ``calib``: images an int8 backend calibrates on."""

    def __init__(
        self,
        weights: str | os.PathLike[str],
        device: str = "auto",
        fast: bool = True,
        *,
        tta: bool | TTA = False,
        ensemble: Sequence[str | os.PathLike[str]] = (),
        backend: str | None = None,
        calib: str | os.PathLike[str] | None = None,
    ) -> None:
        meta = read_metadata(weights)
        self.weights, self.device, self.fast = str(weights), device, fast
        self.task = task_of(meta)
        # loaded once, on the first call: later calls do not read the weights again
        self._load: dict[str, Any] = {"tta": tta, "ensemble": list(ensemble), "device": device, "fast": fast,
                                      "backend": backend, "calib": calib}  # fmt: skip
        self._loaded: Loaded | None = None
        self.spec = get_task(self.task)
        count = int((meta.get("args") or {}).get("num_classes") or 0)  # a plain model's classes are numbered
        self.names: list[str] = list(meta.get("class_names") or [str(i) for i in range(count)])
        self.metadata = meta

    def __call__(self, source: Any, **options: Any) -> list[Result]:
        items = list(source) if isinstance(source, list | tuple) else [source]
        frames = list(iter_frames(items))
        images = {f.name: f.image for f in frames}
        cls = self.spec.PredictOptions
        chosen = None if cls is None else config_from_dict(cls, options, f"{self.task} predictions")
        if options and cls is None:
            raise CnnkitError(f"{self.task} predictions take no options; got {sorted(options)}")
        if self._loaded is None:
            self._loaded = Loaded.of(self.weights, self.task, **self._load)
        results = []
        for record in run.predict(self.weights, frames, options=chosen, loaded=self._loaded):
            name = record.data["path"]
            results.append(Result(self.task, name, images[name], record.data, self.names, record.arrays))
        return results

    def __repr__(self) -> str:
        return f"Predictor({self.task}, {self.weights!r}, classes={self.names})"
