from __future__ import annotations

import pytest
import torch
import torchvision.ops as tvo
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnkit import ops


def random_boxes(n: int, seed: int, scale: float = 100.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * scale
    wh = torch.rand(n, 2, generator=g) * scale / 3
    return torch.cat([xy, xy + wh], 1)


def test_hand_worked_iou() -> None:
    a = torch.tensor([[2.0, 1.0, 4.0, 3.0]])
    b = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert ops.box_iou(a, b).item() == pytest.approx(1 / 7)
    edge = torch.tensor([[4.0, 1.0, 6.0, 3.0]])  # touches a's right edge
    corner = torch.tensor([[4.0, 3.0, 5.0, 4.0]])  # touches a's corner
    assert ops.box_iou(a, edge).item() == 0.0 and ops.box_iou(a, corner).item() == 0.0
    assert ops.box_iou(a, a).item() == 1.0
    empty = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    assert ops.box_iou(empty, empty).item() == 0.0


def test_formats_round_trip() -> None:
    boxes = random_boxes(20, 0)
    for fmt in ("xywh", "cxcywh"):
        there = ops.convert(boxes, "xyxy", fmt)
        torch.testing.assert_close(ops.convert(there, fmt, "xyxy"), boxes)
        torch.testing.assert_close(there, tvo.box_convert(boxes, "xyxy", fmt))
    clipped = ops.clip(torch.tensor([[-5.0, 2.0, 120.0, 50.0]]), 40, 100)
    assert clipped.tolist() == [[0.0, 2.0, 100.0, 40.0]]


@pytest.mark.parametrize("seed", range(5))
def test_iou_family_equals_torchvision(seed: int) -> None:
    a, b = random_boxes(30, seed), random_boxes(30, seed + 100)
    degenerate = torch.tensor([[5.0, 5.0, 5.0, 9.0], [0, 0, 10, 10], [0, 0, 10, 10], [2, 2, 4, 4]])
    a = torch.cat([a, degenerate, torch.tensor([[0.0, 0, 10, 10]])])
    b = torch.cat([b, torch.tensor([[5.0, 5.0, 5.0, 9.0], [0, 0, 10, 10], [10, 0, 20, 10], [0, 0, 10, 10]]),
                   torch.tensor([[3.0, 3, 4, 4]])])  # fmt: skip
    expected = tvo.box_iou(a, b).nan_to_num(0.0)  # torchvision: 0/0 = NaN for two empty boxes; cnnkit: 0
    torch.testing.assert_close(ops.box_iou(a, b), expected)
    torch.testing.assert_close(ops.elementwise_iou(a, b), expected.diag())
    torch.testing.assert_close(
        ops.generalized_iou(a, b), tvo.generalized_box_iou(a, b).diag().nan_to_num(0.0), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        ops.distance_iou(a, b), tvo.distance_box_iou(a, b).diag().nan_to_num(0.0), atol=1e-5, rtol=0
    )
    ciou = (1 - tvo.complete_box_iou_loss(a, b, reduction="none")).nan_to_num(0.0)
    torch.testing.assert_close(ops.complete_iou(a, b), ciou, atol=1e-4, rtol=0)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(0, 60), seed=st.integers(0, 10_000), thr=st.floats(0.1, 0.9))
def test_nms_equals_torchvision_including_ties(n: int, seed: int, thr: float) -> None:
    boxes = random_boxes(n, seed, 50)
    g = torch.Generator().manual_seed(seed)
    scores = (torch.rand(n, generator=g) * 4).round() / 4  # many ties
    classes = torch.randint(0, 3, (n,), generator=g)
    assert torch.equal(ops.nms(boxes, scores, thr), tvo.nms(boxes, scores, thr))
    assert torch.equal(
        ops.batched_nms(boxes, scores, classes, thr), tvo.batched_nms(boxes, scores, classes, thr)
    )


def test_soft_nms_decays_instead_of_dropping() -> None:
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    keep, new_scores = ops.soft_nms(boxes, scores, method="linear", iou_threshold=0.3)
    iou = ops.box_iou(boxes[:1], boxes[1:2]).item()
    assert keep.tolist() == [0, 2, 1]
    assert new_scores.tolist() == pytest.approx([0.9, 0.7, 0.8 * (1 - iou)])
    keep_g, _ = ops.soft_nms(boxes, scores, method="gaussian", sigma=0.5)
    assert set(keep_g.tolist()) == {0, 1, 2}
    assert ops.nms(boxes, scores, 0.5).tolist() == [0, 2]
