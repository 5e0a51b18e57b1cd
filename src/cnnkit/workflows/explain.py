"""``cnnkit explain --weights W IMAGES...``: where a model looked. Grad-CAM or Grad-CAM++ heat maps
(:mod:`cnnkit.cam`) of the predicted class of a classifier, of a localizer's class score, and of each
detected box's class score, drawn over the network's input (what the model saw: the centre crop of a
classifier, the letterboxed image of a detector).

```python
from cnnkit.workflows.explain import explain
for e in explain("best.safetensors", ["img.png"], out="runs/explain"):
    print(e.path, e.target, e.drawn)      # e.heat: [H, W] in [0, 1] per explained target
```
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnkit.cam import CAM, Method, overlay
from cnnkit.data.images import Frame, OutputNames, iter_frames
from cnnkit.engine.device import select_device
from cnnkit.errors import CnnkitError
from cnnkit.ops.yolo import decode_outputs
from cnnkit.tasks.base import to_uint8
from cnnkit.viz import Shown, draw_tile, save_grid
from cnnkit.weights import read_metadata, task_of
from cnnkit.workflows.common import classifier_transform, load_task_model, preprocess
from cnnkit.workflows.detect import detection_task, detector_input

EXPLAINED = ("classify", "localize", "detect")


@dataclass
class Target:
    """One explained score: what it is (``"seven 0.93"``, ``"box 1: cat 0.88"``), its heat map over the
    network input ``[H, W]`` in ``[0, 1]``, and the box it belongs to (detection, input pixels)."""

    label: str
    heat: torch.Tensor
    box: torch.Tensor | None = None
    class_index: int = 0
    score: float = 0.0


@dataclass
class Explained:
    path: str
    image: torch.Tensor  # the network input, [3, H, W] uint8
    targets: list[Target] = field(default_factory=list)
    drawn: str | None = None


def explain(
    weights: str | os.PathLike[str],
    sources: Sequence[str | os.PathLike[str]],
    *,
    method: Method = "gradcam",
    layer: str | None = None,
    target_class: str | None = None,
    max_boxes: int = 5,
    conf: float = 0.25,
    out: str | os.PathLike[str] | None = None,
    device: str = "cpu",
) -> Iterator[Explained]:
    """Heat maps of ``weights``' scores on each image of ``sources`` (files, folders, globs, videos).
    ``target_class``: explain this class instead of the predicted one (classifiers, localizers);
    ``max_boxes``/``conf``: the detections explained; ``out``: where the pictures go."""
    task = task_of(read_metadata(weights))
    if task not in EXPLAINED:
        raise CnnkitError(f"explain works on {', '.join(EXPLAINED)} models; {weights} is a {task} model")
    model, meta = load_task_model(weights, task)
    dev = select_device(device)
    model = model.float().to(dev)
    names: list[str] = list(meta.get("class_names") or [])
    forced = _class_index(names, target_class) if target_class is not None else None
    cam = CAM(model, layer, method)
    inputs = _inputs(task, meta)
    names_out = OutputNames(None if out is None else Path(out))
    for frame in iter_frames(sources):
        x = inputs(frame).to(dev)
        if task == "detect":
            targets = _boxes(model, cam, x, names, meta, max_boxes, conf)
        else:
            targets = [_whole_image(model, cam, x, names, task, forced)]
        result = Explained(frame.name, to_uint8(x, meta["mean"], meta["std"])[0], targets)
        if out is not None:
            result.drawn = str(_draw(result, names, names_out.path(frame, ".jpg"), method))
        yield result


def _class_index(names: Sequence[str], name: str) -> int:
    if name in names:
        return list(names).index(name)
    if name.isdigit() and int(name) < max(len(names), 1):
        return int(name)
    raise CnnkitError(f"--class {name!r} is not one of the model's classes {list(names)}")


def _inputs(task: str, meta: dict[str, Any]) -> Callable[[Frame], torch.Tensor]:
    """The network input of a frame, prepared as the task's predict does: ``[1, 3, H, W]``."""
    imgsz = meta.get("imgsz", 224)
    if task == "classify":
        transform = classifier_transform(meta)
        return lambda frame: transform(frame.image)[None]
    if task == "detect":
        return lambda frame: detector_input(frame.image, int(imgsz), meta)[0]
    return lambda frame: preprocess(frame.image, imgsz if isinstance(imgsz, int) else tuple(imgsz), meta)


def _whole_image(
    model: nn.Module, cam: CAM, x: torch.Tensor, names: Sequence[str], task: str, forced: int | None
) -> Target:
    """A classifier's class logit, or a localizer's class logit (its objectness with one class)."""
    with torch.no_grad():
        y = model(x).float()
    if task == "classify":
        probs = y.softmax(1)[0]
        k = int(probs.argmax()) if forced is None else forced
        score, column = float(probs[k]), k
    elif len(names) > 1:
        probs = y[0, 5:].softmax(0)
        k = int(probs.argmax()) if forced is None else forced
        score, column = float(probs[k]), 5 + k
    else:
        k, score, column = 0, float(y[0, 0].sigmoid()), 0
    heat = cam(x, lambda out: out[:, column])
    assert isinstance(heat, torch.Tensor)
    name = names[k] if k < len(names) else str(k)
    return Target(f"{name} {score:.2f}", heat[0].cpu(), None, k, score)


def _boxes(
    model: nn.Module,
    cam: CAM,
    x: torch.Tensor,
    names: Sequence[str],
    meta: dict[str, Any],
    max_boxes: int,
    conf: float,
) -> list[Target]:
    """One heat map per detected box (the best ``max_boxes`` above ``conf``): the gradient of that box's
    own score (objectness x class probability at the cell and anchor that predicted it)."""
    task = detection_task(model, list(names))
    anchors, strides = task.anchors.to(x.device), task.strides
    with torch.no_grad():
        outputs = model(x)
        boxes, scores = decode_outputs([o.float() for o in outputs], anchors, strides)
    det = task.postprocess(outputs, conf=conf, iou=0.45, max_det=max_boxes)[0]
    targets = []
    for i, (box, score, label) in enumerate(zip(det.boxes, det.scores, det.labels.tolist())):
        # the prediction this box came from: the one with its box and its score for its class
        gap = (boxes[0] - box).abs().sum(1) + (scores[0, :, label] - score).abs()
        n = int(gap.argmin())

        def own_score(out: Any, n: int = n, label: int = label) -> torch.Tensor:
            return decode_outputs([o.float() for o in out], anchors, strides)[1][:, n, label]

        heat = cam(x, own_score)
        assert isinstance(heat, torch.Tensor)
        name = names[label] if label < len(names) else str(label)
        targets.append(
            Target(f"box {i + 1}: {name} {float(score):.2f}", heat[0].cpu(), box.cpu(), label, float(score))
        )
    return targets


def _draw(result: Explained, names: Sequence[str], path: Path, method: Method) -> Path:
    """The input, then one heat map per target (with its box for detection)."""
    tiles = [draw_tile(Shown(result.image, caption="input"), names)]
    for t in result.targets:
        boxes = None if t.box is None else t.box[None]
        shown = Shown(
            overlay(result.image, t.heat), [t.class_index], boxes, [t.score], caption=f"{method}: {t.label}"
        )
        tiles.append(draw_tile(shown, names))
    if not result.targets:
        tiles.append(draw_tile(Shown(result.image, caption="no detection to explain"), names))
    return save_grid(tiles, path, cols=min(len(tiles), 3))
