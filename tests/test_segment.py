"""U-Net family, the transposed convolution, segmentation losses, metrics, data layouts, and the
train/val/predict workflow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassJaccardIndex

import cnnkit
from cnnkit.arithmetic import conv_transpose_output_size
from cnnkit.cli import main
from cnnkit.data.segment import (
    SegmentationDataset,
    SegmentationTransform,
    read_mask,
    resolve_segmentation_data,
)
from cnnkit.errors import DataError
from cnnkit.layers import FrozenBatchNorm2d
from cnnkit.ops import conv_transpose2d_reference
from cnnkit.tasks.segment import SegmentationEvaluator, SegmentationTask, dice_loss, focal_loss
from cnnkit.weights import read_metadata

SEGMENTERS = [n for n in cnnkit.list_models("unet*") if n != "unet"]


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_original_unet_parameters_and_output_size() -> None:
    model = cnnkit.create_model("unet", in_chans=1, num_classes=2)
    assert n_params(model) == 31_030_658
    assert model.output_size(572) == 388
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 572, 572)).shape == (1, 2, 388, 388)
    with pytest.raises(cnnkit.CnnkitError, match=r"sizes that work near 500: \[476, 492, 508\]"):
        model(torch.zeros(1, 1, 500, 500))


def test_course_unet_parameters() -> None:
    model = cnnkit.create_model("unet_course", in_chans=3, num_classes=23)
    assert n_params(model) == 8_640_471
    assert model(torch.zeros(1, 3, 96, 128)).shape == (1, 23, 96, 128)


@pytest.mark.parametrize("name", SEGMENTERS)
def test_every_segmenter_trains_a_step_on_odd_sizes(name: str) -> None:
    args = {"base": 8, "depth": 3} if name == "unet_same" else {}
    model = cnnkit.create_model(name, num_classes=4, **args)
    x = torch.randn(2, 3, 45, 67)  # not a multiple of any network stride
    out = model(x)
    assert out.shape == (2, 4, 45, 67) and torch.isfinite(out).all()
    F.cross_entropy(out, torch.randint(0, 4, (2, 45, 67))).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_unet_same_bilinear_and_transposed() -> None:
    for up in ("bilinear", "transposed"):
        model = cnnkit.create_model("unet_same", num_classes=3, base=8, depth=2, upsample=up)
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3, 32, 32)
    with pytest.raises(cnnkit.CnnkitError, match="upsample must be"):
        cnnkit.create_model("unet_same", upsample="cubic")


def test_encoder_unet_takes_pretrained_weights_and_freezes(tmp_path: Path) -> None:
    import torchvision

    tv = torchvision.models.resnet18(weights=None)
    torch.save(tv.state_dict(), tmp_path / "r18.pth")
    model = cnnkit.create_model("unet_resnet18", num_classes=3, encoder_weights=str(tmp_path / "r18.pth"),
                                freeze_encoder=True)  # fmt: skip
    torch.testing.assert_close(model.encoder.stem.conv.conv.weight, tv.conv1.weight)
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.encoder.modules())
    assert all(p.requires_grad for p in model.decoder.parameters())


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(1, 6), w=st.integers(1, 6), k=st.integers(1, 4), s=st.integers(1, 3), p=st.integers(0, 2),
    data=st.data(),
)  # fmt: skip
def test_reference_transposed_conv_equals_torch(
    h: int, w: int, k: int, s: int, p: int, data: st.DataObject
) -> None:
    op = data.draw(st.integers(0, s - 1))
    if (min(h, w) - 1) * s - 2 * p + k + op < 1:
        return
    g = torch.Generator().manual_seed(h * 100 + w * 10 + k)
    x = torch.randn(2, 3, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(3, 2, k, k, generator=g, dtype=torch.float64)
    bias = torch.randn(2, generator=g, dtype=torch.float64)
    ours = conv_transpose2d_reference(x, weight, bias, s, p, op)
    torch.testing.assert_close(ours, F.conv_transpose2d(x, weight, bias, s, p, op))
    assert ours.shape[-2:] == (
        conv_transpose_output_size(h, k, p, s, op),
        conv_transpose_output_size(w, k, p, s, op),
    )


def test_losses_respect_the_ignore_index() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randint(0, 4, (2, 8, 8))
    target[:, :2] = 255
    for loss in ("ce", "dice", "focal", "ce+dice"):
        task = SegmentationTask(4, loss)  # type: ignore[arg-type]
        value, _ = task.loss(logits, (None, target))
        changed = logits.detach().clone()
        changed[:, :, :2] += 100  # only ignored pixels change
        assert task.loss(changed, (None, target))[0].item() == pytest.approx(value.item(), rel=1e-5), loss
        value.backward()
    perfect = F.one_hot(target.clamp(max=3), 4).permute(0, 3, 1, 2).float() * 50
    assert dice_loss(perfect, target).item() < 1e-3
    # gamma 0 makes focal loss plain cross-entropy
    ce = F.cross_entropy(logits, target, ignore_index=255)
    assert focal_loss(logits, target, gamma=0.0).item() == pytest.approx(ce.item(), rel=1e-5)
    binary = SegmentationTask(1, "ce+dice")
    assert torch.isfinite(binary.loss(torch.randn(2, 1, 8, 8), (None, (target > 1).long()))[0])


def test_metrics_equal_torchmetrics() -> None:
    torch.manual_seed(0)
    c = 6
    target = torch.randint(0, c - 1, (4, 20, 20))  # class 5 never occurs in the ground truth
    pred = torch.where(torch.rand(4, 20, 20) < 0.6, target, torch.randint(0, c - 2, (4, 20, 20)))
    target[0, :5] = 255
    ev = SegmentationEvaluator(c, 255)
    ev.update(F.one_hot(pred, c).permute(0, 3, 1, 2).float(), (None, target))
    per, m = ev.per_class(), ev.compute()
    tm_iou = MulticlassJaccardIndex(c, average="none", ignore_index=255)(pred, target)
    tm_f1 = MulticlassF1Score(c, average="none", ignore_index=255)(pred, target)
    present = ~per["iou"].isnan()
    torch.testing.assert_close(per["iou"][present].float(), tm_iou[present])
    torch.testing.assert_close(per["dice"][present].float(), tm_f1[present])
    # torchmetrics' macro mIoU skips the classes absent from both ground truth and predictions, as ours
    assert m["miou"] == pytest.approx(
        MulticlassJaccardIndex(c, ignore_index=255)(pred, target).item(), abs=1e-6
    )
    assert m["pixel_acc"] == pytest.approx(
        MulticlassAccuracy(c, average="micro", ignore_index=255)(pred, target).item(), abs=1e-6
    )


def _write_pairs(images: Path, masks: Path, n: int, size: tuple[int, int] = (20, 16), value: int = 1) -> None:
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((size[1], size[0], 3), 40 * i % 255, np.uint8)).save(images / f"{i}.jpg")
        m = np.zeros((size[1], size[0]), np.uint8)
        m[: size[1] // 2] = value
        Image.fromarray(m).save(masks / f"{i}.png")


def test_layouts_people_publish(tmp_path: Path) -> None:
    a = tmp_path / "a"
    _write_pairs(a / "images" / "train", a / "masks" / "train", 4)
    _write_pairs(a / "images" / "val", a / "masks" / "val", 2)
    spec = resolve_segmentation_data(a)
    assert (len(spec.train), len(spec.val)) == (4, 2)
    b = tmp_path / "b"
    _write_pairs(b / "train" / "images", b / "train" / "labels", 3)
    _write_pairs(b / "valid" / "images", b / "valid" / "labels", 2)
    assert [len(x) for x in (resolve_segmentation_data(b).train, resolve_segmentation_data(b).val)] == [3, 2]
    c = tmp_path / "c"
    _write_pairs(c / "images", c / "masks", 10)
    (c / "images" / "orphan.jpg").write_bytes((c / "images" / "0.jpg").read_bytes())
    spec = resolve_segmentation_data(c, val_fraction=0.3)
    assert (len(spec.train), len(spec.val)) == (7, 3)
    assert any("orphan" in p for p, _ in spec.report.items)


def test_pascal_voc_layout_with_palette_masks_and_void_border(tmp_path: Path) -> None:
    from cnnkit.data.segment import color_map

    voc = tmp_path / "VOC2012"
    _write_pairs(voc / "JPEGImages", voc / "SegmentationClass", 4)
    for mask in (voc / "SegmentationClass").iterdir():
        m = np.asarray(Image.open(mask)).copy()
        m[0, :] = 255  # the void border
        pal = Image.fromarray(m, mode="P")
        pal.putpalette(color_map().flatten().tolist())
        pal.save(mask)
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("0\n1\n2\n")
    (sets / "val.txt").write_text("3\n")
    spec = resolve_segmentation_data(voc)
    assert [p.name for p, _ in spec.train] == ["0.jpg", "1.jpg", "2.jpg"] and len(spec.val) == 1
    ds = SegmentationDataset(spec.train, 21)
    _, mask = ds[0]
    assert set(mask.unique().tolist()) == {0, 1, 255}


def test_rgb_masks_need_and_use_a_palette(tmp_path: Path) -> None:
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[:2] = (255, 0, 0)
    Image.fromarray(rgb).save(tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png", [(0, 0, 0), (255, 0, 0)]).tolist()[0] == [1, 1, 1, 1]
    with pytest.raises(DataError, match="colour-to-class table"):
        read_mask(tmp_path / "m.png")
    with pytest.raises(DataError, match=r"colours \['#ff0000'\] are not in the palette"):
        read_mask(tmp_path / "m.png", [(0, 0, 0)])


def test_bad_pairs_are_reported_with_their_path(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _write_pairs(tmp_path / "images", tmp_path / "masks", 3)
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "masks" / "1.png")  # wrong size
    Image.fromarray(np.full((16, 20), 7, np.uint8)).save(tmp_path / "masks" / "2.png")  # class 7 of 3
    pairs = [(tmp_path / "images" / f"{i}.jpg", tmp_path / "masks" / f"{i}.png") for i in range(3)]
    with caplog.at_level("WARNING"):
        ds = SegmentationDataset(pairs, 3)
    assert len(ds) == 1
    assert "1.png: mask is 5x5 but its image 1.jpg is 20x16" in caplog.text
    assert "2.png: values [7] are outside the 3 classes" in caplog.text
    with pytest.raises(DataError, match="mask is 5x5"):
        SegmentationDataset(pairs, 3, strict=True)


def test_image_and_mask_move_together() -> None:
    image = torch.zeros(3, 40, 60, dtype=torch.uint8)
    image[:, :, :30] = 255  # bright left half
    mask = torch.zeros(40, 60, dtype=torch.uint8)
    mask[:, :30] = 3
    transform = SegmentationTransform(32, train=True, scale=(0.3, 1.0), hflip=0.5, jitter=0.0)
    torch.manual_seed(0)
    for _ in range(20):
        img, msk = transform(image, mask)
        assert set(msk.unique().tolist()) <= {0, 3}  # nearest-neighbour: no blended labels
        bright = img.mean(0) > 0
        assert ((msk == 3) == bright).float().mean() > 0.95  # at most a boundary column differs


def test_train_val_predict_segment_through_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cnnkit.data.builtin import write_segmentation

    data = write_segmentation(tmp_path / "data", n_train=160, n_val=40)
    args = ["train", "segment", "--data", str(data), "--model", "unet_same", "--model-args",
            '{"base": 8, "depth": 3}', "--imgsz", "48", "--epochs", "4", "--batch", "16", "--lr", "0.005",
            "--workers", "0", "--quiet", "--project", str(tmp_path / "runs")]  # fmt: skip
    assert main(args) == 0
    run = tmp_path / "runs" / "segment" / "exp"
    rows = (run / "results.csv").read_text().splitlines()
    header = rows[0].split(",")
    loss = [float(r.split(",")[header.index("train_loss")]) for r in rows[1:]]
    acc = [float(r.split(",")[header.index("pixel_acc")]) for r in rows[1:]]
    assert loss[-1] < loss[0]
    background = np.mean(
        [(np.asarray(Image.open(m)) == 0).mean() for m in (data / "masks" / "val").iterdir()]
    )
    assert acc[-1] > 0.5 * background  # learning, not chance; the demo trains to a usable model
    weights = run / "weights" / "best.safetensors"
    capsys.readouterr()
    assert main(["val", "segment", "--weights", str(weights), "--data", str(data), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["metrics"]) == {"miou", "mdice", "pixel_acc", "mean_acc", "val_loss"}
    assert [row["class"] for row in report["per_class"]] == read_metadata(weights)["class_names"]
    assert len(report["per_class"]) == 11 and {"iou", "dice", "acc"} <= set(report["per_class"][0])
    images = sorted((data / "images" / "val").iterdir())[:2]
    out = tmp_path / "pred"
    assert (
        main(
            ["predict", "segment", "--weights", str(weights), *map(str, images), "--out", str(out), "--json"]
        )
        == 0
    )
    preds = json.loads(capsys.readouterr().out)
    for p, img in zip(preds, images):
        mask = Image.open(p["mask"])
        assert mask.mode == "P" and mask.size == Image.open(img).size
        assert Path(p["overlay"]).is_file()
