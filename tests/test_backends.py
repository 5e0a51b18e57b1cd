"""Inference backends: every backend agrees with PyTorch fp32 on each task's tiny model, ``auto`` chooses,
records why and reuses its choice, int8 export round-trips within its accuracy bound, and a missing
runtime is named with what to install."""

from __future__ import annotations

import builtins
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch

import cnnkit
from cnnkit import backends
from cnnkit.data.images import is_image
from cnnkit.errors import CnnkitError
from cnnkit.workflows.common import Loaded, calibration_batches, load_task_model
from conftest import CliRun, write_every_task

QUICK = {"epochs": 1, "workers": 0, "quiet": True, "batch": 8, "plots": False}
TINY = {"backbone_args": {"width": 0.125}, "imgsz": 32}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Path, Path]]]:
    """Each task's tiny model trained one epoch on tiny built-in data: ``task -> (weights, data)``."""
    root = tmp_path_factory.mktemp("backends")
    with pytest.MonkeyPatch.context() as env:
        env.setenv(
            "CNNKIT_CACHE", str(root / "cache")
        )  # exported graphs and choices stay in the test's folder
        yield _train_each_task(root)


def _train_each_task(root: Path) -> dict[str, tuple[Path, Path]]:
    data = write_every_task(root)
    args: dict[str, dict[str, Any]] = {
        "classify": {"model": "resnet18", "model_args": {"width": 0.125}, "imgsz": 32, "epochs": 3},
        "detect": {**TINY, "imgsz": 64},
        "segment": {"model_args": {"base": 8}, "imgsz": 32},
        "localize": TINY,
        "landmarks": TINY,
    }
    out = {}
    for task, source in data.items():
        result = cnnkit.train(task, source, project=str(root / "runs"), **{**QUICK, **args[task]})
        out[task] = (Path(result.best), Path(source))
    return out


@pytest.mark.parametrize("task", ["classify", "detect", "segment", "localize", "landmarks"])
def test_every_backend_agrees_with_fp32(task: str, trained: dict[str, tuple[Path, Path]]) -> None:
    weights, source = trained[task]
    model, meta = load_task_model(weights, task)
    batches = calibration_batches(source, meta, count=16, batch=8)
    x = batches[0]
    assert x.shape[0] == 8 and x.shape[-1] == meta["imgsz"]
    with torch.inference_mode():
        reference = backends.outputs_of(model(x))
    cpu = torch.device("cpu")
    runs = ["eager-fp32", "eager", "onnxruntime", "openvino", "onnxruntime-int8", "openvino-int8"]
    for name in runs + (["compile"] if task == "classify" else []):
        run = backends.build(model, cpu, name, x, batches)
        for inputs in (x, x[:3]):  # another batch size: the graphs take any
            with torch.inference_mode():
                expected = reference if inputs is x else backends.outputs_of(model(inputs))
            error = backends.difference(backends.outputs_of(run(inputs)), expected)
            allowed = backends.TOLERANCE[backends.precision(name, cpu)]
            assert error <= allowed, (name, error, allowed)
    if task in ("segment", "detect"):  # another image size (a segmenter predicts at the image's own)
        run = backends.build(model, cpu, "onnxruntime", x, batches)
        wide = torch.randn(1, 3, 64, 96)
        with torch.inference_mode():
            assert (
                backends.difference(backends.outputs_of(run(wide)), backends.outputs_of(model(wide))) < 1e-4
            )
    # the task's own paths run every backend: val and predict
    fp32 = cnnkit.val(weights, backend="eager-fp32", workers=0)
    ort = cnnkit.val(weights, backend="onnxruntime", workers=0)
    for key, value in fp32.metrics.items():
        assert ort.metrics[key] == pytest.approx(value, rel=1e-3, abs=1e-3), key
    image = next(p for p in sorted(source.rglob("*")) if is_image(p) and "mask" not in str(p))
    got = cnnkit.load(weights, backend="openvino")(str(image))
    assert got and got[0].data["path"] == str(image)


def test_auto_chooses_records_why_and_reuses_its_choice(
    trained: dict[str, tuple[Path, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    weights, _ = trained["classify"]
    model, _ = load_task_model(weights, "classify")
    x = torch.randn(4, 3, 32, 32)
    run, choice = backends.choose(model, torch.device("cpu"), x)
    assert choice.backend in choice.ms and choice.ms[choice.backend] == min(choice.ms.values())
    assert "fastest at input [4, 3, 32, 32]" in choice.why and choice.backend in choice.why
    for name, ms in choice.ms.items():  # only backends that agree with fp32 were timed
        assert (
            ms > 0 and choice.diff[name] <= backends.TOLERANCE[backends.precision(name, torch.device("cpu"))]
        )
    assert choice.left_out.get("tensorrt") == "not installed"
    recorded = json.loads((backends.cache_root() / "choices.json").read_text())
    assert any(v["backend"] == choice.backend and v["why"] == choice.why for v in recorded.values())

    def no_timing(*args: Any, **kwargs: Any) -> float:
        raise AssertionError("a cached choice is not timed again")

    monkeypatch.setattr(backends, "time_ms", no_timing)
    again, second = backends.choose(model, torch.device("cpu"), x)
    assert second.backend == choice.backend
    assert backends.difference(backends.outputs_of(again(x)), backends.outputs_of(run(x))) < 0.05
    loaded = Loaded.of(weights, "classify", backend="eager")  # the default path is untouched
    assert loaded.prepared.model.__class__.__name__ != "RuntimeModel"


def test_int8_export_round_trips_within_its_accuracy_bound(
    trained: dict[str, tuple[Path, Path]], cnnkit_cli: CliRun, tmp_path: Path
) -> None:
    weights, source = trained["classify"]
    out = tmp_path / "digits.onnx"
    proc = cnnkit_cli("export", "--weights", str(weights), "--out", str(out), "--int8", "--calib",
                      str(source / "train"), cwd=tmp_path)  # fmt: skip
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith(f"{tmp_path / 'digits.int8.onnx'} (int8): top1 "), proc.stdout
    int8, fp32 = (float(v) for v in line.split("top1 ")[1].split(" in fp32")[0].split(" vs "))
    assert fp32 - int8 <= 0.02, line  # the bound is 1 point on real data; 2 on 1 epoch of digits
    graph = onnx.load(str(tmp_path / "digits.int8.onnx"))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.graph.node}
    meta = {p.key: p.value for p in graph.metadata_props}
    assert "cnnkit.task" in meta or any(k.startswith("cnnkit") for k in meta)
    predictor = cnnkit.load(tmp_path / "digits.int8.onnx")  # the file is a model cnnkit runs
    image = next(iter(sorted((source / "val").rglob("*.png"))))
    assert predictor(str(image))[0].data["topk"]
    refused = cnnkit_cli("export", "--weights", str(weights), "--int8", cwd=tmp_path, ok=False)
    assert refused.returncode != 0 and "--calib DATA" in refused.stderr


def test_a_missing_runtime_is_named_and_auto_skips_it(
    trained: dict[str, tuple[Path, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    weights, _ = trained["localize"]
    model, _ = load_task_model(weights, "localize")
    real_import = builtins.__import__

    def without_openvino(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.split(".")[0] == "openvino":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_openvino)
    with pytest.raises(CnnkitError, match=r"pip install 'cnnkit\[openvino\]'"):
        backends.build(model, torch.device("cpu"), "openvino", torch.randn(1, 3, 32, 32))
    with pytest.raises(CnnkitError, match="--calib DATA"):
        backends.build(model, torch.device("cpu"), "onnxruntime-int8", torch.randn(1, 3, 32, 32))
    _, choice = backends.choose(model, torch.device("cpu"), torch.randn(2, 3, 32, 32))
    assert choice.left_out["openvino"] == "not installed" and choice.backend != "openvino"


def test_backend_flag_on_the_command_line(trained: dict[str, tuple[Path, Path]], cnnkit_cli: CliRun,
                                          tmp_path: Path) -> None:  # fmt: skip
    weights, source = trained["segment"]
    val = cnnkit_cli("val", "segment", "--weights", str(weights), "--backend", "openvino", "--json",
                     "--workers", "0", cwd=tmp_path)  # fmt: skip
    assert json.loads(val.stdout)["metrics"]["miou"] >= 0
    image = next(p for p in sorted((source / "images").rglob("*")) if is_image(p))
    pred = cnnkit_cli("predict", "segment", str(image), "--weights", str(weights), "--backend", "auto",
                      cwd=tmp_path)  # fmt: skip
    assert str(image) in pred.stdout
    bad = cnnkit_cli("predict", "segment", str(image), "--weights", str(weights), "--backend", "nope",
                     cwd=tmp_path, ok=False)  # fmt: skip
    assert bad.returncode != 0 and "openvino" in bad.stderr and "Traceback" not in bad.stderr


def test_calibration_takes_images_not_masks(trained: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    """Images of the data, masks left out, even below a folder of the user's own named like masks."""
    weights, source = trained["segment"]
    _, meta = load_task_model(weights, "segment")
    copy = tmp_path / "gt" / "scenes"  # 'gt' is a mask-folder name; here it is the user's own folder
    shutil.copytree(source, copy)
    images = [p for p in (copy / "images").rglob("*") if is_image(p)]
    batches = calibration_batches(copy, meta, count=1000, batch=5)
    assert sum(len(b) for b in batches) == len(images) and all(len(b) <= 5 for b in batches)
    assert batches[0].shape[1:] == (3, meta["imgsz"], meta["imgsz"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CnnkitError, match="no images to calibrate"):
        calibration_batches(tmp_path / "empty", meta)
