"""BlendMask's bottom module (AdelaiDet's ProtoNet-style basis module on P3-P5), its training-only
auxiliary semantic head on P3, and the panoptic variant's stuff head on the basis features."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from omniseg.models.layers.conv import ConvNormAct


class BasisModule(nn.Module):
    """Per level conv3x3 -> BN -> ReLU; P4/P5 branches bilinearly upsampled to P3 and summed; `num_convs`
    conv blocks; x2 bilinear; one conv block; 1x1 -> K bases at stride 4 (stride of P3 / 2).

    Returns (bases [B,K,H/4,W/4], the 128-channel features the 1x1 reads, which the stuff head shares).
    """

    def __init__(self, in_channels: int, num_levels: int = 3, channels: int = 128, num_convs: int = 3,
                 num_bases: int = 4):
        super().__init__()
        self.refine = nn.ModuleList(ConvNormAct(in_channels, channels, norm="bn") for _ in range(num_levels))
        self.tower = nn.Sequential(*[ConvNormAct(channels, channels, norm="bn") for _ in range(num_convs)])
        self.post = ConvNormAct(channels, channels, norm="bn")
        self.bases = nn.Conv2d(channels, num_bases, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.refine[0](features[0])
        for refine, f in zip(self.refine[1:], features[1:]):
            x = x + F.interpolate(refine(f), size=x.shape[-2:], mode="bilinear", align_corners=False)
        x = F.interpolate(self.tower(x), scale_factor=2, mode="bilinear", align_corners=False)
        feats = self.post(x)
        return self.bases(feats), feats


class SemanticHead(nn.Module):
    """`num_convs` conv blocks -> 1x1 classifier. The auxiliary thing-semantic loss (on P3, 2 convs, thing
    classes + background) and the panoptic stuff branch (on the basis features, stuff classes + "things")."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 128, num_convs: int = 2):
        super().__init__()
        layers = [ConvNormAct(in_channels if i == 0 else channels, channels, norm="bn") for i in range(num_convs)]
        self.convs = nn.Sequential(*layers)
        self.logits = nn.Conv2d(channels if num_convs else in_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.convs(x))
