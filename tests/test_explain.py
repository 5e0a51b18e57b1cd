"""``cnnkit explain``: Grad-CAM equals captum's on the same layer, Grad-CAM++ follows its closed form,
heat maps sit where the cells look (not shifted by interpolation), a classifier trained on digits looks
at the digit, and every explained task draws its pictures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import cnnkit
from cnnkit.cam import CAM, default_layer, to_pixels
from cnnkit.cli import main
from cnnkit.data.builtin import DIGIT_NAMES, background, load_digits_arrays, render_glyph
from cnnkit.engine.config import TrainConfig
from cnnkit.workflows import run
from cnnkit.workflows.explain import explain


@pytest.mark.parametrize("layer", ["stages.1", "stages.2"])
def test_gradcam_equals_captum(layer: str) -> None:
    from captum.attr import LayerGradCam

    model = cnnkit.create_model("resnet18", num_classes=4, width=0.25).eval()
    x = torch.randn(2, 3, 64, 64)
    target = torch.tensor([1, 3])
    module = dict(model.named_modules())[layer]
    ref = LayerGradCam(model, module).attribute(x, target=target.tolist(), relu_attributions=True)[:, 0]
    mine = CAM(model, layer)(x, lambda out: out[torch.arange(2), target], raw=True)
    assert isinstance(mine, list)
    torch.testing.assert_close(mine[0], ref.detach(), rtol=1e-5, atol=1e-7)


class _Linear(nn.Module):
    """``score = sum_k v_k mean_ij A_kij`` with ``A = features(x)``: every gradient is ``v_k / (h w)``."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def test_gradcam_plus_plus_follows_its_closed_form() -> None:
    """With gradients g_k constant over the map, alpha_k = g^2 / (2 g^2 + S_k g^3) (S_k: the map's sum)
    and w_k = h w alpha_k ReLU(g_k) (Chattopadhyay et al. 2018, eq. 19)."""
    torch.manual_seed(0)
    model = _Linear().eval()
    x = torch.randn(1, 3, 5, 6)
    (cam,) = CAM(model, "features", "gradcam++")(x, lambda out: out[:, 0], raw=True)
    a = model.features(x).detach()
    g = model.head.weight.detach()[0] / 30
    s = a.sum((2, 3))[0]
    alpha = torch.where(g != 0, g**2 / (2 * g**2 + s * g**3), torch.zeros_like(g))
    weights = 30 * alpha * torch.relu(g)
    expected = torch.relu((weights.view(1, 4, 1, 1) * a).sum(1))
    torch.testing.assert_close(cam, expected, rtol=1e-5, atol=1e-8)


def test_cells_are_placed_where_they_look() -> None:
    """A ResNet's stride-8 cell i looks around pixel 8 i (not 8 i + 3.5, where interpolation puts it):
    a map with one hot cell peaks there."""
    model = cnnkit.create_model("resnet18", num_classes=2, width=0.25).eval()
    cam = CAM(model, "stages.1")
    (start_y, step_y, start_x, step_x) = cam._centres(torch.zeros(1, 3, 64, 64), model.stages[1])[0]
    assert (step_y, step_x) == (8, 8) and abs(start_y) < 2.5 and abs(start_x) < 2.5
    hot = torch.zeros(1, 8, 8)
    hot[0, 3, 5] = 1
    pixels = to_pixels(hot, (64, 64), start_y, step_y, start_x, step_x)[0]
    y, x = divmod(int(pixels.argmax()), 64)
    assert abs(y - (start_y + 24)) <= 1 and abs(x - (start_x + 40)) <= 1


def _small_digits(root: Path, n_train: int, n_val: int) -> dict[str, tuple[int, int, int]]:
    """Four digits drawn small (18-23 px) at random places on 48 px images; returns each image's
    digit box (x, y, size)."""
    rng = np.random.default_rng(0)
    images, labels = load_digits_arrays()
    idx = np.flatnonzero(np.isin(labels, (0, 1, 4, 7)))
    boxes = {}
    for split, chosen in (("train", idx[:n_train]), ("val", idx[-n_val:])):
        for i in chosen:
            bg = background(rng, 48, 48)
            size = int(rng.integers(18, 24))
            y, x = (int(v) for v in rng.integers(0, 48 - size + 1, 2))
            glyph = render_glyph(images[i], int(labels[i]), size, rng, bg[y : y + size, x : x + size])
            canvas = np.clip(bg, 0, 255).astype(np.uint8)
            canvas[y : y + size, x : x + size] = glyph.rgb
            folder = root / split / DIGIT_NAMES[int(labels[i])]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(canvas).save(folder / f"{i}.png")
            boxes[str(folder / f"{i}.png")] = (x, y, size)
    return boxes


@pytest.fixture(scope="module")
def digit_classifier(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, Path, dict[str, tuple[int, int, int]]]:
    root = tmp_path_factory.mktemp("small_digits")
    boxes = _small_digits(root, 320, 40)
    cfg = TrainConfig(epochs=20, imgsz=48, batch=32, lr=3e-3, workers=0, quiet=True, plots=False)
    options = {"model": "resnet18", "model_args": {"width": 0.25}, "crop_fraction": 1.0, "fliplr": 0.0}
    result = run.train("classify", root, cfg=cfg, project=root / "runs", **options)
    assert result.metrics["top1"] >= 0.9
    return result.best, root / "val", boxes


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_a_digit_classifier_looks_at_the_digit(
    digit_classifier: tuple[Path, Path, dict[str, tuple[int, int, int]]], method: str
) -> None:
    """The digit's box covers a fifth of the image; the heat map puts about twice that share of its mass
    there (measured 0.38 Grad-CAM, 0.37 Grad-CAM++ against 0.18), and its centroid falls in the box on
    most images (0.78 and 0.95; a blob placed at random: about 0.2)."""
    weights, val, boxes = digit_classifier
    mass, centred = [], []
    yy, xx = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
    for e in explain(weights, [str(val)], method=method):
        x, y, size = boxes[e.path]
        heat = e.targets[0].heat
        inside = torch.zeros_like(heat)
        inside[y : y + size, x : x + size] = 1
        mass.append(float((heat * inside).sum() / heat.sum()))
        cy, cx = float((heat * yy).sum() / heat.sum()), float((heat * xx).sum() / heat.sum())
        centred.append(bool(inside[round(cy), round(cx)]))
    area = np.mean([size**2 for _, _, size in boxes.values()]) / 48**2
    assert np.mean(mass) >= 1.8 * area and np.mean(centred) >= 0.7, (np.mean(mass), area, np.mean(centred))


def test_the_cli_draws_each_image_and_refuses_other_tasks(
    digit_classifier: tuple[Path, Path, dict[str, tuple[int, int, int]]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    weights, val, _ = digit_classifier
    one = next(iter(sorted((val / "seven").iterdir())))
    assert (
        main(["explain", "--weights", str(weights), str(one), "--class", "one", "--out", str(tmp_path)]) == 0
    )
    out = capsys.readouterr().out
    assert "one 0." in out and (tmp_path / "classify" / "exp" / f"{one.stem}.jpg").is_file()
    assert main(["explain", "--weights", str(weights), str(one), "--class", "eleven"]) == 2
    assert "not one of the model's classes" in capsys.readouterr().err


def test_detector_and_localizer_explain_their_scores(tmp_path: Path) -> None:
    """One heat map per detected box (untrained: a low threshold finds some) and one per localized image."""
    from cnnkit.data import builtin

    det = builtin.write_detection(tmp_path / "det", n_train=16, n_val=4, seed=0)
    tiny = ["--backbone-args", '{"width": 0.25}', "--strides", "8", "16", "--imgsz", "64"]
    quick = ["--epochs", "1", "--workers", "0", "--quiet", "--project", str(tmp_path / "runs"), "--no-plots"]
    assert main(["train", "detect", "--data", str(det), *tiny, *quick]) == 0
    weights = tmp_path / "runs" / "detect" / "exp" / "weights" / "best.safetensors"
    image = sorted((det / "images" / "val").iterdir())[0]
    (result,) = explain(weights, [str(image)], conf=0.0, max_boxes=3, out=tmp_path / "explained")
    assert len(result.targets) == 3 and result.drawn is not None and Path(result.drawn).is_file()
    for target in result.targets:
        assert target.box is not None and target.heat.shape == (64, 64)
        assert float(target.heat.min()) >= 0 and float(target.heat.max()) <= 1
    loc = builtin.write_localization(tmp_path / "loc", n_train=16, n_val=4, seed=0)
    assert main(["train", "localize", "--data", str(loc), "--imgsz", "64", *quick]) == 0
    weights = tmp_path / "runs" / "localize" / "exp" / "weights" / "best.safetensors"
    image = sorted(p for p in loc.rglob("*.png"))[0]
    (result,) = explain(weights, [str(image)], method="gradcam++")
    assert len(result.targets) == 1 and result.targets[0].heat.shape == (64, 64)


def test_default_layer_is_the_deepest_block_with_enough_cells() -> None:
    model = cnnkit.create_model("resnet18", num_classes=2, width=0.25)
    assert default_layer(model, torch.zeros(1, 3, 48, 48)) == "stages.1.1"  # 6x6; stages.2 is 3x3
    assert default_layer(model, torch.zeros(1, 3, 224, 224)) == "stages.3.1"  # 7x7
