"""Pure tensor functions: box formats, IoU, NMS, and a reference transposed convolution."""

from cnnkit.ops.transposed import conv_transpose2d_reference

__all__ = ["conv_transpose2d_reference"]
