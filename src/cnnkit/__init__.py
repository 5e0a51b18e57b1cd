"""cnnkit: convolutional networks on PyTorch, from convolution arithmetic to trained, exported models.

```python
import cnnkit
result = cnnkit.train("classify", data="data/digits", model="resnet18", epochs=5, imgsz=64)
report = cnnkit.val(result.best)                     # the validation split the run used
model = cnnkit.load(result.best)
model("photo.jpg")[0].topk                           # paths, folders, globs, PIL, numpy, tensors
```
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cnnkit.api import (
    LoadReport,
    create_model,
    import_keras,
    list_models,
    load_model,
    load_weights,
    save_weights,
)
from cnnkit.errors import CnnkitError, DataError, WeightsError

if TYPE_CHECKING:
    from cnnkit.engine.trainer import FitResult
    from cnnkit.workflows.predictor import Predictor
    from cnnkit.workflows.spec import ValReport

__version__ = "0.1.0"

__all__ = [
    "CnnkitError",
    "DataError",
    "LoadReport",
    "WeightsError",
    "__version__",
    "create_model",
    "import_keras",
    "list_models",
    "load",
    "load_model",
    "load_weights",
    "save_weights",
    "train",
    "val",
]


def train(task: str, data: str | os.PathLike[str] | None = None, **options: Any) -> FitResult:
    """Train ``task`` (``"classify"``, ``"detect"``, ``"segment"``, ``"localize"``, ``"landmarks"``) on
    ``data`` with the command line's options as keywords: the task's (``model=``, ``freeze=``...) and
    the training's (``epochs=``, ``imgsz=``, ``lr=``...), plus ``project=``, ``name=``, ``callbacks=``."""
    from cnnkit.workflows import run

    return run.train(task, data, **options)


def val(
    weights: str | os.PathLike[str], data: str | os.PathLike[str] | None = None, **options: Any
) -> ValReport:
    """Evaluate ``weights`` on ``data`` (default: the validation split their training used); keywords:
    the task's val options (``conf=``, ``iou=``...) and ``batch=``, ``imgsz=``, ``device=``, ``out=``."""
    import dataclasses

    from cnnkit.weights import read_metadata, task_of
    from cnnkit.workflows import run
    from cnnkit.workflows.spec import get_task

    spec = get_task(task_of(read_metadata(weights)))
    fields = {f.name for f in dataclasses.fields(spec.ValOptions)} if spec.ValOptions else set()
    chosen = {k: options.pop(k) for k in list(options) if k in fields}
    given = spec.ValOptions(**chosen) if spec.ValOptions is not None else None
    return run.val(weights, data, options=given, **options)


def load(
    weights: str | os.PathLike[str],
    device: str = "auto",
    fast: bool = True,
    *,
    tta: Any = False,
    ensemble: Sequence[str | os.PathLike[str]] = (),
    backend: str | None = None,
    calib: str | os.PathLike[str] | None = None,
) -> Predictor:
    """A predictor for trained ``weights`` of any task (``.safetensors``, or an exported ``.onnx``): call it
    on images (see :class:`cnnkit.workflows.predictor.Predictor`). ``tta``: True (mirror) or a
    :class:`~cnnkit.tasks.base.TTA`; ``ensemble``: more weights combined with these; ``backend``: what runs
    the model (:mod:`cnnkit.backends`: ``auto``, ``onnxruntime``, ``openvino``...)."""
    from cnnkit.workflows.predictor import Predictor

    return Predictor(weights, device, fast, tta=tta, ensemble=ensemble, backend=backend, calib=calib)
