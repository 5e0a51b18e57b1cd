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
    b = torch.cat(
        [
            b,
            torch.tensor([[5.0, 5.0, 5.0, 9.0], [0, 0, 10, 10], [10, 0, 20, 10], [0, 0, 10, 10]]),
            torch.tensor([[3.0, 3, 4, 4]]),
        ]
    )
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


VOC_ANCHORS = torch.tensor(
    [[1.3221, 1.73145], [3.19275, 4.00944], [5.05587, 8.09892], [9.47112, 4.84053], [11.2364, 10.0071]]
)


def test_yolo_encode_then_decode_gives_the_boxes_back() -> None:
    from cnnkit.ops.yolo import decode, encode

    boxes = torch.tensor([[0.31, 0.42, 0.2, 0.3], [0.77, 0.18, 0.5, 0.25], [0.05, 0.93, 0.08, 0.1]])
    labels = torch.tensor([3, 0, 7])
    enc = encode(boxes, labels, VOC_ANCHORS, 13)
    assert enc.collisions == 0 and int((enc.target[..., 4] > 0).sum()) == 3
    raw = torch.cat([enc.target[..., :4], torch.full_like(enc.target[..., :1], 20.0)], -1)[None]
    decoded = decode(raw, VOC_ANCHORS)[0]
    cells = enc.target[..., 4] > 0
    got = decoded[cells][:, :4]
    order = [int(i) for i in enc.labels[cells].argsort()]
    expected = boxes[labels.argsort()]
    torch.testing.assert_close(got[order], expected, atol=1e-5, rtol=0)
    # the object sits in the cell holding its centre, on the anchor of the most similar shape
    gy, gx, a = (int(v) for v in (enc.labels == 3).nonzero()[0])
    assert (gx, gy) == (int(0.31 * 13), int(0.42 * 13))
    assert a == int(shape_iou_best(boxes[0, 2:] * 13))


def shape_iou_best(wh: torch.Tensor) -> torch.Tensor:
    from cnnkit.ops.yolo import shape_iou

    return shape_iou(wh[None], VOC_ANCHORS).argmax()


def test_two_objects_on_one_cell_and_anchor_collide() -> None:
    from cnnkit.ops.yolo import encode

    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.51, 0.52, 0.21, 0.19]])
    enc = encode(boxes, torch.tensor([1, 2]), VOC_ANCHORS, 13)
    assert enc.collisions == 1 and int((enc.labels >= 0).sum()) == 1


def test_anchor_kmeans_finds_the_clusters() -> None:
    from cnnkit.ops.yolo import kmeans_anchors

    g = torch.Generator().manual_seed(0)
    true = torch.tensor([[1.0, 1.0], [3.0, 6.0], [8.0, 3.0]])
    wh = torch.cat([c * (1 + 0.05 * torch.randn(200, 2, generator=g)) for c in true])
    fit = kmeans_anchors(wh, 3, seed=0)
    torch.testing.assert_close(fit.anchors, true, atol=0.15, rtol=0.05)
    assert fit.mean_iou > 0.85
    assert torch.equal(kmeans_anchors(wh, 3, seed=0).anchors, fit.anchors)  # seeded
    assert kmeans_anchors(wh, 1, seed=0).mean_iou < fit.mean_iou
