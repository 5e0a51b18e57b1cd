"""Segmentation data as people publish it: folder names singular or plural, mask suffixes, SegNet's
``annot`` folders, id lists, and binary masks stored as 0/255 (also as noisy JPEGs) or 0/1."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnkit.data.formats.masks import read_mask, resolve_segmentation_data
from cnnkit.engine import TrainConfig
from cnnkit.errors import DataError
from cnnkit.workflows import run

N = 6


def _truth(i: int, size: tuple[int, int] = (40, 32)) -> np.ndarray:
    """A filled rectangle (class 1) on background (class 0), different for each image."""
    m = np.zeros((size[1], size[0]), np.uint8)
    m[4 + i : 20 + i, 6 : 24 + i] = 1
    return m


def _pair(image: Path, mask: Path, i: int, scale: int = 255, jpeg_mask: bool = False) -> None:
    image.parent.mkdir(parents=True, exist_ok=True)
    mask.parent.mkdir(parents=True, exist_ok=True)
    truth = _truth(i)
    rgb = np.random.default_rng(i).integers(0, 80, (*truth.shape, 3), dtype=np.uint8)
    rgb[truth == 1] += 150
    Image.fromarray(rgb).save(image)
    if jpeg_mask:
        Image.fromarray((truth * 255).astype(np.uint8)).convert("RGB").save(mask, quality=75)
    else:
        Image.fromarray((truth * scale).astype(np.uint8)).save(mask)


def singular(root: Path) -> None:  # image/ + label/, the biomedical sets' naming
    for i in range(N):
        _pair(root / "image" / f"{i}.jpg", root / "label" / f"{i}.png", i)


def suffixed(root: Path) -> None:  # imgs/ + masks/, masks named x_mask.png
    for i in range(N):
        _pair(root / "imgs" / f"case{i}.jpg", root / "masks" / f"case{i}_mask.png", i)


def gt_folder(root: Path) -> None:  # img/ + gt/ with train/ and val/ inside
    for i in range(N):
        split = "train" if i < 4 else "val"
        _pair(root / "img" / split / f"{i}.png", root / "gt" / split / f"{i}.png", i)


def segnet(root: Path) -> None:  # train/ + trainannot/, val/ + valannot/ (masks 0/1)
    for i in range(N):
        split = "train" if i < 4 else "val"
        _pair(root / split / f"{i}.png", root / f"{split}annot" / f"{i}.png", i, scale=1)


def pennfudan(root: Path) -> None:  # PNGImages/ + PedMasks/ with _mask suffix
    for i in range(N):
        _pair(root / "PNGImages" / f"FudanPed{i:05d}.png", root / "PedMasks" / f"FudanPed{i:05d}_mask.png", i)


def beside(root: Path) -> None:  # images/ holding x.jpg and x_mask.png together
    for i in range(N):
        _pair(root / "images" / f"{i}.jpg", root / "images" / f"{i}_mask.png", i)


def lists(root: Path) -> None:  # images/ + masks/ with train.txt and val.txt
    for i in range(N):
        _pair(root / "images" / f"{i}.jpg", root / "masks" / f"{i}.png", i)
    (root / "train.txt").write_text("0\n1\n2\n3\n")
    (root / "val.txt").write_text("images/4.jpg\nimages/5.jpg\n")


def jpeg_masks(root: Path) -> None:  # masks saved as JPEG: 0/255 with compression noise
    for i in range(N):
        _pair(root / "images" / f"{i}.jpg", root / "masks" / f"{i}.jpg", i, jpeg_mask=True)


LAYOUTS: dict[str, tuple[Callable[[Path], None], int | None, tuple[int, int]]] = {
    # writer, expected threshold, (train, val) pairs (a seeded 0.34 split of 6 is 4/2)
    "singular": (singular, 128, (4, 2)),
    "suffixed": (suffixed, 128, (4, 2)),
    "gt_folder": (gt_folder, 128, (4, 2)),
    "segnet": (segnet, None, (4, 2)),
    "pennfudan": (pennfudan, 128, (4, 2)),
    "beside": (beside, 128, (4, 2)),
    "lists": (lists, 128, (4, 2)),
    "jpeg_masks": (jpeg_masks, 128, (4, 2)),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_binary_masks_in_each_published_layout(
    layout: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write, threshold, counts = LAYOUTS[layout]
    write(tmp_path / layout)
    with caplog.at_level("INFO"):
        spec = resolve_segmentation_data(tmp_path / layout, val_fraction=0.34)
    assert (len(spec.train), len(spec.val)) == counts
    assert spec.threshold == threshold
    if threshold is not None:
        assert spec.names == ["background", "foreground"]
        assert (
            "thresholded at 128" in caplog.text
            if layout == "jpeg_masks"
            else "255 = foreground" in caplog.text
        )
    for image, mask in [*spec.train, *spec.val]:
        i = int("".join(c for c in image.stem if c.isdigit()))
        assert np.array_equal(read_mask(mask, threshold=spec.threshold), _truth(i)), (image, mask)
    assert spec.found in caplog.text


def test_a_binary_set_trains_and_reports_foreground_iou(tmp_path: Path) -> None:
    """Seen: 0/255 masks read as 'ignore' everywhere; the model learnt background only."""
    singular(tmp_path / "set")
    cfg = TrainConfig(epochs=2, batch=4, imgsz=32, lr=5e-3, workers=0, quiet=True, plots=False)
    result = run.train(
        "segment",
        tmp_path / "set",
        model="unet_same",
        model_args={"base": 8, "depth": 2},
        val_fraction=0.34,
        cfg=cfg,
        project=tmp_path / "runs",
    )
    assert {"fg_iou", "fg_dice", "miou"} <= set(result.metrics)
    assert result.metrics["fg_iou"] > 0  # foreground pixels are learnt, not ignored
    report = run.val(result.best)
    assert [row["class"] for row in report.per_class] == ["background", "foreground"]


def test_data_yaml_ignore_index_keeps_255_as_void(tmp_path: Path) -> None:
    singular(tmp_path / "set")
    (tmp_path / "set" / "data.yaml").write_text("names: [background, cell]\nignore_index: 255\n")
    spec = resolve_segmentation_data(tmp_path / "set")
    assert spec.threshold is None and spec.names == ["background", "cell"]
    assert set(np.unique(read_mask(spec.train[0][1])).tolist()) == {0, 255}


def test_nothing_found_says_what_was_looked_for(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "photos" / "a.png")
    with pytest.raises(DataError, match=r"no segmentation layout found\. Looked for an image folder"):
        resolve_segmentation_data(tmp_path)
    suffixed(tmp_path / "orphans")
    for m in (tmp_path / "orphans" / "masks").iterdir():
        m.rename(m.with_name(m.name.replace("case", "other")))
    with pytest.raises(DataError, match=r"but no image has a mask; first: .*case0.jpg: no mask named case0"):
        resolve_segmentation_data(tmp_path / "orphans")


def test_metrics_are_computed_at_each_images_own_resolution(tmp_path: Path) -> None:
    """Validation upsamples each image's logits to its own mask size before the argmax; the numbers equal
    a plain per-image computation at the original sizes (images of different sizes in one batch)."""
    import torch
    import torch.nn.functional as F

    from cnnkit import create_model
    from cnnkit.data.segment import SegmentationDataset, SegmentationTransform, collate_segmentation
    from cnnkit.engine.loops import evaluate
    from cnnkit.tasks.segment import SegmentationTask

    pairs = []
    for i, size in enumerate([(40, 32), (52, 30), (33, 47)]):
        truth = np.zeros((size[1], size[0]), np.uint8)
        truth[3 : 10 + i, 5:20] = 1
        truth[12:, 2 + i :] = 2
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (size[1], size[0], 3), np.uint8)).save(
            tmp_path / f"{i}.png"
        )
        Image.fromarray(truth).save(tmp_path / f"{i}_mask.png")
        pairs.append((tmp_path / f"{i}.png", tmp_path / f"{i}_mask.png"))
    dataset = SegmentationDataset(pairs, 3, SegmentationTransform(32, train=False))
    torch.manual_seed(0)
    model = create_model("unet_same", num_classes=3, base=4, depth=2).eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=collate_segmentation)
    metrics, _ = evaluate(SegmentationTask(3), model, loader, torch.device("cpu"))

    confusion = torch.zeros(3, 3, dtype=torch.long)
    with torch.no_grad():
        for i in range(3):
            image, mask = dataset[i]
            logits = F.interpolate(model(image[None]), size=mask.shape, mode="bilinear", align_corners=False)
            pred = logits.argmax(1)[0]
            confusion += torch.bincount(mask.flatten() * 3 + pred.flatten(), minlength=9).view(3, 3)
    tp = confusion.diag().double()
    iou = tp / (confusion.sum(0) + confusion.sum(1) - confusion.diag()).double()
    assert metrics["miou"] == pytest.approx(float(iou.nanmean()), abs=1e-12)
    assert metrics["pixel_acc"] == pytest.approx(float(tp.sum() / confusion.sum()), abs=1e-12)


def test_rect_keeps_the_aspect_ratio_in_training_and_evaluation(tmp_path: Path) -> None:
    import torch
    import torch.nn.functional as F

    from cnnkit import create_model
    from cnnkit.data.segment import SegmentationTransform, fit_long_side
    from cnnkit.tasks.segment import SegmentationEvaluator

    image = torch.zeros(3, 40, 80, dtype=torch.uint8)
    mask = torch.zeros(40, 80, dtype=torch.uint8)
    yy, xx = torch.meshgrid(torch.arange(40), torch.arange(80), indexing="ij")
    mask[((yy - 20) ** 2 + (xx - 40) ** 2) <= 15**2] = 1  # a disc: squashing would make it an ellipse
    torch.manual_seed(0)
    for _ in range(5):
        img, msk = SegmentationTransform(32, train=True, scale=(1.0, 1.0), hflip=0.0, jitter=0.0, rect=True)(
            image, mask
        )
        assert img.shape == (3, 32, 32) and msk.shape == (32, 32)
        ys, xs = torch.nonzero(msk == 1, as_tuple=True)
        if len(ys):
            assert abs((ys.max() - ys.min()) - (xs.max() - xs.min())) <= 1  # still round
    img, full = SegmentationTransform(32, train=False, rect=True)(image, mask)
    assert img.shape == (3, 32, 32) and torch.equal(full, mask.long())  # mask at its own size
    assert fit_long_side(40, 80, 32) == (16, 32) and img[:, 16:].abs().sum() == 0  # padded below

    # the evaluator crops the padding off before upsampling: equal to a reference at the original size
    torch.manual_seed(0)
    model = create_model("unet_same", num_classes=2, base=4, depth=2).eval()
    with torch.no_grad():
        logits = model(img[None])
    evaluator = SegmentationEvaluator(2, rect=True)
    evaluator.update(logits, (img[None], [full]))
    ref = F.interpolate(logits[..., :16, :32], size=(40, 80), mode="bilinear", align_corners=False).argmax(1)[
        0
    ]
    expected = torch.bincount(full.flatten() * 2 + ref.flatten(), minlength=4).view(2, 2)
    assert torch.equal(evaluator.confusion, expected)


def test_a_rect_run_trains_validates_and_predicts_at_each_images_size(tmp_path: Path) -> None:
    singular(tmp_path / "set")  # 40x32 images
    cfg = TrainConfig(epochs=1, batch=4, imgsz=32, workers=0, quiet=True, plots=False)
    result = run.train(
        "segment",
        tmp_path / "set",
        model="unet_same",
        model_args={"base": 4, "depth": 2},
        rect=True,
        cfg=cfg,
        project=tmp_path / "runs",
    )
    assert "fg_iou" in run.val(result.best).metrics
    (pred,) = run.predict(result.best, [str(tmp_path / "set" / "image" / "0.jpg")], out=str(tmp_path / "p"))
    assert np.asarray(Image.open(pred.data["mask"])).shape == (32, 40)


def test_imgsz_h_w_trains_and_evaluates_non_square(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--imgsz H W``: training crops are H x W, evaluation fits each image inside H x W (aspect kept,
    padded) and scores it at its own size, predict writes masks at each image's size; other tasks refuse
    two sizes in words."""
    import torch

    from cnnkit.cli import main
    from cnnkit.data.segment import SegmentationTransform, fit_within

    image, mask = torch.zeros(3, 30, 80, dtype=torch.uint8), torch.ones(30, 80, dtype=torch.uint8)
    img, msk = SegmentationTransform((24, 48), train=True, scale=(1.0, 1.0))(image, mask)
    assert img.shape == (3, 24, 48) and msk.shape == (24, 48)
    img, full = SegmentationTransform((24, 48), train=False)(image, mask)
    assert fit_within(30, 80, (24, 48)) == (18, 48)  # the width decides: 80 -> 48, 30 -> 18
    assert img.shape == (3, 24, 48) and full.shape == (30, 80)
    singular(tmp_path / "set")  # 40x32 images (w x h)
    argv = ["train", "segment", "--data", str(tmp_path / "set"), "--model", "unet_same", "--model-args"]
    argv += [
        '{"base": 4, "depth": 2}',
        "--imgsz",
        "24",
        "32",
        "--epochs",
        "1",
        "--batch",
        "4",
        "--workers",
        "0",
    ]
    assert main([*argv, "--quiet", "--no-plots", "--project", str(tmp_path / "runs")]) == 0
    weights = tmp_path / "runs" / "segment" / "exp" / "weights" / "best.safetensors"
    from cnnkit.weights import read_metadata

    assert read_metadata(weights)["imgsz"] == [24, 32]
    assert "fg_iou" in run.val(weights).metrics
    (pred,) = run.predict(weights, [str(tmp_path / "set" / "image" / "0.jpg")], out=str(tmp_path / "p"))
    assert np.asarray(Image.open(pred.data["mask"])).shape == (32, 40)
    capsys.readouterr()
    for c in ("cat", "dog"):
        (tmp_path / "classes" / c).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(tmp_path / "classes" / c / "x.png")
    assert main(["train", "classify", "--data", str(tmp_path / "classes"), "--imgsz", "24", "32"]) == 2
    assert "this task takes one size" in capsys.readouterr().err


def test_builtin_scenes(tmp_path: Path) -> None:
    from cnnkit.cli import main
    from cnnkit.data.scenes import SCENE_CLASSES

    assert main(["data", "builtin", "scenes", "--task", "segment", "--out", str(tmp_path / "s")]) == 0
    spec = resolve_segmentation_data(tmp_path / "s")
    assert (len(spec.train), len(spec.val)) == (240, 60)
    assert spec.names == list(SCENE_CLASSES) and spec.threshold is None and spec.ignore_index == 255
    values = set()
    for _, mask in spec.train[:20]:
        m = read_mask(mask)
        assert m.shape == (96, 128)
        values |= set(np.unique(m).tolist())
    assert values == {0, 1, 2, 3, 255}  # every class, and the void outlines
    assert main(["data", "builtin", "scenes", "--task", "detect", "--out", str(tmp_path / "d")]) == 2
