"""Object localization, landmarks and convolutional sliding windows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cnnkit
from cnnkit.cli import main
from cnnkit.data.localize import (
    LandmarkDataset,
    LocalizationDataset,
    read_landmarks_csv,
    read_localization,
    read_localization_csv,
)
from cnnkit.data.report import DataReport
from cnnkit.errors import DataError
from cnnkit.sliding import detect_windows, save_heatmap, to_fully_convolutional
from cnnkit.tasks.localize import LandmarkEvaluator, LocalizationEvaluator, LocalizationTask, wing_loss

TINY = [
    "--backbone",
    "resnet18",
    "--backbone-args",
    '{"width": 0.25}',
    "--imgsz",
    "32",
    "--batch",
    "32",
    "--workers",
    "0",
    "--quiet",
    "--lr",
    "0.003",
]


def test_localizer_output_is_the_notes_vector() -> None:
    model = cnnkit.create_model(
        "localizer", backbone="resnet18", backbone_args={"width": 0.25}, num_classes=3
    )
    out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 5 + 3)
    assert ((out[:, 1:5] >= 0) & (out[:, 1:5] <= 1)).all()
    points = cnnkit.create_model("landmarker", backbone="mobilenet_v2", num_points=68)(
        torch.randn(2, 3, 32, 32)
    )
    assert points.shape == (2, 68, 2)


def test_no_object_images_only_train_objectness() -> None:
    task = LocalizationTask(3)
    target = torch.tensor([[0.0, 0, 0, 0, 0, 0], [1.0, 0.5, 0.5, 0.2, 0.4, 2]])
    out = torch.randn(2, 8)
    out[1, 1:5] = target[1, 1:5]  # a perfect box for the object
    loss, _ = task.loss(out, (None, target))
    changed = out.clone()
    changed[0, 1:] += 10  # box and class outputs of the no-object image are "don't care"
    assert task.loss(changed, (None, target))[0].item() == pytest.approx(loss.item())
    changed[1, 1] += 0.1
    assert task.loss(changed, (None, target))[0].item() > loss.item()


def test_localization_metrics_by_hand() -> None:
    ev = LocalizationEvaluator(2)
    target = torch.tensor([[1.0, 0.5, 0.5, 0.4, 0.4, 1], [1.0, 0.5, 0.5, 0.4, 0.4, 0], [0.0, 0, 0, 0, 0, 0]])
    out = torch.tensor(
        [
            [5.0, 0.5, 0.5, 0.4, 0.4, -1, 1],  # detected, right class, IoU 1
            [5.0, 0.6, 0.5, 0.4, 0.4, 1, -1],  # right class, shifted by a quarter box: IoU 0.6
            [-5.0, 0, 0, 0, 0, 0, 0],  # no object, correctly
        ]
    )
    ev.update(out, (None, target))
    m = ev.compute()
    assert m["obj_acc"] == 1.0 and m["cls_acc"] == 1.0
    assert m["miou"] == pytest.approx((1 + 0.3 * 0.4 / (0.32 - 0.3 * 0.4)) / 2)
    assert m["acc_iou50"] == 1.0


def test_localization_csv_json_yolo_and_voc(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "l.csv").write_text("filename,label,xmin,ymin,xmax,ymax\na.png,cat,4,2,20,18\na.png,,,,,\n")
    samples = read_localization_csv(tmp_path / "l.csv")
    assert samples[0].label == "cat" and samples[0].box == (4, 2, 20, 18) and samples[1].label is None
    (tmp_path / "bad.csv").write_text("image,class,x1,y1,x2,y2\na.png,cat,4,2,x,18\n")
    report = DataReport()
    assert read_localization_csv(tmp_path / "bad.csv", report) == []  # the row is skipped, and said
    assert report.problems[0].startswith(f"{tmp_path / 'bad.csv'}:2: box")
    with pytest.raises(DataError, match=r"bad.csv:2: box"):
        read_localization_csv(tmp_path / "bad.csv", strict=True)
    (tmp_path / "l.json").write_text(
        json.dumps(
            [{"image": "a.png", "class": "dog", "box": [1, 1, 5, 5]}, {"image": "a.png", "class": None}]
        )
    )
    samples, _, _, _ = read_localization(tmp_path / "l.json")
    assert [s.label for s in samples] == ["dog", None]
    yolo = tmp_path / "yolo"
    for split in ("train", "val"):
        (yolo / "images" / split).mkdir(parents=True)
        (yolo / "labels" / split).mkdir(parents=True)
        Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(yolo / "images" / split / "x.jpg")
        (yolo / "labels" / split / "x.txt").write_text("0 0.5 0.5 0.1 0.1\n1 0.5 0.5 0.5 0.5\n")
    (yolo / "data.yaml").write_text(
        "path: .\ntrain: images/train\nval: images/val\nnames: {0: cat, 1: dog}\n"
    )
    train, _, names, _ = read_localization(yolo)
    assert names == ["cat", "dog"] and train[0].label == "dog"  # the largest box
    assert train[0].box == pytest.approx((10.0, 5.0, 30.0, 15.0))
    voc = tmp_path / "voc"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(voc / "JPEGImages" / "1.jpg")
    (voc / "Annotations" / "1.xml").write_text(
        "<annotation><filename>1.jpg</filename><object><name>car</name><bndbox><xmin>2</xmin><ymin>3</ymin>"
        "<xmax>30</xmax><ymax>15</ymax></bndbox></object></annotation>"
    )
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "train.txt").write_text("1\n")
    (voc / "ImageSets" / "Main" / "val.txt").write_text("1\n")
    samples, _, _, _ = read_localization(voc)
    # one VOC reader for every task: 1-based pixel coordinates become 0-based xyxy, as in detection
    assert samples[0].label == "car" and samples[0].box == (1, 2, 30, 15)
    (voc / "Annotations" / "2.xml").write_text(
        "<annotation><filename>1.jpg</filename><object><name>car</name><bndbox><xmin>2</xmin><ymin>x</ymin>"
        "<xmax>30</xmax><ymax>15</ymax></bndbox></object></annotation>"
    )
    (voc / "ImageSets" / "Main" / "train.txt").write_text("1\n2\n")
    _, _, _, report = read_localization(voc)  # a bad box is reported with its file, not turned into NaN
    assert any("2.xml" in p and "bndbox" in p for p in report.problems)


def test_localization_dataset_normalises_the_box(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "l.csv").write_text("image,class,x1,y1,x2,y2\na.png,cat,10,5,30,15\na.png,none,,,,\n")
    ds = LocalizationDataset(read_localization_csv(tmp_path / "l.csv"), ["cat"], 16, train=False)
    _, target = ds[0]
    assert target.tolist() == pytest.approx([1.0, 0.5, 0.5, 0.5, 0.5, 0.0])  # centre, height, width
    assert ds[1][1].tolist() == [0.0] * 6


def _kites(tmp_path: Path, n: int = 12) -> Path:
    from cnnkit.data.builtin import write_landmarks

    return write_landmarks(tmp_path / "kites", n_train=n, n_val=4, size=48)


def test_flip_swaps_left_and_right_points(tmp_path: Path) -> None:
    from cnnkit.data.localize import read_landmarks

    train, _, options = read_landmarks(_kites(tmp_path))
    assert options["flip_pairs"] == [[1, 3]]
    torch.manual_seed(0)
    swapped = LandmarkDataset(train, 32, True, options["flip_pairs"])
    plain = LandmarkDataset(train, 32, True, [])
    flips_seen = 0
    for i in range(len(train)):
        for _ in range(3):
            _, pts, _ = swapped[i]
            assert pts[1, 0] > pts[3, 0]  # "right" stays right of "left" whatever the augmentation
            _, pts2, _ = plain[i]
            flips_seen += int(pts2[1, 0] < pts2[3, 0])  # without the swap, a flip mislabels them
    assert flips_seen > 0


def test_landmark_csv_68_points_and_invisible_points(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((50, 50, 3), np.uint8)).save(tmp_path / "f.jpg")
    header = "image," + ",".join(f"part_{i}_x,part_{i}_y" for i in range(68))
    values = [str(float(i % 40)) for i in range(136)]
    values[0], values[3] = "", "-1"  # point 0 missing, point 1 negative: both invisible
    (tmp_path / "faces.csv").write_text(header + "\nf.jpg," + ",".join(values) + "\n")
    (s,) = read_landmarks_csv(tmp_path / "faces.csv")
    assert s.points.shape == (68, 2) and not s.visible[0] and not s.visible[1] and s.visible[2:].all()
    (tmp_path / "bad.csv").write_text("image,x0,y0\nf.jpg,1\nf.jpg,oops,2\nf.jpg,3,4\n")
    report = DataReport()
    assert len(read_landmarks_csv(tmp_path / "bad.csv", report)) == 1  # text is not an invisible point
    assert [p.split(": ")[0] for p in report.problems] == [f"{tmp_path / 'bad.csv'}:{n}" for n in (2, 3)]
    with pytest.raises(DataError, match=r"bad.csv:2"):
        read_landmarks_csv(tmp_path / "bad.csv", strict=True)
    outside = read_landmarks_csv(tmp_path / "faces.csv")
    far = type(outside[0])(outside[0].path, outside[0].points.clone(), outside[0].visible.clone())
    far.points[5] = torch.tensor([80.0, 10.0])  # beyond the 50 px image
    _, _, vis = LandmarkDataset([far], 32, False)[0]
    assert not vis[5] and vis[6]


def test_nme_pck_and_wing_by_hand() -> None:
    points = torch.tensor([[[0.0, 0.0], [0.4, 0.0], [0.0, 0.3]]])
    pred = points + torch.tensor([[[0.02, 0.0], [0.0, 0.0], [0.0, 0.1]]])
    visible = torch.ones(1, 3, dtype=torch.bool)
    ev = LandmarkEvaluator(norm_points=(0, 1))  # distance 0.4
    ev.update(pred, (None, points, visible))
    assert ev.compute()["nme"] == pytest.approx((0.05 + 0 + 0.25) / 3)
    assert ev.compute()["pck"] == pytest.approx(2 / 3)
    ev = LandmarkEvaluator()  # box diagonal 0.5
    ev.update(pred, (None, points, visible))
    assert ev.compute()["nme"] == pytest.approx((0.04 + 0 + 0.2) / 3)
    w = 10.0
    assert wing_loss(torch.tensor([w - 1e-4, w + 1e-4])).diff().abs().item() < 1e-3  # continuous at w
    assert wing_loss(torch.tensor([1.0])).item() == pytest.approx(w * math.log(1 + 1 / 2))


def test_fully_convolutional_equals_the_classifier_and_its_crops(tmp_path: Path) -> None:
    model = cnnkit.create_model("tinyconvnet", num_classes=4).eval()
    fcn = to_fully_convolutional(model, 14)
    x = torch.randn(2, 3, 14, 14)
    with torch.no_grad():
        torch.testing.assert_close(fcn(x).flatten(1), model(x), atol=1e-5, rtol=0)
        big = torch.randn(1, 3, 28, 28)
        scores = fcn(big)
        assert scores.shape == (1, 4, 8, 8) and fcn.stride == 2
        for i, j in [(0, 0), (0, 7), (3, 5), (7, 7)]:
            x1, y1, x2, y2 = fcn.window_box(i, j)
            torch.testing.assert_close(
                scores[0, :, i, j], model(big[..., y1:y2, x1:x2])[0], atol=1e-5, rtol=0
            )
    image = (torch.rand(3, 28, 28) * 255).to(torch.uint8)
    found = detect_windows(fcn, image.float() / 255, threshold=0.0, iou_threshold=0.3)
    assert len(found.boxes) >= 1 and (found.boxes[:, 2] - found.boxes[:, 0] == 14).all()
    assert save_heatmap(image, found.score_map, tmp_path / "heat.png").is_file()


@pytest.mark.parametrize(("name", "size"), [("vgg11", 224), ("resnet18", 64), ("mobilenet_v2", 64)])
def test_zoo_classifiers_convert_exactly_at_their_training_size(name: str, size: int) -> None:
    model = cnnkit.create_model(name, num_classes=5).eval()
    fcn = to_fully_convolutional(model, size)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(fcn(x).flatten(1), model(x), atol=1e-5, rtol=0)
        assert fcn(torch.randn(1, 3, size + 64, size + 96)).shape == (1, 5, 3, 4)


def test_localize_and_landmarks_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cnnkit.data.builtin import write_localization

    torch.manual_seed(0)
    clf = cnnkit.create_model("resnet18", num_classes=10, width=0.25)
    pretrained = cnnkit.save_weights(clf, tmp_path / "clf.safetensors")
    data = write_localization(tmp_path / "loc", n_train=96, n_val=32)
    args = [
        "train",
        "localize",
        "--data",
        str(data),
        *TINY,
        "--epochs",
        "3",
        "--pretrained",
        str(pretrained),
        "--project",
        str(tmp_path),
    ]
    assert main(args) == 0
    weights = tmp_path / "localize" / "exp" / "weights" / "best.safetensors"
    model = cnnkit.load_model(weights)
    assert model.backbone.num_features == 128
    capsys.readouterr()
    assert main(["val", "localize", "--weights", str(weights), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    assert set(metrics) == {"obj_acc", "cls_acc", "miou", "acc_iou50", "val_loss"} and metrics["miou"] > 0.2
    image = sorted((data / "images" / "val").iterdir())[0]
    assert (
        main(
            [
                "predict",
                "localize",
                "--weights",
                str(weights),
                str(image),
                "--out",
                str(tmp_path / "p"),
                "--json",
                "--conf",
                "0",
            ]
        )
        == 0
    )
    (pred,) = json.loads(capsys.readouterr().out)
    assert len(pred["box"]) == 4 and Path(pred["drawn"]).is_file()

    kites = _kites(tmp_path, n=96)
    args = [
        "train",
        "landmarks",
        "--data",
        str(kites),
        *TINY,
        "--epochs",
        "6",  # 4 validation images make the NME noisy: at 4 epochs it had not yet fallen below epoch 1's
        "--loss",
        "wing",
        "--project",
        str(tmp_path),
    ]
    assert main(args) == 0
    rows = (tmp_path / "landmarks" / "exp" / "results.csv").read_text().splitlines()
    nme = [float(r.split(",")[rows[0].split(",").index("nme")]) for r in rows[1:]]
    assert nme[-1] < nme[0]
    weights = tmp_path / "landmarks" / "exp" / "weights" / "best.safetensors"
    capsys.readouterr()
    assert (
        main(
            [
                "predict",
                "landmarks",
                "--weights",
                str(weights),
                str(kites / "images" / "val"),
                "--json",
                "--out",
                str(tmp_path / "lp"),
            ]
        )
        == 0
    )
    preds = json.loads(capsys.readouterr().out)
    assert len(preds) == 4 and all(len(p["points"]) == 4 for p in preds)
