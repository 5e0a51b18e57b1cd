"""Experiment tracking: the TensorBoard event file holds every epoch's scalars (read back with
TensorBoard's own event reader) and an MLflow run in a temporary store reads back with its parameters,
metrics per epoch and artifacts."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from cnnkit.engine import fit
from cnnkit.errors import CnnkitError
from cnnkit.tasks.classify import ClassificationTask
from test_engine import CFG, blobs, tiny_model


def test_tensorboard_scalars_of_every_epoch(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = CFG.replace(log=("tensorboard",), plots=True)
    result = fit(ClassificationTask(2), tiny_model(), blobs(32), blobs(16, 1), cfg, tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "val/loss", "val/top1", "lr"} <= set(tags)
    top1 = [(e.step, e.value) for e in events.Scalars("val/top1")]
    assert [s for s, _ in top1] == [1, 2, 3]
    assert top1[-1][1] == pytest.approx(result.history[-1]["top1"], rel=1e-6)
    # the pictures as drawn (the training batches once, the validation predictions at least at the end)
    assert {"pictures/train_batch0", "pictures/val_pred"} <= set(events.Tags()["images"])
    shown = events.Images("pictures/val_pred")[-1]
    assert shown.step == 3 and shown.width > 100
    with Image.open(tmp_path / "val_pred.jpg") as im:
        assert (shown.width, shown.height) == im.size
    assert events.Tags()["graph"]  # the model traced


def test_mlflow_run_reads_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # the default store: ./mlruns
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    metadata = {"task": "classify", "options": {"model": "resnet18"}, "train_config": CFG.to_dict()}
    cfg = CFG.replace(log=("mlflow",), plots=True)
    fit(
        ClassificationTask(2), tiny_model(), blobs(32), blobs(16, 1), cfg, tmp_path / "run", metadata=metadata
    )
    client = MlflowClient((tmp_path / "mlruns").as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "cnnkit-classify"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["model"] == "resnet18" and run.data.params["epochs"] == "3"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "top1")] == [1, 2, 3]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results.csv", "weights", "results.png", "val_pred.jpg", "train_batch0.jpg"} <= artifacts


def test_an_unknown_logger_is_refused() -> None:
    with pytest.raises(CnnkitError, match=r"unknown loggers \['wandb'\]"):
        CFG.replace(log=("wandb",))
