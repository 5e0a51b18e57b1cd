"""Experiment tracking as callbacks: TensorBoard and MLflow (``--log tensorboard,mlflow``; results.csv is
always written). Each is an optional extra: ``pip install 'cnnkit[tensorboard]'`` / ``'cnnkit[mlflow]'``.

* TensorBoard: the scalars of every epoch (training and validation, the learning rate), the pictures
  (``train_batch*``, ``val_pred`` as they are drawn) and the model's graph where it traces, under
  ``RUN/tensorboard/`` — ``tensorboard --logdir runs``.
* MLflow: the run's options and training configuration as parameters, the metrics of every epoch, and
  at the end ``results.csv``, every picture of the run and the best weights as artifacts. It logs to
  ``MLFLOW_TRACKING_URI`` when set, else to a local ``mlruns/`` folder (MLflow's file store, allowed
  explicitly: it works offline and needs no database), experiment ``cnnkit-TASK``.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cnnkit.engine.callbacks import Callback, FitState
from cnnkit.errors import CnnkitError

log = logging.getLogger("cnnkit")


def _needs(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise CnnkitError(f"--log {extra} needs {extra}: pip install 'cnnkit[{extra}]'") from None


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if k != "epoch" and isinstance(v, int | float)}


def _tag(key: str) -> str:
    """``train_loss`` -> ``train/loss``; ``val_loss`` and metrics -> ``val/...``; ``lr``, ``time`` as is."""
    if key.startswith("train_"):
        return "train/" + key.removeprefix("train_")
    return key if key in ("lr", "time") else "val/" + key.removeprefix("val_")


class TensorBoardLogger(Callback):
    """Every epoch's scalars to ``RUN/tensorboard`` (main process only)."""

    def __init__(self) -> None:
        _needs("tensorboard", "tensorboard")
        self.writer: Any = None
        self.graphed = False

    def on_fit_start(self, state: FitState) -> None:
        if state.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(state.run_dir / "tensorboard"), purge_step=state.epoch + 1)

    def after_step(self, state: FitState) -> None:
        if self.writer is not None and not self.graphed and state.batch is not None:
            self.graphed = True
            self._add_graph(state)

    def _add_graph(self, state: FitState) -> None:
        """The model's graph, traced on one input image by a copy in eval mode (tracing the training
        model would update its BatchNorm statistics); a model that does not trace is said and skipped."""
        import copy

        import torch

        model = state.eval_model
        inputs = state.batch[0] if isinstance(state.batch, list | tuple) else state.batch
        if model is None or not isinstance(inputs, torch.Tensor):
            return
        try:
            twin = copy.deepcopy(model).eval()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the tracer's warnings about Python control flow
                self.writer.add_graph(twin, inputs[:1].detach().float(), use_strict_trace=False)
        except Exception as exc:  # any tracing failure: the graph is optional
            log.info("TensorBoard: the model graph was not traced (%s: %s)", type(exc).__name__, exc)

    def on_epoch_end(self, state: FitState) -> None:
        if self.writer is not None:
            for key, value in _scalars(state.metrics).items():
                self.writer.add_scalar(_tag(key), value, state.epoch)
            for name, path in state.pictures.items():
                self.writer.add_image(f"pictures/{name}", _pixels(path), state.epoch, dataformats="HWC")
            state.pictures.clear()
            self.writer.flush()

    def on_fit_end(self, state: FitState) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class MLflowLogger(Callback):
    """Parameters, every epoch's metrics and the run's files to MLflow (main process only)."""

    def __init__(self) -> None:
        self.mlflow = _needs("mlflow", "mlflow")
        self.run: Any = None

    def on_fit_start(self, state: FitState) -> None:
        if not state.is_main:
            return
        mlflow = self.mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # a local folder, as documented
            mlflow.set_tracking_uri(Path("mlruns").resolve().as_uri())
        mlflow.set_experiment(f"cnnkit-{state.metadata.get('task', 'run')}")
        self.run = mlflow.start_run(run_name=state.run_dir.name)
        params = {**(state.metadata.get("train_config") or {}), **(state.metadata.get("options") or {})}
        if state.metadata.get("model_config"):
            params["model"] = state.metadata["model_config"].get("name")
        mlflow.log_params({k: json.dumps(v) if not isinstance(v, str) else v for k, v in params.items()})

    def on_epoch_end(self, state: FitState) -> None:
        if self.run is not None:
            self.mlflow.log_metrics(_scalars(state.metrics), step=state.epoch)

    def on_fit_end(self, state: FitState) -> None:
        if self.run is None:
            return
        pictures = sorted(p.name for p in state.run_dir.glob("*") if p.suffix in (".png", ".jpg"))
        for name in ("results.csv", *pictures, "weights/best.safetensors"):
            path = state.run_dir / name
            if path.is_file():
                self.mlflow.log_artifact(str(path), artifact_path=str(Path(name).parent).strip("."))
        self.mlflow.end_run()
        self.run = None


def _pixels(path: Path) -> Any:
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def make_loggers(names: Sequence[str]) -> list[Callback]:
    """The callbacks of ``--log`` names (``csv`` is always on: the engine writes results.csv)."""
    made: list[Callback] = []
    if "tensorboard" in names:
        made.append(TensorBoardLogger())
    if "mlflow" in names:
        made.append(MLflowLogger())
    return made
