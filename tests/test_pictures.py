"""Pictures of a run, for every task: the first training batches as trained (after augmentation) and a
fixed grid of validation predictions next to their ground truth, drawn where the labels are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.cli import main
from cnnkit.data import builtin
from cnnkit.data.scenes import write_scenes
from cnnkit.tasks.classify import ClassificationTask
from cnnkit.tasks.detect import DetectionTask
from cnnkit.tasks.segment import SegmentationTask
from cnnkit.viz import TILE, Shown, box_colour, draw_tile

QUICK = ["--epochs", "1", "--workers", "0", "--quiet", "--batch", "8"]
TASKS = {
    "classify": (
        lambda root: builtin.write_classification(root, classes=(0, 1, 2), size_range=(28, 36), seed=0),
        ["--model", "resnet18", "--model-args", '{"width": 0.25}', "--imgsz", "32"],
    ),
    "detect": (
        lambda root: builtin.write_detection(root, n_train=16, n_val=8, seed=0),
        ["--backbone-args", '{"width": 0.25}', "--strides", "8", "16", "--imgsz", "64"],
    ),
    "segment": (lambda root: write_scenes(root, n_train=8, n_val=8, size=(40, 56)), ["--imgsz", "64"]),
    "localize": (
        lambda root: builtin.write_localization(root, n_train=16, n_val=8, seed=0),
        ["--imgsz", "64"],
    ),
    "landmarks": (lambda root: builtin.write_landmarks(root, n_train=16, n_val=8, seed=0), ["--imgsz", "64"]),
}


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_draws_its_batches_and_predictions(task: str, tmp_path: Path) -> None:
    write, args = TASKS[task]
    data = write(tmp_path / "data")
    argv = ["train", task, "--data", str(data), *args, *QUICK, "--project", str(tmp_path / "runs")]
    assert main(argv) == 0
    run = tmp_path / "runs" / task / "exp"
    with Image.open(run / "train_batch0.jpg") as im:  # 8 images in rows of 4
        assert im.size == (4 * (TILE + 4), 2 * (TILE + 4))
    with Image.open(run / "val_pred.jpg") as im:  # 8 validation images, truth next to prediction
        assert im.size == (4 * (TILE + 4), 4 * (TILE + 4))
        pixels = np.asarray(im)
    assert pixels.std() > 10  # something was drawn


def test_a_box_is_drawn_where_it_is() -> None:
    image = torch.zeros(3, 64, 96, dtype=torch.uint8)
    tile = np.asarray(draw_tile(Shown(image, [2], torch.tensor([[10.0, 20.0, 50.0, 40.0]])), ["a", "b", "c"]))
    scale = TILE / 96
    row = tile[round(30 * scale)]  # a row through the box: its left and right edges are class 2's colour
    hit = np.nonzero(np.abs(row.astype(int) - box_colour(2)).sum(1) < 60)[0]
    assert abs(hit.min() - 10 * scale) <= 2 and abs(hit.max() - 50 * scale) <= 2


def test_detection_shows_its_targets_and_predictions_in_input_pixels() -> None:
    task = DetectionTask(2, torch.tensor([[[8.0, 8.0]], [[16.0, 16.0]]]), (8, 16))
    images = torch.zeros(2, 3, 32, 32)
    targets = torch.tensor([[0, 1, 2, 3, 12, 14], [1, 0, 5, 6, 20, 30], [1, 1, 0, 0, 8, 8.0]])
    truth = task.show((images, targets, torch.zeros(2, 5)))
    assert [t.classes for t in truth] == [[1], [0, 1]]
    assert torch.equal(truth[1].boxes, targets[1:, 2:])
    outputs = [torch.zeros(2, 4, 4, 1, 7), torch.zeros(2, 2, 2, 1, 7)]
    outputs[0][0, 1, 2, 0, 4:6] = 10.0  # one confident cell: objectness and class 0
    (one, none) = task.show((images, targets, torch.zeros(2, 5)), outputs)
    assert one.classes == [0] and len(none.classes) == 0
    assert one.scores is not None and one.scores[0] > 0.9


def test_classification_marks_right_and_wrong_predictions() -> None:
    task = ClassificationTask(3)
    batch = (torch.zeros(2, 3, 8, 8), torch.tensor([0, 2]))
    logits = torch.tensor([[5.0, 0.0, 0.0], [5.0, 0.0, 0.0]])
    shown = task.show(batch, logits)
    assert [s.classes for s in shown] == [[0], [0]] and [s.ok for s in shown] == [True, False]


def test_segmentation_at_full_resolution_brings_the_image_to_the_mask() -> None:
    task = SegmentationTask(3, rect=True)
    masks = [torch.zeros(30, 60, dtype=torch.long), torch.ones(50, 50, dtype=torch.long)]
    shown = task.show((torch.zeros(2, 3, 32, 32), masks), torch.zeros(2, 3, 32, 32))
    assert [tuple(s.image.shape) for s in shown] == [(3, 30, 60), (3, 50, 50)]
    assert [s.mask.shape for s in shown if s.mask is not None] == [(30, 60), (50, 50)]


def test_the_confusion_matrix_shows_the_shares_its_title_claims(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seen: the title said row-normalised while the cells showed counts, with no colour bar."""
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from cnnkit.viz import plot_confusion

    texts: list[str] = []
    titles: list[str] = []
    bars: list[object] = []
    text, title, colorbar = Axes.text, Axes.set_title, Figure.colorbar
    monkeypatch.setattr(
        Axes, "text", lambda self, x, y, s, **kw: texts.append(s) or text(self, x, y, s, **kw)
    )
    monkeypatch.setattr(Axes, "set_title", lambda self, s, **kw: titles.append(s) or title(self, s, **kw))
    monkeypatch.setattr(Figure, "colorbar", lambda self, *a, **kw: bars.append(1) or colorbar(self, *a, **kw))
    confusion = torch.tensor([[3, 1], [0, 2]])
    plot_confusion(confusion, tmp_path / "cm.png", ["a", "b"], note="boxes scoring > 0.25")
    assert sorted(texts) == ["0.25\n1", "0.75\n3", "1.00\n2"]
    assert "normalised per true class" in titles[0] and "scoring > 0.25" in titles[0] and bars
    with Image.open(tmp_path / "cm.png") as im:
        assert im.size[0] > 300
