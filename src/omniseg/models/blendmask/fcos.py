"""FCOS as AdelaiDet's BlendMask uses it: shared head over FPN levels, targets with centre sampling and
size ranges, focal / GIoU / centerness losses, and the per-level top-k + class-wise NMS inference.

The head also runs BlendMask's top layer (K*M*M attentions per location) on the box tower, which is why
it is written here rather than reused from torchvision's FCOSHead (whose towers are not exposed).
Losses and NMS are torchvision's (sigmoid_focal_loss, generalized_box_iou_loss, batched_nms; while
exporting, the last is swapped for its exportable form by `layers.nms.exportable_torchvision_nms`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F
import torchvision.ops.boxes as box_ops
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from omniseg.models.layers.conv import norm_layer

INF = 1e8


class Tower(nn.Module):
    """n x (conv3x3 -> norm -> ReLU), convs shared over levels. GroupNorm is shared too; BatchNorm gets one
    module per level (AdelaiDet's ModuleListDial), since level statistics differ: which is why this is not
    a stack of ConvNormAct blocks, though its norms are the same (`norm_layer`)."""

    def __init__(self, channels: int, num_convs: int, norm: str, num_levels: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(num_convs))
        per_level = norm == "bn"
        self.norms = nn.ModuleList(
            nn.ModuleList(norm_layer(norm, channels, min_group_size=2) for _ in range(num_levels if per_level else 1))
            for _ in range(num_convs)
        )
        for conv in self.convs:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.constant_(conv.bias, 0)

    def forward(self, x: torch.Tensor, level: int) -> torch.Tensor:
        for conv, norms in zip(self.convs, self.norms):
            x = F.relu(norms[level if len(norms) > 1 else 0](conv(x)))
        return x


class FCOSHead(nn.Module):
    """Per level: class logits [B,C,H,W], l/t/r/b distances in stride units (ReLU, no scales: BlendMask's
    USE_SCALE=False with normalised targets), centerness logits (box tower) and the top-level attentions
    (box tower, K*M*M channels)."""

    def __init__(self, channels: int, num_classes: int, num_levels: int, *, num_cls_convs: int = 4,
                 num_box_convs: int = 4, num_share_convs: int = 0, norm: str = "gn", attn_channels: int = 784,
                 prior_prob: float = 0.01):
        super().__init__()
        self.share_tower = Tower(channels, num_share_convs, norm, num_levels)
        self.cls_tower = Tower(channels, num_cls_convs, norm, num_levels)
        self.box_tower = Tower(channels, num_box_convs, norm, num_levels)
        self.cls_logits = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(channels, 4, 3, padding=1)
        self.ctrness = nn.Conv2d(channels, 1, 3, padding=1)
        self.top_layer = nn.Conv2d(channels, attn_channels, 3, padding=1)
        for m in (self.cls_logits, self.bbox_pred, self.ctrness, self.top_layer):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.constant_(m.bias, 0)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features: Sequence[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        out: dict[str, list[torch.Tensor]] = {"logits": [], "reg": [], "ctr": [], "attn": []}
        for level, x in enumerate(features):
            x = self.share_tower(x, level)
            cls_t, box_t = self.cls_tower(x, level), self.box_tower(x, level)
            out["logits"].append(self.cls_logits(cls_t))
            out["reg"].append(F.relu(self.bbox_pred(box_t)))
            out["ctr"].append(self.ctrness(box_t))
            out["attn"].append(self.top_layer(box_t))
        return out


def locations(sizes: Sequence[tuple[int, int]], strides: Sequence[int], device) -> tuple[torch.Tensor, ...]:
    """(xy [L,2], stride [L], level [L]) of every location, level-major: centre = stride//2 + i*stride."""
    xy, st, lv = [], [], []
    for level, ((h, w), s) in enumerate(zip(sizes, strides)):
        ys = torch.arange(h, device=device, dtype=torch.float32) * s + s // 2
        xs = torch.arange(w, device=device, dtype=torch.float32) * s + s // 2
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        xy.append(torch.stack([xx.flatten(), yy.flatten()], 1))
        st.append(torch.full((h * w,), float(s), device=device))
        lv.append(torch.full((h * w,), level, device=device, dtype=torch.int64))
    return torch.cat(xy), torch.cat(st), torch.cat(lv)


def flatten_levels(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """[B,C,H,W] per level -> [B, L, C], level-major as `locations`."""
    return torch.cat([m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, m.shape[1]) for m in maps], dim=1)


def size_ranges(sizes_of_interest: Sequence[float], levels: Sequence[int], device) -> torch.Tensor:
    """[L,2] (lo, hi) of max(l,t,r,b) each location may regress, from the split points between levels."""
    bounds = [-1.0, *[float(s) for s in sizes_of_interest], INF]
    per_level = torch.tensor([[bounds[i], bounds[i + 1]] for i in range(len(bounds) - 1)], device=device)
    return per_level[levels]


def fcos_targets(xy: torch.Tensor, strides: torch.Tensor, ranges: torch.Tensor, boxes: torch.Tensor,
                 labels: torch.Tensor, num_classes: int, radius: float = 1.5):
    """Official FCOS assignment for one image.

    Returns (labels [L] with `num_classes` = background, reg targets [L,4] l/t/r/b in stride units,
    matched GT index [L] (-1 for background)). A location is positive for a GT when it lies in the GT's
    centre region (centre +- radius*stride, clipped to the box) and max(l,t,r,b) is in its level's range;
    ambiguous locations take the smallest-area GT.
    """
    n = xy.shape[0]
    if boxes.shape[0] == 0:
        return (torch.full((n,), num_classes, dtype=torch.int64, device=xy.device), xy.new_zeros((n, 4)),
                torch.full((n,), -1, dtype=torch.int64, device=xy.device))
    x, y = xy[:, 0:1], xy[:, 1:2]
    reg = torch.stack([x - boxes[None, :, 0], y - boxes[None, :, 1], boxes[None, :, 2] - x, boxes[None, :, 3] - y], 2)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    r = strides[:, None] * radius
    cb = torch.stack([torch.maximum(cx - r, boxes[:, 0]), torch.maximum(cy - r, boxes[:, 1]),
                      torch.minimum(cx + r, boxes[:, 2]), torch.minimum(cy + r, boxes[:, 3])], 2)
    in_center = torch.stack([x - cb[..., 0], y - cb[..., 1], cb[..., 2] - x, cb[..., 3] - y], 2).amin(2) > 0
    max_reg = reg.amax(2)
    cared = (max_reg >= ranges[:, 0:1]) & (max_reg <= ranges[:, 1:2])
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[None].expand(n, -1).clone()
    area[~(in_center & cared)] = INF
    min_area, gt = area.min(1)
    positive = min_area < INF
    cls = torch.where(positive, labels[gt], torch.full_like(gt, num_classes))
    reg = reg[torch.arange(n, device=xy.device), gt] / strides[:, None]
    return cls, reg, torch.where(positive, gt, torch.full_like(gt, -1))


def centerness_target(reg: torch.Tensor) -> torch.Tensor:
    lr, tb = reg[:, [0, 2]], reg[:, [1, 3]]
    return torch.sqrt((lr.amin(1) / lr.amax(1).clamp(min=1e-12)) * (tb.amin(1) / tb.amax(1).clamp(min=1e-12)))


def _ltrb_boxes(reg: torch.Tensor) -> torch.Tensor:
    """Distances around the origin as boxes: IoU is translation invariant, so no location is needed."""
    return torch.stack([-reg[:, 0], -reg[:, 1], reg[:, 2], reg[:, 3]], 1)


def fcos_losses(logits: torch.Tensor, reg: torch.Tensor, ctr: torch.Tensor, cls_t: torch.Tensor,
                reg_t: torch.Tensor, num_classes: int, alpha: float = 0.25, gamma: float = 2.0,
                class_weights: torch.Tensor | None = None) -> dict:
    """Flattened over images and locations: logits [N,C], reg [N,4], ctr [N], targets from `fcos_targets`.

    Focal loss summed / #positives; GIoU loss weighted by the centerness target / its sum; centerness BCE
    / #positives (AdelaiDet's normalisation, on one process). Returns the losses and the positives' centerness
    targets (the mask loss weights). `class_weights` [C] weigh the focal loss per class column.
    """
    pos = cls_t != num_classes
    num_pos = max(float(pos.sum()), 1.0)
    onehot = F.one_hot(cls_t.clamp(max=num_classes), num_classes + 1)[:, :num_classes].to(logits.dtype)
    if class_weights is None:
        loss_cls = sigmoid_focal_loss(logits, onehot, alpha=alpha, gamma=gamma, reduction="sum") / num_pos
    else:
        focal = sigmoid_focal_loss(logits, onehot, alpha=alpha, gamma=gamma, reduction="none")
        loss_cls = (focal * class_weights.to(focal.dtype)).sum() / num_pos
    if not bool(pos.any()):
        zero = reg.sum() * 0 + ctr.sum() * 0
        return {"loss_fcos_cls": loss_cls, "loss_fcos_loc": zero, "loss_fcos_ctr": zero}, reg.new_zeros(0), pos
    ctr_t = centerness_target(reg_t[pos])
    denorm = max(float(ctr_t.sum()), 1e-6)
    giou = generalized_box_iou_loss(_ltrb_boxes(reg[pos]), _ltrb_boxes(reg_t[pos]), reduction="none")
    return {
        "loss_fcos_cls": loss_cls,
        "loss_fcos_loc": (giou * ctr_t).sum() / denorm,
        "loss_fcos_ctr": F.binary_cross_entropy_with_logits(ctr[pos], ctr_t, reduction="sum") / num_pos,
    }, ctr_t, pos


def fcos_detect(logits: torch.Tensor, reg: torch.Tensor, ctr: torch.Tensor, xy: torch.Tensor,
                strides: torch.Tensor, levels: torch.Tensor, num_levels: int, image_size: tuple[int, int], *,
                score_threshold: float = 0.05, pre_nms_topk: int = 1000, nms_threshold: float = 0.6,
                max_detections: int = 100) -> tuple[torch.Tensor, ...]:
    """One image: (boxes [D,4] xyxy clipped to image_size, scores [D], labels [D], location index [D]).

    Official order: cls*ctr > threshold, top `pre_nms_topk` per level, score sqrt(cls*ctr), boxes from
    l/t/r/b * stride, class-wise NMS, best `max_detections` by score.
    """
    probs = torch.sigmoid(logits.float()) * torch.sigmoid(ctr.float())[:, None]  # [L,C]
    cand_loc, cand_cls, cand_score = [], [], []
    for level in range(num_levels):
        idx = torch.nonzero(levels == level).flatten()
        p = probs[idx]
        keep = torch.nonzero(p > score_threshold)
        # The top-k candidates stay in location order, so that NMS sees the same order (and breaks score ties
        # the same way) whether or not the top-k ran.
        if torch.compiler.is_exporting():  # the candidate count is symbolic: take min(count, top-k) always
            top = p[keep[:, 0], keep[:, 1]].topk(torch.sym_min(keep.shape[0], pre_nms_topk)).indices
            keep = keep[top.sort().values]
        elif keep.shape[0] > pre_nms_topk:
            keep = keep[p[keep[:, 0], keep[:, 1]].topk(pre_nms_topk).indices.sort().values]
        cand_loc.append(idx[keep[:, 0]])
        cand_cls.append(keep[:, 1])
        cand_score.append(p[keep[:, 0], keep[:, 1]])
    loc, cls, score = torch.cat(cand_loc), torch.cat(cand_cls), torch.cat(cand_score).sqrt()
    d = reg[loc].float() * strides[loc, None]
    x, y = xy[loc, 0], xy[loc, 1]
    h, w = image_size
    boxes = torch.stack([(x - d[:, 0]).clamp(0, w), (y - d[:, 1]).clamp(0, h),
                         (x + d[:, 2]).clamp(0, w), (y + d[:, 3]).clamp(0, h)], 1)
    # looked up at call time, so that an export swaps in its exportable form (layers.nms)
    keep = box_ops.batched_nms(boxes, score, cls, nms_threshold)[:max_detections]  # sorted by decreasing score
    return boxes[keep], score[keep], cls[keep], loc[keep]
