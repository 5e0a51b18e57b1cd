"""Pure tensor functions: box formats, the IoU family, NMS, and a reference transposed convolution."""

from cnnkit.ops.boxes import (
    BoxFormat,
    area,
    box_iou,
    clip,
    complete_iou,
    convert,
    distance_iou,
    elementwise_iou,
    generalized_iou,
)
from cnnkit.ops.nms import Detections, batched_nms, multiclass_nms, nms, soft_nms
from cnnkit.ops.transposed import conv_transpose2d_reference

__all__ = [
    "BoxFormat",
    "Detections",
    "area",
    "batched_nms",
    "box_iou",
    "clip",
    "complete_iou",
    "conv_transpose2d_reference",
    "convert",
    "distance_iou",
    "elementwise_iou",
    "generalized_iou",
    "multiclass_nms",
    "nms",
    "soft_nms",
]
