"""A readable reference of the transposed convolution, as the notes describe it.

Each input value multiplies the whole ``k x k`` filter, and the product is added into the output at
``stride`` times the value's position; the overlapping sums form the output, from which ``padding``
rows and columns are cropped on each side. This is the gradient of a strided convolution with respect
to its input, which is why it "un-does" the down-sampling. The models use ``nn.ConvTranspose2d``;
this function documents (and tests) what that layer computes.
"""

from __future__ import annotations

import torch

from cnnkit.arithmetic import conv_transpose_output_size


def conv_transpose2d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int = 1,
    padding: int = 0,
    output_padding: int = 0,
) -> torch.Tensor:
    """Transposed convolution by scatter-add.

    Args:
        x: ``[B, C_in, H, W]``.
        weight: ``[C_in, C_out, k, k]`` (PyTorch's ConvTranspose2d layout).
        bias: ``[C_out]`` or None.

    Returns:
        ``[B, C_out, H', W']`` with ``H' = (H - 1) * stride - 2 * padding + k + output_padding``
        (:func:`cnnkit.arithmetic.conv_transpose_output_size`).
    """
    b, _, h, w = x.shape
    _, c_out, k, _ = weight.shape
    full_h = (h - 1) * stride + k + output_padding
    full_w = (w - 1) * stride + k + output_padding
    out = x.new_zeros(b, c_out, full_h, full_w)
    for i in range(h):
        for j in range(w):
            # every input value (all batches and channels at (i, j)) times the whole filter:
            # [B, C_in] x [C_in, C_out, k, k] -> [B, C_out, k, k]
            patch = torch.einsum("bc,cokl->bokl", x[:, :, i, j], weight)
            out[:, :, i * stride : i * stride + k, j * stride : j * stride + k] += patch
    out_h = conv_transpose_output_size(h, k, padding, stride, output_padding)
    out_w = conv_transpose_output_size(w, k, padding, stride, output_padding)
    out = out[:, :, padding : padding + out_h, padding : padding + out_w]
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out
