"""MaskFormer's pixel decoder: a plain top-down FPN over res2..res5 ("BasePixelDecoder" in detectron2).

The 1/4-resolution output of the FPN becomes the per-pixel embeddings (`mask_features`) that the
query mask embeddings are dotted with. MaskFormer's transformer reads the *raw* res5 backbone map, so
that is what is returned as the single "multi-scale" feature.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from omniseg.models.backbones import FEATURE_NAMES, FeatureSpec
from omniseg.models.layers.conv import ConvNormAct

__all__ = ["FPNPixelDecoder", "c2_xavier_fill"]


def c2_xavier_fill(module: nn.Module) -> None:
    """detectron2's conv init (Caffe2 "XavierFill"): kaiming-uniform with a=1 and zero bias."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


class FPNPixelDecoder(nn.Module):
    """Top-down FPN: res5 -> 3x3 conv+GN+ReLU; each finer level -> 1x1 lateral conv+GN, plus the
    nearest-upsampled coarser output, then 3x3 conv+GN+ReLU; finally a 3x3 conv to `mask_dim`.

    Submodules are keyed by feature name (`lateral_convs.res4`, `output_convs.res5`, ...);
    each conv block has children `0` (conv, no bias) and `1` (GroupNorm(32)).
    """

    def __init__(self, input_specs: dict[str, FeatureSpec], *, conv_dim: int = 256, mask_dim: int = 256):
        super().__init__()
        # Coarsest first: the order in which the top-down pass visits the levels.
        self.in_features = sorted((n for n in FEATURE_NAMES if n in input_specs), key=lambda n: -input_specs[n].stride)
        if len(self.in_features) < 2:
            raise ValueError(f"FPNPixelDecoder needs at least two of {FEATURE_NAMES}, got {sorted(input_specs)}")
        coarsest, *finer = self.in_features
        self.lateral_convs = nn.ModuleDict(
            {n: ConvNormAct(input_specs[n].channels, conv_dim, 1, activation=False, norm="gn") for n in finer})
        self.output_convs = nn.ModuleDict({coarsest: ConvNormAct(input_specs[coarsest].channels, conv_dim, 3, norm="gn")})
        self.output_convs.update({n: ConvNormAct(conv_dim, conv_dim, 3, norm="gn") for n in finer})
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=3, padding=1)
        self.conv_dim = conv_dim
        self.mask_dim = mask_dim
        self.mask_stride = input_specs[self.in_features[-1]].stride
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                c2_xavier_fill(m)

    def forward(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        coarsest, *finer = self.in_features
        y = self.output_convs[coarsest](features[coarsest])
        for name in finer:
            lateral = self.lateral_convs[name](features[name])
            y = lateral + F.interpolate(y, size=lateral.shape[-2:], mode="nearest")
            y = self.output_convs[name](y)
        return self.mask_features(y), [features[coarsest]]
