"""Hungarian (bipartite) matching between predicted queries and ground-truth segments.

Follows Mask2Former's matcher: per image, in fp32 and without gradients, the cost of assigning
query q to GT t is ``cost_class * -p_q(class_t) + cost_mask * mask_cost + cost_dice * dice_cost``,
with both mask costs evaluated on ``num_points`` uniform random points shared by every pair
(predictions at 1/4 resolution and padded full-resolution GT are read at the same normalised
coordinates, so nothing is resized). ``mask_loss="focal"`` gives MaskFormer's focal cost
(evaluated on the same points instead of MaskFormer's full-resolution masks).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from omniseg.models.layers.point_sampling import Generators, image_generator, point_sample, random_points

__all__ = ["HungarianMatcher", "pairwise_sigmoid_ce", "pairwise_sigmoid_focal", "pairwise_dice"]


def pairwise_sigmoid_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean BCE over points for every (pred, GT) pair: [Q, P] x [T, P] -> [Q, T].

    BCE(x, t) = t * BCE(x, 1) + (1 - t) * BCE(x, 0), so two matmuls avoid a [Q, T, P] tensor.
    """
    num_points = logits.shape[1]
    log_sigmoid = F.logsigmoid(logits)  # BCE(x, 1) = -log_sigmoid(x), BCE(x, 0) = x - log_sigmoid(x), bit for bit
    pos = log_sigmoid.neg()
    neg = logits - log_sigmoid
    return (pos @ targets.T + neg @ (1 - targets).T) / num_points


def pairwise_sigmoid_focal(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Mean sigmoid focal loss over points for every pair (MaskFormer's cost), same matmul trick."""
    num_points = logits.shape[1]
    prob = logits.sigmoid()
    pos = (1 - prob) ** gamma * F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = prob**gamma * F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    if alpha >= 0:
        pos = pos * alpha
        neg = neg * (1 - alpha)
    return (pos @ targets.T + neg @ (1 - targets).T) / num_points


def pairwise_dice(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Soft dice loss ``1 - (2 sum(p t) + 1) / (sum p + sum t + 1)`` for every pair: -> [Q, T]."""
    prob = logits.sigmoid()
    numerator = 2 * prob @ targets.T
    denominator = prob.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to GT segments minimising the weighted matching cost.

    Args:
        cost_class, cost_mask, cost_dice: weights of the three cost terms (Mask2Former: 2, 5, 5).
        num_points: uniform points per image on which the mask costs are evaluated.
        mask_loss: ``"bce"`` (Mask2Former) or ``"focal"`` (MaskFormer, alpha 0.25, gamma 2).
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_mask: float = 5.0,
        cost_dice: float = 5.0,
        num_points: int = 12544,
        mask_loss: str = "bce",
    ):
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("at least one matching cost weight must be non-zero")
        if mask_loss not in ("bce", "focal"):
            raise ValueError(f"mask_loss must be 'bce' or 'focal', got {mask_loss!r}")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points
        self.mask_loss = mask_loss

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, cost_dice={self.cost_dice}, "
            f"num_points={self.num_points}, mask_loss={self.mask_loss!r}"
        )

    @torch.no_grad()
    def cost_matrix(
        self,
        pred_logits: torch.Tensor,
        pred_masks: torch.Tensor,
        tgt_labels: torch.Tensor,
        tgt_masks: torch.Tensor,
        point_coords: torch.Tensor,
    ) -> torch.Tensor:
        """Matching cost [Q, T] of one image.

        Args:
            pred_logits: [Q, K+1] class logits.
            pred_masks: [Q, h, w] mask logits (any resolution).
            tgt_labels: [T] contiguous class ids.
            tgt_masks: [T, H, W] bool/float GT masks (any resolution, usually the padded input).
            point_coords: [P, 2] points in [0, 1] shared by all predictions and GT masks.
        """
        device_type = pred_masks.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            cost_class = -pred_logits.float().softmax(-1)[:, tgt_labels]
            coords = point_coords.float()
            pred_points = point_sample(
                pred_masks.float()[:, None], coords[None].expand(pred_masks.shape[0], -1, -1), align_corners=False
            )[:, 0]
            tgt_points = point_sample(
                tgt_masks.float()[:, None], coords[None].expand(tgt_masks.shape[0], -1, -1), align_corners=False
            )[:, 0]
            if self.mask_loss == "bce":
                cost_mask = pairwise_sigmoid_ce(pred_points, tgt_points)
            else:
                cost_mask = pairwise_sigmoid_focal(pred_points, tgt_points)
            cost_dice = pairwise_dice(pred_points, tgt_points)
            return self.cost_class * cost_class + self.cost_mask * cost_mask + self.cost_dice * cost_dice

    @torch.no_grad()
    def forward(
        self,
        outputs: dict,
        targets: Sequence[dict],
        generator: Generators = None,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Match every image of the batch.

        Args:
            outputs: ``{"pred_logits": [B, Q, K+1], "pred_masks": [B, Q, h, w], ...}`` (one prediction set).
            targets: per image ``{"labels": int64 [T], "masks": [T, H, W]}``.
            generator: optional RNG for the sampled points (global RNG when None, as the official code),
                or one per image.

        Returns:
            Per image ``(pred_idx, tgt_idx)`` int64 CPU tensors of length ``min(Q, T)``.
        """
        pred_logits = outputs["pred_logits"]
        pred_masks = outputs["pred_masks"]
        if len(targets) != pred_logits.shape[0]:
            raise ValueError(f"got {len(targets)} targets for a batch of {pred_logits.shape[0]} predictions")
        indices = []
        for b, target in enumerate(targets):
            labels = target["labels"]
            if labels.numel() == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            coords = random_points((self.num_points, 2), pred_masks.device, image_generator(generator, b))
            tgt_masks = target["masks"].to(pred_masks.device)
            cost = self.cost_matrix(pred_logits[b], pred_masks[b], labels, tgt_masks, coords)
            # Diverged predictions must not crash training: non-finite costs are only chosen as a last resort.
            big = torch.finfo(cost.dtype).max
            cost = torch.nan_to_num(cost, nan=big, posinf=big, neginf=big)
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
