"""U-Net (Ronneberger et al. 2015) and its common variants, for semantic segmentation.

The contracting path halves the resolution and doubles the channels at each level; the expanding
path up-samples (a transposed convolution "un-does" a strided one), concatenates the encoder's
feature map of the same level (the skip connection, which brings back the detail pooling lost) and
convolves. The original uses 'valid' 3x3 convolutions, so each skip is centre-cropped to the smaller
decoder map and a 572x572 input gives a 388x388 output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit import arithmetic
from cnnkit.errors import CnnkitError
from cnnkit.layers import ConvNormAct
from cnnkit.models.base import FeatureInfo
from cnnkit.registry import register_model

Upsample = Literal["transposed", "bilinear", "nearest"]
Padding = Literal["valid", "same"]


def center_crop(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Crop the centre ``[..., h, w]`` of ``x`` (the original U-Net's skip connection)."""
    h, w = x.shape[-2:]
    top, left = (h - size[0]) // 2, (w - size[1]) // 2
    return x[..., top : top + size[0], left : left + size[1]]


class DoubleConv(nn.Sequential):
    """Two 3x3 convolutions, each followed by [BatchNorm and] ReLU; optional dropout after them."""

    def __init__(
        self, in_ch: int, out_ch: int, padding: Padding, batch_norm: bool, dropout: float = 0.0
    ) -> None:
        pad = 1 if padding == "same" else 0
        norm = nn.BatchNorm2d if batch_norm else None
        layers: list[nn.Module] = [
            ConvNormAct(in_ch, out_ch, 3, 1, pad, norm=norm),
            ConvNormAct(out_ch, out_ch, 3, 1, pad, norm=norm),
        ]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        super().__init__(*layers)


class Up(nn.Module):
    """Up-sample by 2 (transposed conv, or interpolation + 1x1 conv) halving the channels."""

    def __init__(self, in_ch: int, out_ch: int, mode: Upsample, kernel: int = 2) -> None:
        super().__init__()
        self.mode = mode
        if mode == "transposed":
            # kernel 2 (stride 2) tiles the output exactly; an odd kernel needs padding and
            # output_padding for the output to be exactly 2n ('same' in Keras terms).
            pad = (kernel - 1) // 2
            self.conv: nn.Module = nn.ConvTranspose2d(
                in_ch, out_ch, kernel, 2, pad, output_padding=kernel % 2
            )
        else:
            self.conv = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "transposed":
            return self.conv(x)
        align = False if self.mode == "bilinear" else None
        return self.conv(F.interpolate(x, scale_factor=2.0, mode=self.mode, align_corners=align))


@dataclass(frozen=True)
class UNetConfig:
    base: int = 64  # channels of the first level; doubled at each level down
    depth: int = 4  # number of down-samplings
    padding: Padding = "same"
    batch_norm: bool = True
    upsample: Upsample = "transposed"
    up_kernel: int = 2
    head_conv: bool = False  # an extra 3x3 conv before the 1x1 classifier (the course's model)
    dropout: float = 0.0  # after the deepest two encoder levels (the course's model uses 0.3)


class UNet(nn.Module):
    """A U-Net of ``depth`` down/up levels; ``forward`` returns logits ``[B, num_classes, H', W']``.

    With 'same' padding the output has the input's size; inputs whose size is not a multiple of
    ``2 ** depth`` are padded, then the output is cropped back. With 'valid' padding the output is
    smaller, and only sizes for which every pooled map is even are accepted (the error names them).
    """

    def __init__(self, cfg: UNetConfig = UNetConfig(), *, num_classes: int = 2, in_chans: int = 3) -> None:
        super().__init__()
        self.cfg = cfg
        chans = [cfg.base * 2**i for i in range(cfg.depth + 1)]
        self.down = nn.ModuleList()
        in_ch = in_chans
        for i, c in enumerate(chans):
            drop = cfg.dropout if i >= cfg.depth - 1 else 0.0
            self.down.append(DoubleConv(in_ch, c, cfg.padding, cfg.batch_norm, drop))
            in_ch = c
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList()
        self.up_conv = nn.ModuleList()
        for c in reversed(chans[:-1]):
            self.up.append(Up(in_ch, c, cfg.upsample, cfg.up_kernel))
            self.up_conv.append(DoubleConv(2 * c, c, cfg.padding, cfg.batch_norm))
            in_ch = c
        self.head_conv = ConvNormAct(in_ch, in_ch, 3, norm=None) if cfg.head_conv else nn.Identity()
        self.head = nn.Conv2d(in_ch, num_classes, 1)
        self.num_classes = num_classes
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def stride(self) -> int:
        return 2**self.cfg.depth

    def output_size(self, n: int) -> int:
        """Output size along one axis for input size ``n``; raises ValueError if ``n`` does not fit."""
        if self.cfg.padding == "same":
            return n
        for _ in range(self.cfg.depth):
            n = arithmetic.conv_output_size(n, 3) - 2
            if n <= 0 or n % 2:
                raise ValueError("odd or empty map before pooling")
            n //= 2
        n -= 4
        for _ in range(self.cfg.depth):
            n = arithmetic.conv_transpose_output_size(n, 2, s=2) - 4
            if n <= 0:
                raise ValueError("empty output")
        return n

    def valid_sizes(self, near: int, count: int = 3) -> list[int]:
        """Input sizes nearest ``near`` that a 'valid' U-Net accepts (a small ``near`` gets the smallest
        that work: each level's two unpadded convolutions eat pixels, so inputs start near 140)."""
        found: list[int] = []
        for delta in range(0, max(near, 64 * self.stride)):
            for n in (near - delta, near + delta):
                if n > 0 and n not in found:
                    try:
                        self.output_size(n)
                        found.append(n)
                    except ValueError:
                        pass
            if len(found) >= count:
                break
        return sorted(sorted(found, key=lambda n: abs(n - near))[:count])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.cfg.padding == "valid":
            for n in (h, w):
                try:
                    self.output_size(n)
                except ValueError:
                    raise CnnkitError(
                        f"input {h}x{w} does not fit this valid-padding U-Net; sizes that work near {n}: "
                        f"{self.valid_sizes(n)} (e.g. 572 -> 388)"
                    ) from None
            return self._forward(x)
        ph, pw = (-h) % self.stride, (-w) % self.stride
        if ph or pw:  # pad to a multiple of the total stride, then crop the logits back
            x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "constant")
            return self._forward(x)[..., :h, :w]
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < self.cfg.depth:
                skips.append(x)
                x = self.pool(x)
        for up, conv, skip in zip(self.up, self.up_conv, reversed(skips)):
            x = up(x)
            x = conv(torch.cat([center_crop(skip, x.shape[-2:]), x], 1))
        return self.head(self.head_conv(x))


ORIGINAL = UNetConfig(base=64, depth=4, padding="valid", batch_norm=False, upsample="transposed")
COURSE = UNetConfig(
    base=32, depth=4, padding="same", batch_norm=False, upsample="transposed", up_kernel=3, head_conv=True,
    dropout=0.3,
)  # fmt: skip


@register_model("unet")
def unet(**kwargs: Any) -> UNet:
    """The original U-Net: valid 3x3 convs with bias, no BatchNorm, 2x2 transposed convs, 64-1024 ch."""
    return UNet(ORIGINAL, **kwargs)


@register_model("unet_same")
def unet_same(
    *,
    base: int = 32,
    depth: int = 4,
    batch_norm: bool = True,
    upsample: Upsample = "transposed",
    **kwargs: Any,
) -> UNet:
    """A same-padding U-Net (output size = input size) with configurable depth, width and up-sampling."""
    if upsample not in ("transposed", "bilinear", "nearest"):
        raise CnnkitError(f"upsample must be 'transposed', 'bilinear' or 'nearest', got {upsample!r}")
    return UNet(UNetConfig(base, depth, "same", batch_norm, upsample), **kwargs)


@register_model("unet_course")
def unet_course(**kwargs: Any) -> UNet:
    """The deep-learning course's U-Net (96x128 inputs, 32 base filters, 3x3 transposed convs)."""
    return UNet(COURSE, **kwargs)


# ------------------------------------------------------------------------------ U-Net on a zoo encoder
class DecoderBlock(nn.Module):
    """Up-sample x2, concatenate the skip (if any), then two 3x3 conv-BN-ReLU."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, mode: Upsample) -> None:
        super().__init__()
        self.mode = mode
        self.up = nn.ConvTranspose2d(in_ch, in_ch, 2, 2) if mode == "transposed" else nn.Identity()
        self.conv = nn.Sequential(ConvNormAct(in_ch + skip_ch, out_ch, 3), ConvNormAct(out_ch, out_ch, 3))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        size = skip.shape[-2:] if skip is not None else (x.shape[-2] * 2, x.shape[-1] * 2)
        if self.mode == "transposed":
            x = self.up(x)
        else:
            x = F.interpolate(
                x, size=size, mode=self.mode, align_corners=False if self.mode == "bilinear" else None
            )
        if skip is not None:
            x = torch.cat([x, skip], 1)
        return self.conv(x)


class EncoderUNet(nn.Module):
    """U-Net whose contracting path is a zoo backbone (through ``feature_info``), optionally pretrained.

    The decoder up-samples from the deepest stage, concatenating each shallower stage's map, then
    continues without skips down to the input resolution. ``encoder_weights`` takes anything
    ``create_model(weights=)`` does (a torchvision/timm file, a cnnkit classifier, ``"torchvision"``);
    ``encoder_args`` are the encoder builder's arguments (e.g. ``{"width": 0.5}``). ``freeze_encoder``
    freezes the encoder with its BatchNorms in inference mode, as in transfer learning.
    """

    def __init__(
        self,
        encoder: str,
        *,
        num_classes: int = 2,
        in_chans: int = 3,
        encoder_weights: str | None = None,
        encoder_args: dict[str, Any] | None = None,
        freeze_encoder: bool = False,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        upsample: Upsample = "nearest",
    ) -> None:
        super().__init__()
        from cnnkit.layers import freeze_batchnorm
        from cnnkit.registry import create_model

        self.encoder = create_model(
            encoder, in_chans=in_chans, weights=encoder_weights, features_only=True, **(encoder_args or {})
        )
        info: list[FeatureInfo] = list(self.encoder.feature_info)  # type: ignore[arg-type]
        self.total_stride = info[-1].stride
        extra = info[0].stride.bit_length() - 1  # up-samplings below the shallowest stage
        steps = len(info) - 1 + extra
        chans = list(decoder_channels)
        if len(chans) != steps:
            chans = [max(16, 256 >> i) for i in range(steps)]
        skips = [f.channels for f in reversed(info[:-1])] + [0] * extra
        blocks, in_ch = [], info[-1].channels
        for skip_ch, out_ch in zip(skips, chans):
            blocks.append(DecoderBlock(in_ch, skip_ch, out_ch, upsample))
            in_ch = out_ch
        self.decoder = nn.ModuleList(blocks)
        self.head = nn.Conv2d(in_ch, num_classes, 3, padding=1)
        self.num_classes = num_classes
        if freeze_encoder:
            freeze_batchnorm(self.encoder)
            for p in self.encoder.parameters():
                p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.total_stride, (-w) % self.total_stride
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        feats = self.encoder(x)
        y = feats[-1]
        skips: list[torch.Tensor | None] = [*reversed(feats[:-1])]
        for i, block in enumerate(self.decoder):
            y = block(y, skips[i] if i < len(skips) else None)
        return self.head(y)[..., :h, :w]


UNET_ENCODERS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "vgg11_bn", "vgg16_bn", "vgg16", "mobilenet_v2",
    "mobilenet_v3_large", *(f"efficientnet_b{i}" for i in range(8)),
)  # fmt: skip


def _make_encoder_unet(encoder: str) -> None:
    @register_model(f"unet_{encoder}")
    def builder(**kwargs: Any) -> EncoderUNet:
        return EncoderUNet(encoder, **kwargs)

    builder.__doc__ = f"U-Net with a {encoder} encoder (pass encoder_weights= for a pretrained one)."
    builder.__name__ = f"unet_{encoder}"


for _encoder in UNET_ENCODERS:
    _make_encoder_unet(_encoder)
