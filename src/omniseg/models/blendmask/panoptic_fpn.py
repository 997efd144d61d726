"""Panoptic-FPN's semantic head (detectron2's SemSegFPNHead), the stuff branch of AdelaiDet's released panoptic
BlendMask: it reads P2-P5 of the FPN, unlike the bottom module, which reads P3-P5."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from omniseg.models.layers.conv import ConvNormAct


class SemanticFPNHead(nn.Module):
    """Levels at strides 4, 8, 16, 32 (P2-P5) -> logits [B, num_classes, H/4, W/4].

    Level i (0 = P2) runs max(1, i) blocks of conv3x3 -> GroupNorm(32) -> ReLU, each followed by a x2 bilinear
    upsampling while the level is coarser than stride 4 (P2: 1 block, P3: 1 + up, P4: 2, P5: 3); the four
    stride-4 maps are summed and a 1x1 predicts the classes. Each upsampling goes to the size of the next finer
    level, which is x2 exactly when the input is a multiple of 32 and keeps the levels aligned otherwise.

    Parameters are `scale_heads.<level>.<block>.{0: conv, 1: norm}` and `predictor`; detectron2's `p<l>.<2 x
    block>` (its Upsample modules sit between the convs) map to them one to one.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 128, num_levels: int = 4):
        super().__init__()
        self.scale_heads = nn.ModuleList(
            nn.ModuleList(ConvNormAct(in_channels if k == 0 else channels, channels, norm="gn")
                          for k in range(max(1, level)))
            for level in range(num_levels)
        )
        self.predictor = nn.Conv2d(channels, num_classes, 1)
        for m in self.modules():  # detectron2's c2_msra_fill
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)

    def branches(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each level's conv blocks, brought to stride 4 (the first level's size): [B, channels, H/4, W/4] each."""
        if len(features) != len(self.scale_heads):
            raise ValueError(f"the Panoptic-FPN head reads {len(self.scale_heads)} levels, got {len(features)}")
        sizes = [tuple(f.shape[-2:]) for f in features]
        out = []
        for level, (blocks, x) in enumerate(zip(self.scale_heads, features)):
            for k, block in enumerate(blocks):
                x = block(x)
                if level > 0:
                    x = F.interpolate(x, size=sizes[level - k - 1], mode="bilinear", align_corners=False)
            out.append(x)
        return out

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        maps = self.branches(features)
        x = maps[0]
        for m in maps[1:]:
            x = x + m
        return self.predictor(x)
