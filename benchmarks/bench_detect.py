"""Detection: NMS vs torchvision, dense-output postprocess vs ultralytics, COCO evaluation vs pycocotools.

Run: ``python -m benchmarks.bench_detect`` (part of ``make bench``). Speed ratios > 1 mean cnnkit is faster.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torchvision.ops as tvo

from benchmarks.harness import compare, header
from cnnkit.ops import BoxFormat, batched_nms, multiclass_nms, soft_nms
from cnnkit.tasks.coco_eval import STAT_NAMES, CocoEvaluator, pycocotools_eval


def _boxes(n: int, seed: int, classes: int = 80) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 640
    boxes = torch.cat([xy, xy + 8 + torch.rand(n, 2, generator=g) * 120], 1)
    return boxes, torch.rand(n, generator=g), torch.randint(0, classes, (n,), generator=g)


def bench_nms() -> None:
    print(header("torchvision.ops.batched_nms", classes=80, iou=0.5))
    for n in (1000, 5000, 20000):
        boxes, scores, classes = _boxes(n, n)
        ours, theirs = batched_nms(boxes, scores, classes, 0.5), tvo.batched_nms(boxes, scores, classes, 0.5)
        same = "same indices" if torch.equal(ours, theirs) else "same set, tied scores ordered apart"
        if set(ours.tolist()) != set(theirs.tolist()):
            same = "DIFFERENT kept boxes"
        c = compare(
            f"batched NMS {n} boxes",
            lambda b=boxes, s=scores, k=classes: batched_nms(b, s, k, 0.5),
            lambda b=boxes, s=scores, k=classes: tvo.batched_nms(b, s, k, 0.5),
            repeat=3,
        )
        print(c.line(f"(target: time ratio <= 1.2, i.e. speed >= 0.83x; {same})"))
    boxes, scores, _ = _boxes(1000, 7)
    c = compare(
        "soft-NMS (gaussian) vs greedy NMS, 1000",
        lambda: soft_nms(boxes, scores),
        lambda: tvo.nms(boxes, scores, 0.5),
        pairs=3,
    )
    print(c.line("(soft-NMS has no torchvision twin: reported on its own)"))


def dense_output(seed: int, objects: int = 30, n: int = 8400, classes: int = 80) -> torch.Tensor:
    """A trained YOLOv8-like output ``[1, 4 + C, N]`` (cxcywh + class scores): low scores everywhere
    except ~20 predictions per object (``objects`` of them) that agree on its box within 5-8% of its
    size, as a trained network's neighbouring cells do."""
    g = torch.Generator().manual_seed(seed)
    pred = torch.empty(1, 4 + classes, n)
    centre = torch.rand(objects, 2, generator=g) * 600 + 20
    size = torch.rand(objects, 2, generator=g) * 150 + 10
    owner = torch.randint(0, objects, (n,), generator=g)
    pred[0, :2] = (centre[owner] + torch.randn(n, 2, generator=g) * 0.05 * size[owner]).T
    pred[0, 2:4] = (size[owner] * (1 + 0.08 * torch.randn(n, 2, generator=g))).abs().T
    pred[0, 4:] = torch.sigmoid(torch.randn(classes, n, generator=g) - 7)
    hot = torch.randperm(n, generator=g)[: objects * 20]
    pred[0, 4 + (owner[hot] % classes), hot] = 0.3 + 0.7 * torch.rand(len(hot), generator=g)
    return pred


def _ours(pred: torch.Tensor, conf: float, iou: float) -> list:
    return multiclass_nms(
        pred[:, :4].transpose(1, 2),
        pred[:, 4:].transpose(1, 2),
        conf=conf,
        iou=iou,
        max_det=300,
        box_format=BoxFormat.CXCYWH,
    )


def _same(ours: list, theirs: list) -> bool:
    a, b = ours[0], theirs[0]
    if len(a) != len(b):
        return False
    key = lambda t: sorted(map(tuple, t.round(decimals=3).tolist()))  # noqa: E731
    mine = torch.cat([a.boxes, a.scores[:, None], a.labels[:, None].float()], 1)
    return key(mine) == key(b[:, :6])


def bench_postprocess() -> None:
    try:
        from ultralytics.utils.nms import non_max_suppression
    except ImportError:
        try:
            from ultralytics.utils.ops import non_max_suppression  # older releases
        except ImportError:
            print("ultralytics not installed (pip install -e '.[bench]'): postprocess comparison skipped")
            return
    import ultralytics

    print(header(f"ultralytics {ultralytics.__version__} non_max_suppression", input="1x84x8400"))
    for label, pred, conf in (
        ("trained-like output, conf 0.25", dense_output(0), 0.25),
        ("dense candidates, conf 0.001", dense_output(1), 0.001),
    ):
        same = _same(_ours(pred, conf, 0.7), non_max_suppression(pred.clone(), conf, 0.7, max_det=300))
        c = compare(
            label,
            lambda p=pred, t=conf: _ours(p, t, 0.7),
            lambda p=pred, t=conf: non_max_suppression(p, t, 0.7, max_det=300),
            repeat=5 if conf > 0.01 else 1,
            pairs=7 if conf > 0.01 else 3,
        )
        print(c.line(f"(target >= 1.5x; same kept boxes: {same})"))


def coco_case(n_img: int = 500, classes: int = 80, seed: int = 0) -> tuple[list, list]:
    rng = np.random.default_rng(seed)
    gts, dts = [], []
    for _ in range(n_img):
        g = int(rng.integers(1, 12))
        xy, wh = rng.uniform(0, 500, (g, 2)), rng.uniform(8, 200, (g, 2))
        gb, gl = np.concatenate([xy, xy + wh], 1), rng.integers(0, classes, g)
        d = int(rng.integers(10, 100))
        src = rng.integers(0, g, d)
        db = gb[src] + rng.normal(0, 10, (d, 4))
        db[:, 2:] = np.maximum(db[:, 2:], db[:, :2] + 1)
        dl = np.where(rng.random(d) < 0.7, gl[src], rng.integers(0, classes, d))
        gts.append((gb, gl))
        dts.append((db, rng.random(d), dl))
    return gts, dts


def _cnnkit_coco(gts: Sequence, dts: Sequence, classes: int) -> dict[str, float]:
    ev = CocoEvaluator(classes)
    for (gb, gl), (db, ds, dl) in zip(gts, dts):
        ev.add(gb, gl, db, ds, dl)
    return ev.compute().stats


def _pycocotools(gts: Sequence, dts: Sequence, classes: int) -> list[float]:
    return list(pycocotools_eval(gts, dts, classes).stats)


def bench_coco() -> None:
    try:
        import pycocotools  # noqa: F401
    except ImportError:
        print("pycocotools not installed (pip install -e '.[bench]'): COCO comparison skipped")
        return
    gts, dts = coco_case()
    n_dets = sum(len(d[1]) for d in dts)
    print(
        header("pycocotools COCOeval (evaluate + accumulate + summarize)", images=len(gts), detections=n_dets)
    )
    ours, theirs = _cnnkit_coco(gts, dts, 80), _pycocotools(gts, dts, 80)
    diff = max(abs(ours[k] - v) for k, v in zip(STAT_NAMES, theirs))
    c = compare(
        "COCO bbox evaluation",
        lambda: _cnnkit_coco(gts, dts, 80),
        lambda: _pycocotools(gts, dts, 80),
        pairs=3,
        warmup=0,
    )
    print(c.line(f"(target >= 1.0x; max |difference| of the 12 numbers {diff:.1e}; mAP {ours['mAP']:.4f})"))


def main(argv: list[str] | None = None) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    bench_nms()
    bench_postprocess()
    bench_coco()


if __name__ == "__main__":
    main()
