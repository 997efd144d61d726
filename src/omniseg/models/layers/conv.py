"""Conv -> norm -> ReLU, the block every family stacks, and the one rule for choosing a norm layer."""

from __future__ import annotations

import math

from torch import nn

NORMS = ("bn", "gn")


def norm_layer(kind: str, channels: int, *, min_group_size: int = 1) -> nn.Module:
    """BatchNorm2d ("bn") or GroupNorm ("gn") over `channels`. GroupNorm has gcd(32, C / min_group_size)
    groups: detectron2's, HF's and AdelaiDet's 32 whenever C is a multiple of 32 x min_group_size, and a
    count that divides C otherwise. `min_group_size=2` keeps two channels per group, which a layer needs
    when it may see 1x1 maps in training (FCOS's P7)."""
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        return nn.GroupNorm(math.gcd(32, max(channels // min_group_size, 1)), channels)
    raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {kind!r}")


class ConvNormAct(nn.Sequential):
    """Conv2d (same padding, optional dilation) -> norm -> optional ReLU: detectron2's
    `Conv2d(norm=..., activation=relu)` and the per-pixel heads' conv-BN-ReLU.

    Children are `0` (conv), `1` (norm, when there is one) and the ReLU, so published checkpoints
    (detectron2, HF, MMSeg-style heads) map one to one.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, *, norm: str | None, activation: bool = True,
                 bias: bool = False, dilation: int = 1):
        layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, kernel_size, padding=dilation * (kernel_size // 2),
                                             dilation=dilation, bias=bias)]
        if norm is not None:
            layers.append(norm_layer(norm, out_ch))
        if activation:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)
