"""The notebook front door: ``cnnkit.train`` / ``val`` with plain keywords, ``cnnkit.load`` predicting on
paths, PIL images, numpy arrays and tensors alike, and result objects that draw and save themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cnnkit
from cnnkit.data import builtin
from cnnkit.data.scenes import write_scenes

QUICK = {"epochs": 1, "workers": 0, "quiet": True, "batch": 8}


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("api")
    data = builtin.write_classification(root / "digits", classes=(0, 1, 2), size_range=(28, 36), seed=0)
    result = cnnkit.train(
        "classify",
        data,
        model="resnet18",
        model_args={"width": 0.25},
        imgsz=32,
        project=root / "runs",
        **QUICK,
    )
    return result.best, next((data / "val" / "two").iterdir())


def test_train_and_val_take_plain_keywords(classifier: tuple[Path, Path]) -> None:
    weights, _ = classifier
    report = cnnkit.val(weights, workers=0)
    assert {"top1", "top5", "val_loss"} <= set(report.metrics)
    with pytest.raises(cnnkit.CnnkitError, match="epochz"):
        cnnkit.train("classify", "x", epochz=3)


def test_every_kind_of_image_gives_the_same_prediction(classifier: tuple[Path, Path]) -> None:
    weights, path = classifier
    model = cnnkit.load(weights)
    pil = Image.open(path).convert("RGB")
    array = np.asarray(pil)
    sources = [
        path,
        str(path),
        pil,
        array,
        array.astype(np.float32) / 255,
        torch.from_numpy(array.copy()).permute(2, 0, 1),
    ]
    results = model(sources, topk=2)
    assert len(results) == len(sources)
    first = results[0].topk
    assert first is not None and len(first) == 2
    for r in results[1:]:
        assert r.topk is not None and [c for c, _ in r.topk] == [c for c, _ in first]
        assert r.topk[0][1] == pytest.approx(first[0][1], abs=2e-3)
    assert results[2].path == "image2" and results[0].labels == [first[0][0]]


def test_a_predictor_reads_its_weights_once(
    classifier: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Calling a predictor again (a notebook loop) does not load the weights again."""
    from cnnkit.workflows import common

    weights, path = classifier
    loads = []
    real = common.load_task_model
    monkeypatch.setattr(common, "load_task_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    model = cnnkit.load(weights)
    first = [model(path)[0].topk for _ in range(3)]
    assert len(loads) == 1 and first[0] == first[1] == first[2]


def test_a_result_draws_and_saves_itself(classifier: tuple[Path, Path], tmp_path: Path) -> None:
    weights, path = classifier
    (result,) = cnnkit.load(weights)(path)
    picture = result.plot()
    assert max(picture.size) >= 256
    assert result._repr_png_().startswith(b"\x89PNG")
    saved = result.save(tmp_path / "drawn.jpg")
    with Image.open(saved) as im:
        assert im.format == "JPEG"
    with pytest.raises(cnnkit.CnnkitError, match="overwrite the input"):
        result.save(path)
    assert result.to_json()["topk"][0]["class"] == result.labels[0]


def test_not_an_image_is_one_clear_error(classifier: tuple[Path, Path]) -> None:
    weights, _ = classifier
    with pytest.raises(cnnkit.DataError, match=r"image0: an image is \[H, W\]"):
        cnnkit.load(weights)(np.zeros((2, 5, 5, 5), dtype=np.uint8))
    with pytest.raises(
        cnnkit.DataError, match=r"image0: a float image must hold values in \[0, 1\], not \[0, 191\]"
    ):
        cnnkit.load(weights)(np.arange(192.0).reshape(8, 8, 3))
    with pytest.raises(cnnkit.DataError, match="not an image"):
        cnnkit.load(weights)([{"a": 1}])
    with pytest.raises(cnnkit.CnnkitError, match=r"classify predictions: unknown keys \['conf'\]"):
        cnnkit.load(weights)(np.zeros((8, 8, 3), dtype=np.uint8), conf=0.5)


def test_detection_segmentation_and_landmark_results(tmp_path: Path) -> None:
    det = builtin.write_detection(tmp_path / "det", n_train=16, n_val=4, seed=0)
    tiny = {"backbone_args": {"width": 0.25}, "strides": (8, 16), "imgsz": 64, "project": tmp_path / "runs"}
    weights = cnnkit.train("detect", det, **tiny, **QUICK).best
    image = np.asarray(Image.open(sorted((det / "images" / "val").iterdir())[0]).convert("RGB"))
    (r,) = cnnkit.load(weights)(image, conf=0.0, max_det=5)
    assert r.boxes is not None and r.scores is not None
    assert r.boxes.shape == (5, 4) and r.scores.shape == (5,) and len(r.labels) == 5
    assert float(r.boxes[:, 2].max()) <= image.shape[1] and r.plot().size[0] >= image.shape[1]

    scenes = write_scenes(tmp_path / "scenes", n_train=6, n_val=2, size=(40, 56))
    weights = cnnkit.train("segment", scenes, imgsz=64, project=tmp_path / "runs", **QUICK).best
    (r,) = cnnkit.load(weights)(sorted((scenes / "images" / "val").iterdir())[0])
    assert r.mask is not None and r.mask.shape == (40, 56) and r.plot().size[0] >= 56

    kites = builtin.write_landmarks(tmp_path / "kites", n_train=8, n_val=2, seed=0)
    weights = cnnkit.train("landmarks", kites, imgsz=64, project=tmp_path / "runs", **QUICK).best
    (r,) = cnnkit.load(weights)(torch.zeros(3, 48, 64, dtype=torch.uint8))
    assert r.points is not None and r.points.shape == (4, 2)


@pytest.mark.parametrize("task", ["classify", "detect", "segment", "localize", "landmarks"])
def test_an_exported_onnx_file_predicts_as_its_weights(task: str, tmp_path: Path) -> None:
    """The export stores the weights' metadata in the graph (class names, input size, normalisation,
    outputs), so ``cnnkit.load(model.onnx)`` predicts like the weights it came from (fp32 both)."""
    pytest.importorskip("onnxruntime")
    from cnnkit.export import export
    from cnnkit.weights import read_metadata

    writers = {
        "classify": lambda root: builtin.write_classification(root, classes=(0, 1, 2), size_range=(28, 36)),
        "detect": lambda root: builtin.write_detection(root, n_train=16, n_val=4, seed=0),
        "segment": lambda root: write_scenes(root, n_train=6, n_val=2, size=(40, 56)),
        "localize": lambda root: builtin.write_localization(root, n_train=12, n_val=4, seed=0),
        "landmarks": lambda root: builtin.write_landmarks(root, n_train=8, n_val=4, seed=0),
    }
    extra = {"detect": {"backbone_args": {"width": 0.25}, "strides": (8, 16)}}.get(task, {})
    data = writers[task](tmp_path / "data")
    weights = cnnkit.train(task, data, imgsz=64, project=tmp_path / "runs", **extra, **QUICK).best
    onnx_file = export(weights, "onnx", out=tmp_path / "model.onnx").path
    meta = read_metadata(onnx_file)
    assert meta["task"] == task and meta["class_names"] == read_metadata(weights)["class_names"]
    images = sorted(p for p in data.rglob("*") if p.suffix in (".png", ".jpg"))[:3]
    options = {"conf": 0.0001, "max_det": 10} if task == "detect" else {}
    if task in ("classify", "segment", "localize", "landmarks"):  # val takes the exported graph too
        fp32 = cnnkit.val(weights, workers=0, fast=False).metrics
        assert cnnkit.val(onnx_file, workers=0).metrics == pytest.approx(fp32, abs=2e-3)
    ours = cnnkit.load(weights, fast=False)(images, **options)
    theirs = cnnkit.load(onnx_file)(images, **options)
    for a, b in zip(ours, theirs, strict=True):
        if task == "classify":
            assert a.topk is not None and b.topk is not None
            assert [c for c, _ in a.topk] == [c for c, _ in b.topk]
            assert a.topk[0][1] == pytest.approx(b.topk[0][1], abs=1e-3)
        elif task == "detect":
            assert (
                a.boxes is not None and b.boxes is not None and a.scores is not None and b.scores is not None
            )
            torch.testing.assert_close(b.scores, a.scores, atol=1e-3, rtol=1e-3)
            torch.testing.assert_close(b.boxes, a.boxes, atol=0.05, rtol=1e-3)
        elif task == "segment":
            assert a.mask is not None and b.mask is not None and (a.mask == b.mask).mean() > 0.99
        elif task == "localize":
            assert a.data["class"] == b.data["class"] and a.data["box"] == pytest.approx(
                b.data["box"], abs=0.05
            )
        else:
            assert a.points is not None and b.points is not None
            torch.testing.assert_close(b.points, a.points, atol=0.05, rtol=1e-3)
