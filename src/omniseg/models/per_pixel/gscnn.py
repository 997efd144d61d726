"""Gated-SCNN's shape stream, gated convolution, and its boundary losses (nv-tlabs/GSCNN, ICCV 2019).

The shape stream runs beside the regular stream at stride `shape_stride` (the original runs it at
full resolution on WideResNet-38's stride-1 features; with a ResNet the finest map is res2 at /4, so
the stream starts there and its boundary logits are upsampled to the image for the losses). Known
issues of the official code are fixed deliberately: the edge logits are not sigmoided twice (GSCNN
issue #62), Canny runs on the raw uint8 image (issue #22), and every class, road included, has
boundaries in the edge ground truth.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from omniseg.models.layers.canny import canny
from omniseg.models.layers.conv import ConvNormAct


class BasicBlock(nn.Module):
    """ResNet basic block at constant width (the shape stream's residual blocks)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = ConvNormAct(channels, channels, norm="bn")
        self.conv2 = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv2(self.conv1(x)))


class GatedConv(nn.Module):
    """Gated convolution layer: alpha = sigmoid(BN(1x1(ReLU(1x1(BN([s, r])))))) from the shape-stream
    features s and a 1-channel regular-stream side output r; out = 1x1((1 + alpha) * s), i.e. the
    paper's (s * alpha + s) w. alpha marks where the regular stream sees boundaries."""

    def __init__(self, channels: int):
        super().__init__()
        self.gate = nn.Sequential(
            nn.BatchNorm2d(channels + 1), nn.Conv2d(channels + 1, channels + 1, 1), nn.ReLU(inplace=True),
            nn.Conv2d(channels + 1, 1, 1), nn.BatchNorm2d(1), nn.Sigmoid(),
        )
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)

    def forward(self, s: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = self.gate(torch.cat([s, r], dim=1))
        return self.conv(s * (alpha + 1)), alpha


class ShapeStream(nn.Module):
    """res2 -> [block -> 1x1 (halve) -> gated conv(side output)] x len(side_channels) -> 1x1 -> boundary logits.

    `side_channels` are the regular-stream levels that gate it (res3, res4, res5), each reduced to one
    channel by a 1x1 conv, as the original (gates take 1-channel side outputs, not full features).
    `stem=False`: the first block reads the input map directly (the original on WideResNet-38's 64-channel
    stride-1 map), so `in_channels` must equal `width`.
    """

    def __init__(self, in_channels: int, side_channels: Sequence[int], width: int = 64, stem: bool = True):
        super().__init__()
        if not stem and in_channels != width:
            raise ValueError(f"a shape stream without a stem conv keeps its input's width: model.shape_width must "
                             f"be {in_channels}, got {width}")
        self.stem = nn.Conv2d(in_channels, width, 1) if stem else nn.Identity()
        widths = [width // (2 ** i) for i in range(len(side_channels) + 1)]
        self.blocks = nn.ModuleList(BasicBlock(w) for w in widths[:-1])
        self.reduce = nn.ModuleList(nn.Conv2d(a, b, 1) for a, b in zip(widths[:-1], widths[1:]))
        self.sides = nn.ModuleList(nn.Conv2d(c, 1, 1) for c in side_channels)
        self.gates = nn.ModuleList(GatedConv(w) for w in widths[1:])
        self.head = nn.Conv2d(widths[-1], 1, 1, bias=False)

    def forward(self, fine: torch.Tensor, sides: Sequence[torch.Tensor]) -> torch.Tensor:
        size = fine.shape[-2:]
        s = self.stem(fine)
        for block, reduce, side, gate, r in zip(self.blocks, self.reduce, self.sides, self.gates, sides):
            r = F.interpolate(side(r), size=size, mode="bilinear", align_corners=True)
            s, _ = gate(reduce(block(s)), r)
        return self.head(s)


def numpy_uint8_cast(x: torch.Tensor) -> torch.Tensor:
    """`x.astype(np.uint8)` as NumPy casts floats on x86: truncate towards zero, keep the low 8 bits
    (-1.3 -> 255, -2.1 -> 254). The released model's Canny read its normalised input cast this way."""
    return (x.float().trunc().to(torch.int32) & 255).to(torch.uint8)


class EdgeFusion(nn.Module):
    """[boundary probability, Canny edges of the raw image] -> 1x1 -> sigmoid: the 'acts' map the
    ASPP's edge branch reads."""

    # Hysteresis steps in an exported graph, which cannot loop until convergence: each step extends a weak
    # edge chain by one pixel, so chains longer than this from their strong pixel are cut there.
    export_hysteresis_steps = 256

    def __init__(self, canny_low: float = 10.0, canny_high: float = 100.0):
        super().__init__()
        self.fuse = nn.Conv2d(2, 1, 1, bias=False)
        self.canny_low, self.canny_high = float(canny_low), float(canny_high)

    def forward(self, edge_logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        steps = self.export_hysteresis_steps if torch.compiler.is_compiling() else None
        edges = canny(images, self.canny_low, self.canny_high, max_iterations=steps).to(edge_logits.dtype)
        return torch.sigmoid(self.fuse(torch.cat([torch.sigmoid(edge_logits), edges], dim=1)))


# -- boundary ground truth and losses -----------------------------------------------------------------

def label_boundaries(labels: torch.Tensor, radius: int = 2, ignore_index: int = 255) -> torch.Tensor:
    """[B,H,W] labels -> bool [B,H,W]: pixels within `radius` (Chebyshev) of a pixel of another class.
    Transitions to ignored pixels are not boundaries (their labels are unknown)."""
    lab = labels.long()
    valid = lab != ignore_index
    big = int(lab[valid].max()) + 1 if valid.any() else 1
    k = 2 * radius + 1
    hi = F.max_pool2d(torch.where(valid, lab, -1).float()[:, None], k, 1, radius)[:, 0]
    lo = -F.max_pool2d(-torch.where(valid, lab, big).float()[:, None], k, 1, radius)[:, 0]
    return (hi != lo) & (hi >= 0) & (lo < big)


def balanced_edge_bce(edge_logits: torch.Tensor, boundaries: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Class-balanced BCE over the batch: boundary pixels weighted by the non-boundary fraction and vice
    versa (boundaries are a few % of pixels); ignored pixels weigh 0. Mean over all pixels, as GSCNN."""
    target = boundaries.float()
    pos = (boundaries & valid).sum().float()
    neg = (~boundaries & valid).sum().float()
    total = (pos + neg).clamp_min(1)
    weight = torch.where(boundaries, neg / total, pos / total) * valid
    return F.binary_cross_entropy_with_logits(edge_logits, target, weight=weight)


def image_class_weights(labels: torch.Tensor, num_classes: int, upper_bound: float = 1.0,
                        ignore_index: int = 255) -> torch.Tensor:
    """[B,H,W] labels -> [B,K] class weights of each image: 1 + upper_bound * (1 - f) for a class covering the
    fraction f > 0 of the image's labelled pixels, 1 for an absent class. Rare classes of an image weigh up to
    1 + upper_bound, a class covering it all weighs 1 (GSCNN's ImageBasedCrossEntropyLoss2d, norm off)."""
    lab = labels.long().flatten(1)
    valid = (lab != ignore_index) & (lab >= 0) & (lab < num_classes)
    counts = torch.zeros(lab.shape[0], num_classes, device=lab.device)
    counts.scatter_add_(1, torch.where(valid, lab, 0), valid.float())
    freq = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    return 1.0 + upper_bound * (1.0 - freq) * (counts > 0)


def image_weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, upper_bound: float = 1.0,
                                 ignore_index: int = 255) -> torch.Tensor:
    """Cross-entropy of each image under its own `image_class_weights` (weighted mean over its labelled
    pixels), averaged over the images that have labelled pixels; 0 (with gradient) when none has.
    logits [B,K,H,W], labels [B,H,W]. A generic per-pixel loss: rare classes of each image count more."""
    weights = image_class_weights(labels, logits.shape[1], upper_bound, ignore_index)
    lab = labels.long()
    valid = lab != ignore_index
    nll = F.cross_entropy(logits, lab, reduction="none", ignore_index=ignore_index)
    pixel_weight = weights.gather(1, torch.where(valid, lab, 0).flatten(1)).view_as(nll) * valid
    per_image_weight = pixel_weight.flatten(1).sum(dim=1)
    per_image = (nll * pixel_weight).flatten(1).sum(dim=1) / per_image_weight.clamp_min(1e-12)
    present = per_image_weight > 0
    if not present.any():
        return logits.sum() * 0.0
    return per_image[present].mean()


def _triangle_smooth(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable triangle filter [1..r+1..1]/(r+1)^2 with replicate padding (Dollar's convTri)."""
    ramp = torch.arange(1, radius + 2, dtype=x.dtype, device=x.device)
    kernel = torch.cat([ramp, ramp[:-1].flip(0)]) / (radius + 1) ** 2
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def gradient_magnitude(maps: torch.Tensor, radius: int = 4) -> torch.Tensor:
    """Smoothed [B,C,H,W] maps -> gradient magnitude (central differences), divided by its per-image max."""
    smooth = _triangle_smooth(maps, radius)
    gy, gx = torch.gradient(smooth, dim=(2, 3))
    sq = gx * gx + gy * gy
    mag = torch.sqrt(sq.clamp_min(1e-12)) * (sq > 1e-12)  # exactly 0 on flat regions, finite gradient
    return mag / mag.flatten(1).amax(dim=1).clamp_min(1e-8).view(-1, 1, 1, 1)


def gumbel_softmax(logits: torch.Tensor, tau: float, generators: Sequence[torch.Generator] | None) -> torch.Tensor:
    """Soft Gumbel-softmax over classes (dim 1); with generators, each image draws from its own stream."""
    if generators is None:
        u = torch.rand_like(logits)
    else:
        u = torch.stack([torch.rand(logits.shape[1:], generator=g).to(logits) for g in generators])
    noise = -torch.log((-torch.log(u.clamp(1e-10, 1.0))).clamp_min(1e-10))
    return torch.softmax((logits + noise) / tau, dim=1)


def dual_task_loss(seg_logits: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int = 255,
                   tau: float = 0.5, generators=None, eps: float = 1e-8) -> torch.Tensor:
    """Ties the boundaries of the predicted segmentation to those of the ground truth: L1 between the
    gradient magnitudes of the Gumbel-softmax prediction and of the one-hot labels, averaged half over
    pixels where the label map has a boundary and half where the prediction does."""
    valid = (labels != ignore_index)[:, None]
    probs = gumbel_softmax(seg_logits.float(), tau, generators) * valid
    onehot = F.one_hot(torch.where(valid[:, 0], labels, 0).long(), num_classes).permute(0, 3, 1, 2).float() * valid
    g_pred, g_gt = gradient_magnitude(probs), gradient_magnitude(onehot)
    l1 = (g_pred - g_gt).abs()
    on_gt, on_pred = (g_gt > eps).float(), (g_pred > eps).float()
    return 0.5 * (l1 * on_gt).sum() / on_gt.sum().clamp_min(1) + 0.5 * (l1 * on_pred).sum() / on_pred.sum().clamp_min(1)
