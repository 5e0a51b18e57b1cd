"""Keras Applications models imported: Keras 3 (torch backend) builds each with random weights, saves it,
and the cnnkit model must compute the same outputs from the same pixels."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

os.environ.setdefault("KERAS_BACKEND", "torch")  # no TensorFlow needed
keras = pytest.importorskip("keras")  # in the test extra; skipped only where it cannot be installed
import h5py  # noqa: E402

import cnnkit  # noqa: E402
from cnnkit.errors import WeightsError  # noqa: E402

apps = keras.applications
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Keras' own, on numpy 2


def _randomise(model: Any, seed: int = 0) -> None:
    """Random values for every variable, BatchNorm statistics and biases included (Keras builds them as
    0 and 1, which would hide a swapped mean and variance)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if hasattr(layer, "layers"):
            _randomise(layer, seed + 1)
            continue
        values = []
        for var in layer.weights:
            shape = tuple(var.shape)
            if not shape:
                values.append(np.asarray(var))
                continue
            positive = any(k in var.path for k in ("variance", "gamma"))
            v = rng.normal(0, 0.2, shape) + (1.0 if positive else 0.0)
            if len(shape) == 4:  # kernels: fan-in scaling keeps deep activations finite
                v = rng.normal(
                    0, 1.0 / np.sqrt(np.prod(shape[:-1]) if shape[-1] > 1 else np.prod(shape[:2])), shape
                )
            values.append(np.abs(v) if positive else v)
        if values:
            layer.set_weights([v.astype("float32") for v in values])


def _same_outputs(
    kmodel: Any, path: Path, size: int, prep: Callable[[np.ndarray], np.ndarray] = lambda v: v, **kw: Any
) -> torch.nn.Module:
    """Import ``path`` (saved from ``kmodel``) and check the outputs on the same pixels agree to 1e-4
    relative: Keras gets 0-255 pixels through its ``prep``, cnnkit [0, 1] pixels normalised as the
    imported model's ``pretrained_cfg`` says."""
    model = cnnkit.import_keras(path, **kw).eval()
    x = np.random.default_rng(1).random((2, size, size, 3)).astype("float32")
    expected = np.asarray(kmodel(prep(x * 255.0), training=False).detach().cpu())
    cfg = model.pretrained_cfg
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    t = (t - torch.tensor(cfg["mean"]).view(3, 1, 1)) / torch.tensor(cfg["std"]).view(3, 1, 1)
    with torch.no_grad():
        got = model(t).numpy()
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() / np.abs(expected).max() <= 1e-4
    return model


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_mobilenet_v2(tmp_path: Path, suffix: str) -> None:
    k = apps.MobileNetV2(weights=None, input_shape=(64, 64, 3), classes=7, classifier_activation=None)
    _randomise(k)
    k.save(tmp_path / f"m{suffix}")
    model = _same_outputs(k, tmp_path / f"m{suffix}", 64, apps.mobilenet_v2.preprocess_input)
    assert model.cnnkit_config == {
        "name": "mobilenet_v2", "args": {"tf_padding": True, "bn_eps": 1e-3, "num_classes": 7}
    }  # fmt: skip
    assert model.pretrained_cfg["mean"] == [0.5] * 3 and model.pretrained_cfg["std"] == [0.5] * 3
    assert model.pretrained_cfg["imgsz"] == 64


def test_mobilenet_v2_narrow_weights_alone(tmp_path: Path) -> None:
    """A ``.weights.h5`` file has no config: the width (alpha 0.5) comes from the tensors, the input from
    MobileNetV2's documented preprocess_input, and an odd input size pads like Keras."""
    k = apps.MobileNetV2(weights=None, alpha=0.5, include_top=False, input_shape=(67, 67, 3), pooling="avg")
    _randomise(k)
    k.save_weights(tmp_path / "m.weights.h5")
    model = _same_outputs(k, tmp_path / "m.weights.h5", 67, apps.mobilenet_v2.preprocess_input)
    assert model.cnnkit_config["args"]["width"] == 0.5 and model.cnnkit_config["args"]["num_classes"] == 0


def test_resnet50_v1_from_a_keras2_style_h5(tmp_path: Path) -> None:
    """Keras' ResNet50 is v1 (stride in the first 1x1), its convolutions carry biases (folded into the
    BatchNorms) and it takes BGR input less Caffe's means (folded into the first convolution)."""
    k = apps.ResNet50(weights=None, input_shape=(64, 64, 3), classes=5, classifier_activation=None)
    _randomise(k)
    k.save(tmp_path / "r.h5")
    model = _same_outputs(k, tmp_path / "r.h5", 64, apps.resnet50.preprocess_input)
    assert model.cnnkit_config["args"] == {"stride_in_1x1": True, "bn_eps": 1.001e-5, "num_classes": 5}
    assert model.pretrained_cfg["std"] == pytest.approx([1 / 255] * 3)


def test_vgg16_with_its_flattening_classifier(tmp_path: Path) -> None:
    """fc1 reads the 7x7x512 grid channels-last: its rows are reordered for torch's flatten."""
    k = apps.VGG16(weights=None, classes=5, classifier_activation=None)
    _randomise(k)
    k.save(tmp_path / "v.keras")
    model = _same_outputs(k, tmp_path / "v.keras", 224, apps.vgg16.preprocess_input)
    assert model.cnnkit_config["name"] == "vgg16"


@pytest.mark.parametrize("file", ["e.keras", "e.weights.h5"])
def test_efficientnet_b0_with_its_own_normalisation(tmp_path: Path, file: str) -> None:
    """EfficientNet normalises inside the model (Rescaling + a Normalization layer with stored mean and
    variance): they become the mean and std cnnkit normalises with, with or without the config."""
    k = apps.EfficientNetB0(weights=None, input_shape=(64, 64, 3), classes=5, classifier_activation=None)
    _randomise(k)
    norm = next(layer for layer in k.layers if type(layer).__name__ == "Normalization")
    norm.set_weights(
        [np.array([0.4, 0.5, 0.6], "float32"), np.array([0.04, 0.09, 0.01], "float32"), norm.get_weights()[2]]
    )
    (k.save if file.endswith(".keras") else k.save_weights)(tmp_path / file)
    model = _same_outputs(k, tmp_path / file, 64)
    assert model.pretrained_cfg["mean"] == pytest.approx([0.4, 0.5, 0.6], abs=1e-6)
    assert model.pretrained_cfg["std"] == pytest.approx([0.2, 0.3, 0.1], abs=1e-6)
    assert model.cnnkit_config["name"] == "efficientnet_b0"


@pytest.fixture(scope="module")
def course_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """The notes' transfer-learning model: augmentation, a Rescaling to [-1, 1], MobileNetV2 without its
    top (nested), pooling, dropout and one Dense output."""
    layers = keras.layers
    base = apps.MobileNetV2(weights=None, include_top=False, input_shape=(48, 48, 3))
    inputs = keras.Input((48, 48, 3))
    x = layers.RandomFlip("horizontal")(inputs)
    x = layers.Rescaling(1 / 127.5, offset=-1)(x)
    x = base(x, training=False)
    x = layers.Dropout(0.2)(layers.GlobalAveragePooling2D()(x))
    k = keras.Model(inputs, layers.Dense(3)(x))
    _randomise(k)
    path = tmp_path_factory.mktemp("course") / "course.keras"
    k.save(path)
    return k, path


def test_a_nested_backbone_with_its_own_head_and_rescaling(
    course_model: tuple[Any, Path], tmp_path: Path
) -> None:
    k, path = course_model
    k.save(tmp_path / "course.h5")
    for file in (path, tmp_path / "course.h5"):
        model = _same_outputs(k, file, 48)
        assert model.cnnkit_config["args"]["num_classes"] == 3
        assert model.pretrained_cfg["mean"] == pytest.approx([0.5] * 3)


def test_import_keras_writes_weights_that_predict_and_fine_tune(
    course_model: tuple[Any, Path], tmp_path: Path, cnnkit_cli: Any, digits_5_9: Path
) -> None:
    k, path = course_model
    out = cnnkit_cli("import-keras", str(path), "--out", str(tmp_path / "imported"), cwd=tmp_path).stdout
    assert "mobilenet_v2" in out and "mean (0.5, 0.5, 0.5)" in out
    weights = tmp_path / "imported.safetensors"
    again = cnnkit_cli("import-keras", str(path), "--out", str(weights), cwd=tmp_path, ok=False)
    assert again.returncode != 0 and "exists" in again.stderr and "Traceback" not in again.stderr
    # cnnkit.load normalises and sizes as recorded ([-1, 1], the whole image): Keras' probabilities
    image = (np.random.default_rng(2).random((48, 48, 3)) * 255).astype("uint8")
    logits = np.asarray(k(image[None].astype("float32"), training=False).detach().cpu())[0]
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    (result,) = cnnkit.load(weights, fast=False)(image)
    assert result.classes[0] == int(expected.argmax())
    assert result.data["topk"][0]["prob"] == pytest.approx(float(expected.max()), abs=1e-4)
    # fine-tuning from the Keras file trains on [-1, 1] pixels, as the weights expect
    result = cnnkit.train(
        "classify", data=digits_5_9, pretrained=str(path), freeze=True, epochs=1, imgsz=32, batch=16,
        workers=0, quiet=True, plots=False, project=tmp_path,
    )  # fmt: skip
    meta = cnnkit.weights.read_metadata(result.best)
    assert meta["model"] == "mobilenet_v2" and meta["mean"] == [0.5] * 3 and meta["std"] == [0.5] * 3
    assert meta["args"]["tf_padding"] is True


def test_files_that_are_not_a_mapped_keras_model(tmp_path: Path, course_model: tuple[Any, Path]) -> None:
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(os.urandom(2000))
    with pytest.raises(WeightsError, match=r"garbage\.h5: not a readable Keras file"):
        cnnkit.import_keras(garbage)
    small = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(4, 3, name="mine")])
    small.save(tmp_path / "small.keras")
    with pytest.raises(WeightsError, match=r"small\.keras: not a Keras Applications model .*\['mine'\]"):
        cnnkit.import_keras(tmp_path / "small.keras")
    _, path = course_model
    with pytest.raises(cnnkit.CnnkitError, match="holds a Keras mobilenet_v2, not a resnet50"):
        cnnkit.create_model("resnet50", weights=path)
    base = apps.MobileNetV2(weights=None, include_top=False, input_shape=(32, 32, 3), pooling="avg")
    two = keras.Sequential([base, keras.layers.Dense(8), keras.layers.Dense(2)])
    two.save(tmp_path / "two.keras")
    with pytest.raises(WeightsError, match="has one linear classifier"):
        cnnkit.import_keras(tmp_path / "two.keras")
    with h5py.File(tmp_path / "empty.h5", "w"):
        pass
    with pytest.raises(WeightsError, match="no Keras layer weights"):
        cnnkit.import_keras(tmp_path / "empty.h5")


def test_a_new_head_for_transfer_learning(course_model: tuple[Any, Path]) -> None:
    _, path = course_model
    model = cnnkit.create_model(None, weights=path, num_classes=10)
    assert model.head.fc.out_features == 10 and model.cnnkit_config["args"]["tf_padding"] is True
