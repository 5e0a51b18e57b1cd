"""COCO detection metrics, numerically identical to pycocotools' ``COCOeval`` (bbox), vectorised.

The rules are pycocotools' own, restated:

* Per image and class, detections are sorted by score (stable) and only the best ``max(MAX_DETS)``
  are kept. Each detection, in that order, takes the still unmatched ground-truth box of its class
  with the highest IoU at or above the threshold (the last one on a tie); boxes marked *ignore*
  (crowd, or an area outside the range being evaluated) are only tried when no regular box matches, a
  crowd box may absorb any number of detections and its IoU is ``intersection / detection area``.
* A detection matched to an ignored box, or unmatched with an area outside the range, counts as
  neither true nor false positive.
* Per class, the detections of all images (image order, then score order) are sorted by score
  (stable); precision is made monotone from the right and read at the 101 recall thresholds
  ``0, 0.01, ..., 1``; AP is their mean, and a class without ground truth is left out (-1).

Where pycocotools loops over ``(image, class, area, threshold, detection, ground truth)`` in Python,
this processes one score rank at a time for every class of an image, vectorised over thresholds,
area ranges and ground-truth boxes; the accumulation is vectorised over thresholds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
MAX_DETS = (1, 10, 100)
AREA_RANGES = {
    "all": (0.0, 1e5**2),
    "small": (0.0, 32.0**2),
    "medium": (32.0**2, 96.0**2),
    "large": (96.0**2, 1e5**2),
}
STAT_NAMES = (
    "mAP",
    "mAP50",
    "mAP75",
    "mAP_small",
    "mAP_medium",
    "mAP_large",
    "AR1",
    "AR10",
    "AR100",
    "AR_small",
    "AR_medium",
    "AR_large",
)


def box_iou_xywh(dt: np.ndarray, gt: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """pycocotools' box IoU: ``dt [D, 4], gt [G, 4]`` as ``x, y, w, h`` -> ``[D, G]``; for a crowd box
    the union is the detection's area."""
    dx2, dy2 = dt[:, 0] + dt[:, 2], dt[:, 1] + dt[:, 3]
    gx2, gy2 = gt[:, 0] + gt[:, 2], gt[:, 1] + gt[:, 3]
    iw = np.minimum(dx2[:, None], gx2[None]) - np.maximum(dt[:, None, 0], gt[None, :, 0])
    ih = np.minimum(dy2[:, None], gy2[None]) - np.maximum(dt[:, None, 1], gt[None, :, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    da, ga = dt[:, 2] * dt[:, 3], gt[:, 2] * gt[:, 3]
    union = np.where(crowd[None], da[:, None], da[:, None] + ga[None] - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
    return np.where(union > 0, iou, 0.0)


@dataclass
class _ImageResult:
    labels: np.ndarray  # [D] class of each kept detection
    scores: np.ndarray  # [D]
    rank: np.ndarray  # [D] position within its class by score
    matched: np.ndarray  # [T, A, D] bool
    ignored: np.ndarray  # [T, A, D] bool
    gt_labels: np.ndarray  # [G]
    gt_ignored: np.ndarray  # [A, G] bool


@dataclass
class CocoResult:
    """``precision [T, R, K, A, M]`` and ``recall [T, K, A, M]`` exactly as pycocotools' ``eval``."""

    precision: np.ndarray
    recall: np.ndarray
    stats: dict[str, float] = field(default_factory=dict)
    #: At IoU 0.5 (area all, 100 detections), per class against a confidence grid ``[1000]``: raw
    #: precision and recall ``[K, 1000]`` of the detections scoring at least that much (NaN: no ground truth).
    conf_grid: np.ndarray = field(default_factory=lambda: np.linspace(0, 1, 1000))
    p_curve: np.ndarray = field(default_factory=lambda: np.zeros((0, 1000)))
    r_curve: np.ndarray = field(default_factory=lambda: np.zeros((0, 1000)))

    def best_f1(self) -> tuple[float, float, float, float]:
        """``(precision, recall, F1, confidence)`` at the confidence maximising the class-mean F1 (IoU
        0.5), averaged over classes with ground truth — the P and R detection tables report."""
        f1 = self.mean_f1()
        if f1 is None:
            return 0.0, 0.0, 0.0, 0.0
        i = int(f1.argmax())
        valid = ~np.isnan(self.p_curve[:, 0])
        p, r = self.p_curve[valid, i], self.r_curve[valid, i]
        return float(p.mean()), float(r.mean()), float(f1[i]), float(self.conf_grid[i])

    def per_class_pr(self) -> tuple[np.ndarray, np.ndarray]:
        """``[K]`` precision and recall of each class at the confidence :meth:`best_f1` picks (NaN for a
        class without ground truth): the per-class P and R detection tables report."""
        f1 = self.mean_f1()
        if f1 is None:
            nan = np.full(len(self.p_curve), np.nan)
            return nan, nan
        i = int(f1.argmax())
        return self.p_curve[:, i], self.r_curve[:, i]

    def mean_f1(self) -> np.ndarray | None:
        """``[1000]`` F1 against the confidence grid, averaged over the classes with ground truth (IoU
        0.5); None when no class has any."""
        valid = ~np.isnan(self.p_curve[:, 0])
        if not valid.any():
            return None
        p, r = self.p_curve[valid], self.r_curve[valid]
        return np.asarray((2 * p * r / (p + r + 1e-16)).mean(0))

    def per_class_ap(self, iou: float | None = None) -> np.ndarray:
        """``[K]`` AP per class (area all, 100 detections) over IoU 0.5:0.95, or at one ``iou``; NaN for a
        class without ground truth."""
        p = self.precision[:, :, :, 0, -1]
        if iou is not None:
            p = p[np.flatnonzero(np.isclose(IOU_THRESHOLDS, iou))]
        valid = p > -1
        with np.errstate(invalid="ignore"):
            return np.where(valid.any((0, 1)), (p * valid).sum((0, 1)) / valid.sum((0, 1)), np.nan)


class CocoEvaluator:
    """Accumulate ground truth and detections image by image, then :meth:`compute`.

    Boxes are ``xyxy`` in pixels (any consistent unit; the area ranges assume pixels). Classes are
    ``0 .. num_classes - 1``; detections of other classes are ignored.
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.images: list[_ImageResult] = []

    def add(
        self,
        gt_boxes: np.ndarray,
        gt_labels: np.ndarray,
        boxes: np.ndarray,
        scores: np.ndarray,
        labels: np.ndarray,
        *,
        gt_crowd: np.ndarray | None = None,
        gt_area: np.ndarray | None = None,
    ) -> None:
        """One image: ground truth ``gt_boxes [G, 4]`` xyxy and ``gt_labels [G]`` (optionally crowd flags
        and the annotation areas COCO stores, used for the size ranges), detections ``boxes [D, 4]``
        xyxy, ``scores [D]`` and ``labels [D]``."""
        gt_xywh = _xywh(np.asarray(gt_boxes, np.float64).reshape(-1, 4))
        gt_labels = np.asarray(gt_labels, np.int64).reshape(-1)
        crowd = np.zeros(len(gt_labels), bool) if gt_crowd is None else np.asarray(gt_crowd, bool)
        area = gt_xywh[:, 2] * gt_xywh[:, 3] if gt_area is None else np.asarray(gt_area, np.float64)
        dt_xywh = _xywh(np.asarray(boxes, np.float64).reshape(-1, 4))
        scores = np.asarray(scores, np.float64).reshape(-1)
        labels = np.asarray(labels, np.int64).reshape(-1)

        known = (labels >= 0) & (labels < self.num_classes)
        dt_xywh, scores, labels = dt_xywh[known], scores[known], labels[known]
        order = np.lexsort((-scores, labels))  # by class, then score descending; stable
        dt_xywh, scores, labels = dt_xywh[order], scores[order], labels[order]
        first = np.searchsorted(labels, labels, side="left")
        rank = np.arange(len(labels)) - first
        keep = rank < MAX_DETS[-1]
        dt_xywh, scores, labels, rank = dt_xywh[keep], scores[keep], labels[keep], rank[keep]

        ranges = np.array(list(AREA_RANGES.values()))  # [A, 2]
        gt_ignored = crowd[None] | (area[None] < ranges[:, :1]) | (area[None] > ranges[:, 1:])  # [A, G]
        iou = box_iou_xywh(dt_xywh, gt_xywh, crowd)
        iou[labels[:, None] != gt_labels[None]] = -1.0  # classes never match each other
        matched_gt, matched = _match(iou, rank, crowd, gt_ignored)
        dt_area = dt_xywh[:, 2] * dt_xywh[:, 3]
        out_of_range = (dt_area[None] < ranges[:, :1]) | (dt_area[None] > ranges[:, 1:])  # [A, D]
        a_idx = np.arange(len(ranges))[None, :, None]
        on_ignored = matched & gt_ignored[a_idx, np.maximum(matched_gt, 0)] if len(gt_labels) else matched
        ignored = on_ignored | (~matched & out_of_range[None])
        self.images.append(_ImageResult(labels, scores, rank, matched, ignored, gt_labels, gt_ignored))

    def compute(self) -> CocoResult:
        t, r, k, a, m = (len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), self.num_classes, len(AREA_RANGES), 3)
        precision = -np.ones((t, r, k, a, m))
        recall = -np.ones((t, k, a, m))
        grid = np.linspace(0, 1, 1000)
        p_curve, r_curve = np.full((k, len(grid)), np.nan), np.full((k, len(grid)), np.nan)
        if not self.images:
            return CocoResult(precision, recall, _summarize(precision, recall), grid, p_curve, r_curve)
        labels = np.concatenate([im.labels for im in self.images])
        scores = np.concatenate([im.scores for im in self.images])
        rank = np.concatenate([im.rank for im in self.images])
        matched = np.concatenate([im.matched for im in self.images], axis=2)
        ignored = np.concatenate([im.ignored for im in self.images], axis=2)
        gt_labels = np.concatenate([im.gt_labels for im in self.images])
        gt_regular = ~np.concatenate([im.gt_ignored for im in self.images], axis=1)  # [A, G]
        by_class = np.argsort(labels, kind="stable")  # keeps image order, then score order
        bounds = np.searchsorted(labels[by_class], np.arange(k + 1))
        for ki in range(k):
            idx = by_class[bounds[ki] : bounds[ki + 1]]
            npig = gt_regular[:, gt_labels == ki].sum(1)  # [A]
            for mi, max_det in enumerate(MAX_DETS):
                sel = idx[rank[idx] < max_det]
                order = np.argsort(-scores[sel], kind="mergesort")
                sel = sel[order]
                for ai in range(a):
                    if npig[ai] == 0:
                        continue
                    dtm, dti = matched[:, ai, sel], ignored[:, ai, sel]  # [T, D]
                    tp = np.cumsum(dtm & ~dti, axis=1).astype(float)
                    fp = np.cumsum(~dtm & ~dti, axis=1).astype(float)
                    nd = tp.shape[1]
                    rc = tp / npig[ai]
                    pr = tp / (fp + tp + np.spacing(1))
                    recall[:, ki, ai, mi] = rc[:, -1] if nd else 0.0
                    if ai == 0 and mi == len(MAX_DETS) - 1:
                        counted = ~dti[0]
                        neg = -scores[sel][counted]
                        r_curve[ki] = np.interp(-grid, neg, rc[0, counted], left=0) if neg.size else 0.0
                        p_curve[ki] = np.interp(-grid, neg, pr[0, counted], left=1) if neg.size else 0.0
                    pr = np.flip(np.maximum.accumulate(np.flip(pr, 1), 1), 1)  # monotone from the right
                    q = np.zeros((t, r))
                    for ti in range(t):
                        inds = np.searchsorted(rc[ti], RECALL_THRESHOLDS, side="left")
                        ok = inds < nd
                        q[ti, ok] = pr[ti, inds[ok]]
                    precision[:, :, ki, ai, mi] = q
        return CocoResult(precision, recall, _summarize(precision, recall), grid, p_curve, r_curve)


def _xywh(xyxy: np.ndarray) -> np.ndarray:
    return np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], 1)


def _match(
    iou: np.ndarray, rank: np.ndarray, crowd: np.ndarray, gt_ignored: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy matching of one image: ``(gt index [T, A, D] or -1, matched [T, A, D])``.

    Detections of the same rank belong to different classes, so they never compete for a box and are
    matched together.
    """
    d, g = iou.shape
    t, a = len(IOU_THRESHOLDS), gt_ignored.shape[0]
    matched_gt = np.full((t, a, d), -1, np.int64)
    if d == 0 or g == 0:
        return matched_gt, matched_gt >= 0
    thr = np.minimum(IOU_THRESHOLDS, 1 - 1e-10)[None, :, None, None]
    taken = np.zeros((t, a, g), bool)
    for r in range(int(rank.max()) + 1):
        ds = np.flatnonzero(rank == r)
        rows = iou[ds][:, None, None, :]  # [n, 1, 1, G]
        ok = (rows >= thr) & (~taken | crowd)[None]  # [n, T, A, G]
        choice = np.full((len(ds), t, a), -1, np.int64)
        for pool in (ok & gt_ignored[None, None], ok & ~gt_ignored[None, None]):  # regular boxes win
            masked = np.where(pool, rows, -np.inf)
            best = g - 1 - np.argmax(masked[..., ::-1], axis=-1)  # the last of equal IoUs, like pycocotools
            choice = np.where(pool.any(-1), best, choice)
        matched_gt[:, :, ds] = choice.transpose(1, 2, 0)
        n_i, t_i, a_i = np.nonzero(choice >= 0)
        taken[t_i, a_i, choice[n_i, t_i, a_i]] = True
    return matched_gt, matched_gt >= 0


def _summarize(precision: np.ndarray, recall: np.ndarray) -> dict[str, float]:
    """pycocotools' 12 numbers (``COCOeval.summarize``), -1 where nothing was evaluated."""

    def mean(s: np.ndarray) -> float:
        valid = s[s > -1]
        return float(valid.mean()) if valid.size else -1.0

    values = [
        mean(precision[..., 0, 2]),
        mean(precision[0, ..., 0, 2]),
        mean(precision[5, ..., 0, 2]),
        *(mean(precision[..., ai, 2]) for ai in (1, 2, 3)),
        *(mean(recall[..., 0, mi]) for mi in range(3)),
        *(mean(recall[..., ai, 2]) for ai in (1, 2, 3)),
    ]
    return dict(zip(STAT_NAMES, values))


def evaluate_coco(
    ground_truth: Sequence[tuple[np.ndarray, np.ndarray]],
    detections: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    num_classes: int,
) -> CocoResult:
    """COCO metrics of per-image ``(gt_boxes, gt_labels)`` and ``(boxes, scores, labels)`` (xyxy)."""
    ev = CocoEvaluator(num_classes)
    for (gb, gl), (db, ds, dl) in zip(ground_truth, detections, strict=True):
        ev.add(gb, gl, db, ds, dl)
    return ev.compute()


def pycocotools_eval(
    ground_truth: Sequence[tuple[np.ndarray, np.ndarray]],
    detections: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    num_classes: int,
    *,
    gt_crowd: Sequence[np.ndarray] | None = None,
    gt_area: Sequence[np.ndarray] | None = None,
) -> Any:
    """The same inputs as :func:`evaluate_coco` (plus optional per-image crowd flags and annotation areas)
    evaluated by pycocotools' ``COCOeval`` itself, for cross-checks; returns it after ``evaluate``,
    ``accumulate`` and ``summarize`` (``.stats``, ``.eval["precision"]``). Needs pycocotools."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    anns: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for i, ((gb, gl), (db, ds, dl)) in enumerate(zip(ground_truth, detections, strict=True)):
        xywh = _xywh(np.asarray(gb, np.float64).reshape(-1, 4))
        crowd = gt_crowd[i] if gt_crowd is not None else np.zeros(len(xywh), bool)
        area = gt_area[i] if gt_area is not None else xywh[:, 2] * xywh[:, 3]
        for box, lab, c, a in zip(xywh.tolist(), np.asarray(gl).tolist(), crowd, area):
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": int(lab) + 1,
                    "bbox": box,
                    "area": float(a),
                    "iscrowd": int(c),
                }
            )
        det_xywh = _xywh(np.asarray(db, np.float64).reshape(-1, 4))
        for box, score, lab in zip(det_xywh.tolist(), np.asarray(ds).tolist(), np.asarray(dl).tolist()):
            results.append(
                {"image_id": i + 1, "category_id": int(lab) + 1, "bbox": box, "score": float(score)}
            )
    gt = COCO()
    gt.dataset = {
        "images": [{"id": i + 1} for i in range(len(ground_truth))],
        "annotations": anns,
        "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)],
    }
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints as it goes
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev
