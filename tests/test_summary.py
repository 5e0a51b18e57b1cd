from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import cnnkit
from cnnkit.cli import main
from cnnkit.summary import summarize


@pytest.mark.parametrize(
    ("name", "params", "gmacs"),
    [("resnet50", 25_557_032, 4.1), ("mobilenet_v2", 3_504_872, 0.30), ("efficientnet_b0", 5_288_548, 0.39)],
)
def test_totals_at_224_match_the_quoted_numbers(name: str, params: int, gmacs: float) -> None:
    s = summarize(cnnkit.create_model(name), 224)
    assert s.params == params == sum(r.params for r in s.rows)
    assert s.macs / 1e9 == pytest.approx(gmacs, rel=0.015)


def test_rows_show_geometry_shapes_and_receptive_field() -> None:
    s = summarize(cnnkit.create_model("resnet18"), 224)
    first = s.rows[0]
    assert (first.name, first.kernel, first.stride, first.padding) == ("stem.conv.conv", "7x7", "2", "3")
    assert first.output_shape == (64, 112, 112) and first.receptive_field == 7
    assert first.macs == 112 * 112 * 64 * 3 * 49
    last_conv = [r for r in s.rows if r.type == "Conv2d"][-1]
    assert last_conv.receptive_field == 435  # the well-known receptive field of ResNet-18
    assert s.rows[-1].output_shape == (1000,)


def test_vgg16_receptive_field_and_macs() -> None:
    s = summarize(cnnkit.create_model("vgg16"), 224)
    convs = [r for r in s.rows if r.type == "Conv2d"]
    assert convs[-1].receptive_field == 196
    assert s.macs / 1e9 == pytest.approx(15.5, abs=0.05)


def test_transposed_conv_rows_are_checked() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ConvTranspose2d(8, 4, 2, 2))
    s = summarize(model, 32)
    assert s.rows[1].output_shape == (4, 32, 32)
    assert s.rows[1].macs == 8 * 16 * 16 * 4 * 4


def test_cli_summary_prints_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["summary", "mobilenet_v2", "--imgsz", "224"]) == 0
    out = capsys.readouterr().out
    assert "parameters 3,504,872" in out and "multiply-adds 300.77M" in out
    assert main(["summary", "resnet5"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_summary_of_a_weights_file_and_of_sizes_that_do_not_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A weights file is summarised at its training size; a size the model cannot take names what it
    takes (a valid U-Net's nearest sizes, Inception v3's smallest) instead of a kernel-size error."""
    model = cnnkit.create_model("resnet18", num_classes=3, width=0.25)
    cnnkit.save_weights(model, tmp_path / "w.safetensors", {"task": "classify", "imgsz": 48})
    assert main(["summary", str(tmp_path / "w.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "input 3x48x48" in out and f"parameters {sum(p.numel() for p in model.parameters()):,}" in out
    assert main(["summary", "unet", "--imgsz", "64"]) == 2
    assert "sizes that work near 64: [188, 204, 220]" in capsys.readouterr().err
    assert main(["summary", "inception_v3", "--imgsz", "64"]) == 2
    assert "an input of 64x64 px is too small; it takes 75 px and more" in capsys.readouterr().err
    with pytest.raises(cnnkit.CnnkitError, match="googlenet: an input of 14x14 px is too small"):
        cnnkit.create_model("googlenet").forward_with_aux(torch.zeros(1, 3, 14, 14))
