"""Convolution + normalization + activation, 'same' padding, and channel rounding."""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.arithmetic import make_divisible as make_divisible  # re-exported: the models round widths with it
from cnnkit.arithmetic import same_padding

ActLayer = Callable[[], nn.Module]
NormLayer = Callable[[int], nn.Module]


def make_act(act: ActLayer) -> nn.Module:
    """Instantiate an activation in place where it supports it (saves a copy of every feature map)."""
    try:
        accepts_inplace = "inplace" in inspect.signature(act).parameters
    except (TypeError, ValueError):
        accepts_inplace = False
    return act(inplace=True) if accepts_inplace else act()  # type: ignore[call-arg]


class ConvNormAct(nn.Sequential):
    """``conv -> norm -> act``; the convolution has no bias when a norm follows it.

    ``padding=None`` pads symmetrically by ``dilation * (kernel - 1) // 2`` (PyTorch-style 'same' for
    odd kernels at stride 1).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 3,
        stride: int = 1,
        padding: int | tuple[int, int] | None = None,
        *,
        groups: int = 1,
        dilation: int = 1,
        norm: NormLayer | None = nn.BatchNorm2d,
        act: ActLayer | None = nn.ReLU,
        bias: bool | None = None,
    ) -> None:
        ks = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        if padding is None:
            padding = (dilation * (ks[0] - 1) // 2, dilation * (ks[1] - 1) // 2)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["conv"] = nn.Conv2d(
            in_channels,
            out_channels,
            ks,
            stride,
            padding,
            dilation=dilation,
            groups=groups,
            bias=(norm is None) if bias is None else bias,
        )
        if norm is not None:
            layers["bn"] = norm(out_channels)
        if act is not None:
            layers["act"] = make_act(act)
        super().__init__(layers)
        self.out_channels = out_channels


class Conv2dSame(nn.Conv2d):
    """A convolution with TensorFlow's 'same' padding: output size ``ceil(n / stride)``.

    For stride > 1 TensorFlow pads asymmetrically (the extra pixel goes bottom/right), which a fixed
    symmetric ``padding`` cannot express; the padding is computed from the input size at each call.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs["padding"] = 0
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        top, bottom = same_padding(ih, self.kernel_size[0], self.stride[0], self.dilation[0])
        left, right = same_padding(iw, self.kernel_size[1], self.stride[1], self.dilation[1])
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


def use_tf_padding(module: nn.Module) -> nn.Module:
    """Give every strided convolution in ``module`` TensorFlow's 'same' padding (:class:`Conv2dSame`), as
    Keras models are trained with; stride-1 convolutions with odd kernels pad the same either way."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Conv2d and max(child.stride) > 1 and max(child.kernel_size) > 1:
                same = Conv2dSame(
                    child.in_channels,
                    child.out_channels,
                    child.kernel_size,
                    child.stride,
                    dilation=child.dilation,
                    groups=child.groups,
                    bias=child.bias is not None,
                )
                same.load_state_dict(child.state_dict())
                setattr(parent, name, same)
    return module


def set_bn_eps(module: nn.Module, eps: float | None) -> nn.Module:
    """Set the epsilon of every BatchNorm in ``module`` (the framework the weights came from: Keras uses
    1e-3, 1.001e-5 in its ResNets); ``None`` leaves them as built."""
    if eps is not None:
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eps = eps
    return module
