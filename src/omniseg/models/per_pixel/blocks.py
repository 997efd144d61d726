"""Heads and necks of the per-pixel classification family (PSPNet, DANet, EncNet, FastFCN's JPU, DeepLab ASPP).

Every head maps one feature map [B, C, h, w] to class logits [B, K, h, w]; the model upsamples.
Channel widths default to the papers' (512 head width on a ResNet-50/101) and scale with `width`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from omniseg.models.layers.conv import ConvNormAct


class Classifier(nn.Sequential):
    """Dropout2d + 1x1 conv to K logits, the last layer of every head (re-initialised when the class
    count changes, e.g. fine-tuning after PSSL pre-training)."""

    def __init__(self, cin: int, num_classes: int, dropout: float = 0.1):
        super().__init__(nn.Dropout2d(dropout), nn.Conv2d(cin, num_classes, 1))


class FCNHead(nn.Module):
    """conv3x3 (C/4) + classifier: the auxiliary head on res4 (PSPNet weight 0.4) and the plain FCN."""

    def __init__(self, cin: int, num_classes: int, width: int | None = None, dropout: float = 0.1):
        super().__init__()
        width = width or max(cin // 4, 16)
        self.conv = ConvNormAct(cin, width, norm="bn")
        self.classifier = Classifier(width, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.conv(x))


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling module: average-pool to bins x bins (1, 2, 3, 6), 1x1 conv to C/len(bins)
    per bin (UPerNet: `branch_channels` each), upsample, concatenate with the input."""

    def __init__(self, cin: int, bins: Sequence[int] = (1, 2, 3, 6), branch_channels: int | None = None):
        super().__init__()
        self.bins = tuple(int(b) for b in bins)
        reduced = branch_channels or cin // len(self.bins)
        self.stages = nn.ModuleList(ConvNormAct(cin, reduced, kernel_size=1, norm="bn") for _ in self.bins)
        self.out_channels = cin + reduced * len(self.bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(stage(F.adaptive_avg_pool2d(x, b)), size=size, mode="bilinear", align_corners=False)
                  for b, stage in zip(self.bins, self.stages)]
        return torch.cat([x, *pooled], dim=1)


class PSPHead(nn.Module):
    """Pyramid pooling, 3x3 bottleneck, classifier. `branch_width`: each pooling branch's width (MMSeg's
    PSPHead uses the head width, equal to the default cin / len(bins) only for 2048-channel inputs)."""

    def __init__(self, cin: int, num_classes: int, width: int = 512, bins: Sequence[int] = (1, 2, 3, 6),
                 dropout: float = 0.1, branch_width: int | None = None):
        super().__init__()
        self.ppm = PyramidPooling(cin, bins, branch_channels=branch_width)
        self.bottleneck = ConvNormAct(self.ppm.out_channels, width, norm="bn")
        self.classifier = Classifier(width, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.bottleneck(self.ppm(x)))


class UPerHead(nn.Module):
    """UPerNet (Xiao et al. 2018; MMSeg's UPerHead): pyramid pooling on the coarsest level, an FPN
    (1x1 laterals, top-down sums, 3x3 convs) over the others, every level upsampled to the finest,
    concatenated, fused by a 3x3 conv, classified. Input: feature maps finest first."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, width: int = 512,
                 bins: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        self.ppm = PyramidPooling(in_channels[-1], bins, branch_channels=width)
        self.ppm_bottleneck = ConvNormAct(self.ppm.out_channels, width, norm="bn")
        self.laterals = nn.ModuleList(ConvNormAct(c, width, kernel_size=1, norm="bn") for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvNormAct(width, width, norm="bn") for _ in in_channels[:-1])
        self.fuse = ConvNormAct(width * len(in_channels), width, norm="bn")
        self.classifier = Classifier(width, num_classes, dropout)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        levels = [lat(f) for lat, f in zip(self.laterals, feats[:-1])] + [self.ppm_bottleneck(self.ppm(feats[-1]))]
        for i in range(len(levels) - 1, 0, -1):  # top-down
            levels[i - 1] = levels[i - 1] + F.interpolate(levels[i], size=levels[i - 1].shape[-2:], mode="bilinear",
                                                          align_corners=False)
        outs = [conv(x) for conv, x in zip(self.fpn_convs, levels[:-1])] + [levels[-1]]
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in outs[1:]]
        return self.classifier(self.fuse(torch.cat(outs, dim=1)))


class PositionAttention(nn.Module):
    """DANet's position attention: S = softmax over keys of Q^T K (no 1/sqrt(d), as the official code),
    out = gamma * V S^T + x with gamma a learnable scalar initialised at 0 (starts as identity).
    `inner`: the query/key width (default C/8)."""

    def __init__(self, channels: int, inner: int | None = None):
        super().__init__()
        inner = inner or max(channels // 8, 1)
        self.query = nn.Conv2d(channels, inner, 1)
        self.key = nn.Conv2d(channels, inner, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.query(x).flatten(2).transpose(1, 2)  # [B, HW, C/8]
        k = self.key(x).flatten(2)  # [B, C/8, HW]
        attn = torch.softmax(torch.bmm(q, k), dim=-1)  # [B, HW(query), HW(key)]
        out = torch.bmm(self.value(x).flatten(2), attn.transpose(1, 2)).view(b, c, h, w)
        return self.gamma * out + x


class ChannelAttention(nn.Module):
    """DANet's channel attention: energy = X X^T over channels, attention = softmax(rowmax - energy),
    out = beta * attn X + x, beta init 0. The `rowmax - energy` is the official code's (it weights the
    least similar channels most, the opposite of the paper's formula); published weights assume it."""

    def __init__(self):
        super().__init__()
        self.beta = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        flat = x.flatten(2)  # [B, C, HW]
        energy = torch.bmm(flat, flat.transpose(1, 2))  # [B, C, C]
        energy = energy.amax(dim=-1, keepdim=True) - energy
        out = torch.bmm(torch.softmax(energy, dim=-1), flat).view(b, c, h, w)
        return self.beta * out + x


class DANetHead(nn.Module):
    """Two parallel branches (position / channel attention), each conv-attend-conv, summed; each branch
    also keeps its own classifier, trained with equal weight next to the fused one (official code)."""

    def __init__(self, cin: int, num_classes: int, width: int = 512, dropout: float = 0.1,
                 pam_channels: int | None = None):
        super().__init__()
        self.pam_in, self.cam_in = ConvNormAct(cin, width, norm="bn"), ConvNormAct(cin, width, norm="bn")
        self.pam, self.cam = PositionAttention(width, pam_channels), ChannelAttention()
        self.pam_out, self.cam_out = ConvNormAct(width, width, norm="bn"), ConvNormAct(width, width, norm="bn")
        self.classifier = Classifier(width, num_classes, dropout)
        self.pam_classifier = Classifier(width, num_classes, dropout)
        self.cam_classifier = Classifier(width, num_classes, dropout)

    def forward(self, x: torch.Tensor, *, branches: bool = False):
        p = self.pam_out(self.pam(self.pam_in(x)))
        c = self.cam_out(self.cam(self.cam_in(x)))
        fused = self.classifier(p + c)
        if branches:
            return fused, {"pam": self.pam_classifier(p), "cam": self.cam_classifier(c)}
        return fused


class ASPP(nn.Module):
    """DeepLabV3's atrous spatial pyramid pooling: 1x1 + three atrous 3x3 + image pooling, concat, 1x1.
    `extra` channels (Gated-SCNN's edge branch) join the concatenation. `project=False` returns the
    concatenation itself (MMSeg's ASPPHead, whose 3x3 bottleneck follows directly)."""

    def __init__(self, cin: int, width: int = 256, rates: Sequence[int] = (12, 24, 36), extra: int = 0,
                 project_bn: bool = True, project: bool = True):
        super().__init__()
        self.branches = nn.ModuleList([ConvNormAct(cin, width, kernel_size=1, norm="bn")]
                                      + [ConvNormAct(cin, width, dilation=int(r), norm="bn") for r in rates])
        self.image_pool = ConvNormAct(cin, width, kernel_size=1, norm="bn")
        n = (len(rates) + 2) * width + extra
        if not project:
            self.project, self.out_channels = nn.Identity(), n
        else:
            self.project = (ConvNormAct(n, width, kernel_size=1, norm="bn") if project_bn
                            else nn.Conv2d(n, width, 1, bias=False))
            self.out_channels = width

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        pooled = self.image_pool(F.adaptive_avg_pool2d(x, 1)).expand(-1, -1, *x.shape[-2:])
        parts = [b(x) for b in self.branches] + [pooled] + ([extra] if extra is not None else [])
        return self.project(torch.cat(parts, dim=1))


class ASPPHead(nn.Module):
    """ASPP, 3x3 conv, classifier. `project=False`: no 1x1 projection, the 3x3 conv reads the branch
    concatenation (MMSeg's ASPPHead)."""

    def __init__(self, cin: int, num_classes: int, width: int = 256, rates: Sequence[int] = (12, 24, 36),
                 dropout: float = 0.1, project: bool = True):
        super().__init__()
        self.aspp = ASPP(cin, width, rates, project=project)
        self.conv = ConvNormAct(self.aspp.out_channels, width, norm="bn")
        self.classifier = Classifier(width, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.conv(self.aspp(x)))


class SeparableConv(nn.Sequential):
    """Depthwise dilated 3x3 -> BN -> pointwise 1x1 (FastFCN keeps the BN between the two)."""

    def __init__(self, cin: int, cout: int, dilation: int):
        super().__init__(
            nn.Conv2d(cin, cin, 3, padding=dilation, dilation=dilation, groups=cin, bias=False),
            nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 1, bias=False),
        )


class JointPyramidUpsampling(nn.Module):
    """FastFCN's JPU: replaces the dilated res4/res5 of an output-stride-8 backbone. conv3x3 on res3
    (/8), res4 (/16), res5 (/32); upsample to /8; concatenate; four parallel separable convs with
    dilation 1, 2, 4, 8; concatenate -> 4 x width channels at /8 (2048 for width 512, the shape of a
    dilated ResNet-50's res5, so any head works unchanged). `align_corners`: True as the official
    FastFCN code, False as MMSeg's JPU."""

    def __init__(self, in_channels: Sequence[int], width: int = 512, dilations: Sequence[int] = (1, 2, 4, 8),
                 align_corners: bool = True):
        super().__init__()
        self.align_corners = align_corners
        self.convs = nn.ModuleList(ConvNormAct(c, width, norm="bn") for c in in_channels)
        self.dilated = nn.ModuleList(
            nn.Sequential(SeparableConv(len(in_channels) * width, width, d), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
            for d in dilations
        )
        self.out_channels = width * len(dilations)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        outs = [conv(f) for conv, f in zip(self.convs, feats)]
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=self.align_corners)
                            for o in outs[1:]]
        x = torch.cat(outs, dim=1)
        return torch.cat([branch(x) for branch in self.dilated], dim=1)


class EncodingLayer(nn.Module):
    """EncNet's learnable residual encoder: every position x_i is softly assigned to K codewords d_k by
    softmax_k(s_k ||x_i - d_k||^2) (smoothing factors s_k learnt, initialised negative) and the weighted
    residuals x_i - d_k are summed over positions: [B, C, H, W] -> [B, K, C]. The distances and sums are
    computed by matrix products, so the [B, HW, K, C] residual tensor is never held in memory."""

    def __init__(self, channels: int, num_codes: int = 32):
        super().__init__()
        bound = 1.0 / (num_codes * channels) ** 0.5
        self.codewords = nn.Parameter(torch.empty(num_codes, channels).uniform_(-bound, bound))
        self.scale = nn.Parameter(torch.empty(num_codes).uniform_(-1.0, 0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = x.flatten(2).transpose(1, 2)  # [B, N, C]
        codes = self.codewords
        distances = (feats.pow(2).sum(-1, keepdim=True) - 2 * feats @ codes.t() + codes.pow(2).sum(-1))  # [B, N, K]
        assignment = torch.softmax(self.scale * distances, dim=2)
        # sum_i a_ik (x_i - d_k) = (A^T X)_k - (sum_i a_ik) d_k
        return assignment.transpose(1, 2) @ feats - assignment.sum(1).unsqueeze(-1) * codes


class ContextEncoding(nn.Module):
    """EncNet's context encoding module (MMSeg's EncModule): 1x1 conv-BN-ReLU, the encoding layer, BN over the
    K codewords' aggregated residuals + ReLU, mean over codewords -> the encoded context [B, C]; it scales the
    input's channels by 1 + sigmoid(fc(context)) before a ReLU. Returns (scaled map, context); the context
    also feeds the SE-loss classifier."""

    def __init__(self, channels: int, num_codes: int = 32):
        super().__init__()
        self.project = ConvNormAct(channels, channels, kernel_size=1, norm="bn")
        self.encoding = EncodingLayer(channels, num_codes)
        self.code_norm = nn.BatchNorm1d(num_codes)
        self.fc = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        context = F.relu(self.code_norm(self.encoding(self.project(x)))).mean(dim=1)
        gamma = torch.sigmoid(self.fc(context))[:, :, None, None]
        return F.relu(x + x * gamma), context


class EncHead(nn.Module):
    """EncNet's head as MMSeg's EncHead (FastFCN's best model under the JPU): 3x3 bottleneck, optionally fused
    by a 3x3 conv with 1x1 laterals of finer levels (upsampled to the bottleneck's size), the context encoding
    module, classifier. `forward(..., context=True)` also returns the encoded context for the SE-loss."""

    def __init__(self, cin: int, num_classes: int, width: int = 512, num_codes: int = 32, dropout: float = 0.1,
                 lateral_channels: Sequence[int] = ()):
        super().__init__()
        self.bottleneck = ConvNormAct(cin, width, norm="bn")
        self.laterals = nn.ModuleList(ConvNormAct(c, width, kernel_size=1, norm="bn") for c in lateral_channels)
        self.fusion = (ConvNormAct(width * (1 + len(lateral_channels)), width, norm="bn") if lateral_channels
                       else None)
        self.encoding = ContextEncoding(width, num_codes)
        self.classifier = Classifier(width, num_classes, dropout)

    def forward(self, x: torch.Tensor, laterals: Sequence[torch.Tensor] = (), *, context: bool = False):
        feat = self.bottleneck(x)
        if self.fusion is not None:
            size = feat.shape[-2:]
            parts = [F.interpolate(conv(f), size=size, mode="bilinear", align_corners=False)
                     for conv, f in zip(self.laterals, laterals)]
            feat = self.fusion(torch.cat([feat, *parts], dim=1))
        scaled, encoded = self.encoding(feat)
        logits = self.classifier(scaled)
        return (logits, encoded) if context else logits


def class_presence(labels: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """The SE-loss target: [B, H, W] label maps -> [B, K] with 1 where the class occurs in the image
    (ignored and out-of-range labels count for nothing)."""
    flat = labels.flatten(1).long()
    valid = (flat >= 0) & (flat < num_classes) & (flat != ignore_index)
    presence = torch.zeros(labels.shape[0], num_classes + 1, device=labels.device)
    presence.scatter_(1, torch.where(valid, flat, num_classes), 1.0)
    return presence[:, :num_classes]
