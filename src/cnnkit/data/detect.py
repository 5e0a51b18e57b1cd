"""The first release's home of the detection readers, kept for its imports: the readers live in
:mod:`cnnkit.data.formats` (one module per format).

Every reader returns :class:`DetSample` s (image path, ``xyxy`` pixel boxes, class indices) and a
:class:`~cnnkit.data.report.DataReport` of what it fixed or left out: coordinates outside the image
are clipped (counted per file), boxes with no area after clipping are dropped, and a malformed line,
an unknown class or a missing image is reported with its file and line and the sample skipped
(``strict=True`` raises at the first one instead). Images without boxes are kept as background
samples. Paths inside annotation files resolve relative to that file.
"""

from __future__ import annotations

from cnnkit.data.formats.base import DetSample
from cnnkit.data.formats.coco import read_coco
from cnnkit.data.formats.voc import VOC_CLASSES, read_voc
from cnnkit.data.formats.yolo import read_yolo
from cnnkit.data.report import DataReport

DetReport = DataReport  # the name of the first release

__all__ = ["VOC_CLASSES", "DetReport", "DetSample", "read_coco", "read_voc", "read_yolo"]
