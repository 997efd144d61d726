"""PANet's three additions to Mask R-CNN (Liu et al., CVPR 2018), as drop-in torchvision parts.

- `BottomUpPath`: N2 = P2, N_{i+1} = ReLU(conv3x3(ReLU(conv3x3_s2(N_i)) + P_{i+1})); the RPN and both
  RoI heads read N2..N5 instead of P2..P5.
- `AdaptiveRoIAlign`: every RoI is pooled from every level (aligned RoIAlign, sampling ratio 2); the levels
  stay separate ([L, R, C, S, S]) so the heads can give each level its own first layer.
- `AdaptiveTwoMLPHead` / `FusedMaskHead`: per-level first layer (fc6 / conv1), element-wise max over levels,
  rest of the head on the fused map; the mask head adds the fully-connected fusion branch.

`norm="gn"` gives each of them GroupNorm (32 groups) after every conv, as the released PANet models
(FPN.USE_GN and the *_gn heads); `ConvFCBoxHead` is their convolutional box head (per-level conv, more convs,
one fc). The default `norm="none"` builds exactly the norm-free modules.

They keep torchvision's interfaces (MultiScaleRoIAlign subclass, box head -> features, mask head -> logits
with an identity mask predictor), so torchvision's RoIHeads still does sampling, losses and post-processing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import MultiScaleRoIAlign, roi_align


def rois_from_boxes(boxes: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-image boxes -> [R, 5] (batch index, x1, y1, x2, y2), the format roi_align takes."""
    concat = torch.cat(list(boxes), dim=0)
    ids = torch.cat([torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)], dim=0)
    return torch.cat([ids, concat], dim=1)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    """3x3 conv with detectron2's c2_xavier_fill (kaiming-uniform a=1, zero bias), as the FPN convs."""
    conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
    nn.init.kaiming_uniform_(conv.weight, a=1)
    nn.init.zeros_(conv.bias)
    return conv


NORMS = ("none", "gn")
GN_GROUPS = 32


def group_norm(channels: int) -> nn.GroupNorm:
    """The released PANet's GroupNorm: 32 groups whatever the width, eps 1e-5."""
    if channels % GN_GROUPS:
        raise ValueError(f"GroupNorm heads (model.fpn_norm / model.roi.head_norm: gn) need widths divisible by "
                         f"{GN_GROUPS}; a layer here has {channels} channels (the fused mask branch has "
                         f"model.roi.mask_head_dim / 2)")
    return nn.GroupNorm(GN_GROUPS, channels, eps=1e-5)


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def _conv_gn(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Sequential:
    """3x3 conv (mask-head init) + GroupNorm, as one module `[conv, norm]`; ReLU is applied by the caller."""
    conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if bias:
        nn.init.zeros_(conv.bias)
    return nn.Sequential(conv, group_norm(cout))


class BottomUpPath(nn.Module):
    """Bottom-up path augmentation on FPN outputs P2..P5 (all `channels` wide) -> N2..N5, same strides.
    `norm="gn"`: GroupNorm after both convs of a step (the convs keep their bias, as the released models)."""

    def __init__(self, channels: int = 256, num_levels: int = 4, norm: str = "none"):
        super().__init__()
        _check_norm(norm)
        if norm == "gn":
            self.down = nn.ModuleList(_conv_gn(channels, channels, 2, bias=True) for _ in range(num_levels - 1))
            self.fuse = nn.ModuleList(_conv_gn(channels, channels, bias=True) for _ in range(num_levels - 1))
        else:
            self.down = nn.ModuleList(_conv3x3(channels, channels, stride=2) for _ in range(num_levels - 1))
            self.fuse = nn.ModuleList(_conv3x3(channels, channels) for _ in range(num_levels - 1))

    def forward(self, p: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        n = [p[0]]
        for down, fuse, lateral in zip(self.down, self.fuse, p[1:]):
            d = F.relu(down(n[-1]))
            if d.shape[-2:] != lateral.shape[-2:]:
                raise ValueError(f"bottom-up path: stride-2 map {tuple(d.shape[-2:])} does not match the FPN level "
                                 f"{tuple(lateral.shape[-2:])}; pad inputs to a multiple of 32")
            n.append(F.relu(fuse(d + lateral)))
        return n


class AdaptiveRoIAlign(MultiScaleRoIAlign):
    """Adaptive feature pooling: RoIAlign of every RoI on every level -> [L, R, C, S, S].

    Subclasses MultiScaleRoIAlign only so torchvision's MaskRCNN accepts it as box/mask pooler.
    """

    def __init__(self, featmap_names: Sequence[str], strides: Sequence[int], output_size: int,
                 sampling_ratio: int = 2, aligned: bool = True):
        super().__init__(list(featmap_names), output_size, sampling_ratio)
        if len(strides) != len(featmap_names):
            raise ValueError(f"{len(featmap_names)} levels but {len(strides)} strides")
        self.strides = [int(s) for s in strides]
        self.aligned = aligned

    def forward(self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                image_shapes: list[tuple[int, int]] | None = None) -> torch.Tensor:
        rois = rois_from_boxes(boxes)
        pooled = [roi_align(x[name], rois.to(x[name].dtype), self.output_size, spatial_scale=1.0 / stride,
                            sampling_ratio=self.sampling_ratio, aligned=self.aligned)
                  for name, stride in zip(self.featmap_names, self.strides)]
        return torch.stack(pooled)


class AdaptiveTwoMLPHead(nn.Module):
    """PANet's "2fc" box head: unshared fc6 per level -> ReLU -> element-wise max -> fc7 -> ReLU.
    (ReLU and max commute, so the order of the two is immaterial.)"""

    def __init__(self, num_levels: int, in_features: int, representation_size: int = 1024):
        super().__init__()
        self.fc6 = nn.ModuleList(nn.Linear(in_features, representation_size) for _ in range(num_levels))
        self.fc7 = nn.Linear(representation_size, representation_size)

    def fuse(self, x: torch.Tensor) -> torch.Tensor:
        """[L, R, C, S, S] -> [R, representation]: each level through its own fc6, max over levels."""
        if x.shape[0] != len(self.fc6):
            raise ValueError(f"expected {len(self.fc6)} pooled levels, got {x.shape[0]}")
        return torch.stack([F.relu(fc(level.flatten(1))) for fc, level in zip(self.fc6, x)]).amax(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc7(self.fuse(x)))


class ConvFCBoxHead(nn.Module):
    """The released PANet's box head ("4conv1fc" with GroupNorm): per-level conv -> ReLU -> element-wise max
    over levels -> `num_convs - 1` more convs (ReLU) -> fc -> ReLU. Input [L, R, C, S, S] (adaptive pooling; a
    single level with L = 1), output [R, fc_dim]. `norm="gn"`: bias-free convs + GroupNorm; "none": convs with bias."""

    def __init__(self, num_levels: int, in_channels: int, conv_dim: int = 256, num_convs: int = 4,
                 resolution: int = 7, fc_dim: int = 1024, norm: str = "gn"):
        super().__init__()
        _check_norm(norm)
        if num_convs < 1:
            raise ValueError(f"a conv box head needs at least its per-level conv, got num_convs={num_convs}")
        make = _conv_gn if norm == "gn" else _msra_conv
        self.level_convs = nn.ModuleList(make(in_channels, conv_dim) for _ in range(num_levels))
        self.convs = nn.ModuleList(make(conv_dim, conv_dim) for _ in range(num_convs - 1))
        self.fc = nn.Linear(conv_dim * resolution * resolution, fc_dim)
        nn.init.kaiming_uniform_(self.fc.weight, a=1)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != len(self.level_convs):
            raise ValueError(f"expected {len(self.level_convs)} pooled levels, got {x.shape[0]}")
        h = torch.stack([F.relu(conv(level)) for conv, level in zip(self.level_convs, x)]).amax(0)
        for conv in self.convs:
            h = F.relu(conv(h))
        return F.relu(self.fc(h.flatten(1)))


def _msra_conv(cin: int, cout: int) -> nn.Conv2d:
    """3x3 conv with the Mask R-CNN mask-head init (kaiming-normal fan_out, zero bias; as torchvision)."""
    conv = nn.Conv2d(cin, cout, 3, padding=1)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    nn.init.zeros_(conv.bias)
    return conv


class FusedMaskHead(nn.Module):
    """PANet mask head on adaptively pooled features [L, R, C, S, S] -> mask logits [R, K+1, 2S, 2S].

    FCN: per-level conv1 -> max -> conv2, conv3, conv4 (3x3, ReLU) -> 2x deconv -> ReLU -> 1x1 per-class logits.
    FC fusion: conv3 -> conv4_fc (3x3) -> conv5_fc (3x3, channels halved) -> fc -> (2S)^2 class-agnostic logits,
    added to every class's FCN logits. `fusion_relu` applies ReLU to the fc output, as the PANet repository
    does (the paper does not say). `norm="gn"`: every 3x3 conv bias-free + GroupNorm (32 groups, also on the
    halved conv5_fc). Used with an identity mask predictor: the logits leave this module.
    """

    def __init__(self, num_levels: int, in_channels: int, num_classes: int, dim: int = 256, resolution: int = 14,
                 fc_fusion: bool = True, fusion_relu: bool = True, norm: str = "none"):
        super().__init__()
        _check_norm(norm)
        make = _conv_gn if norm == "gn" else _msra_conv
        self.resolution = resolution
        self.conv1 = nn.ModuleList(make(in_channels, dim) for _ in range(num_levels))
        self.conv2, self.conv3, self.conv4 = make(dim, dim), make(dim, dim), make(dim, dim)
        self.deconv = nn.ConvTranspose2d(dim, dim, 2, stride=2)
        self.predictor = nn.Conv2d(dim, num_classes, 1)
        for m in (self.deconv, self.predictor):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        self.fc_fusion = fc_fusion
        self.fusion_relu = fusion_relu
        if fc_fusion:
            self.conv4_fc = make(dim, dim)
            self.conv5_fc = make(dim, dim // 2)
            self.fc = nn.Linear((dim // 2) * resolution * resolution, (2 * resolution) ** 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != len(self.conv1):
            raise ValueError(f"expected {len(self.conv1)} pooled levels, got {x.shape[0]}")
        h = torch.stack([F.relu(conv(level)) for conv, level in zip(self.conv1, x)]).amax(0)
        h = F.relu(self.conv2(h))
        c3 = F.relu(self.conv3(h))
        h = F.relu(self.conv4(c3))
        logits = self.predictor(F.relu(self.deconv(h)))
        if not self.fc_fusion:
            return logits
        f = F.relu(self.conv5_fc(F.relu(self.conv4_fc(c3))))
        f = self.fc(f.flatten(1))
        if self.fusion_relu:
            f = F.relu(f)
        side = 2 * self.resolution
        return logits + f.view(-1, 1, side, side)

