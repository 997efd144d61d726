"""Set-prediction losses of MaskFormer / Mask2Former.

For every prediction set (final + each ``aux_outputs`` entry, matched independently):

* ``loss_ce``: cross-entropy over all queries, unmatched queries target "no object" (index K)
  whose class weight is ``eos_coef``; weighted-mean reduction (``F.cross_entropy`` with weights).
* ``loss_mask``: on matched pairs, BCE (Mask2Former) or sigmoid focal (MaskFormer) averaged over
  ``num_points`` importance-sampled points per mask, summed and divided by ``num_masks``.
* ``loss_dice``: soft dice on the same points, summed and divided by ``num_masks``.

Predicted masks stay at their 1/4 resolution: pred and GT are read at the same normalised point
coordinates. ``num_masks`` is the batch's GT count, averaged over DDP ranks when
``torch.distributed`` is initialised (as the official code), clamped to >= 1.
Returned losses are already multiplied by ``weight_dict``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from omniseg.models.layers.point_sampling import (
    Generators,
    calculate_uncertainty,
    get_uncertain_point_coords_with_randomness,
    point_sample,
)

__all__ = ["SetCriterion", "sigmoid_ce_loss", "sigmoid_focal_loss", "dice_loss", "count_num_masks"]

Indices = Sequence[tuple[torch.Tensor, torch.Tensor]]


def sigmoid_ce_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """BCE averaged over points [N, P], summed over masks, divided by num_masks."""
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return loss.mean(1).sum() / num_masks


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, num_masks: float, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """MaskFormer's sigmoid focal loss averaged over points, summed over masks, divided by num_masks."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1).sum() / num_masks


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Soft dice ``1 - (2 sum(p t) + 1) / (sum p + sum t + 1)`` per mask, summed, divided by num_masks."""
    prob = logits.sigmoid().flatten(1)
    numerator = 2 * (prob * targets).sum(-1)
    denominator = prob.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def count_num_masks(targets: Sequence[dict], device: torch.device | str) -> float:
    """GT masks per rank used to normalise mask losses: averaged over DDP ranks, at least 1."""
    num_masks = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    world_size = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num_masks)
        world_size = dist.get_world_size()
    return torch.clamp(num_masks / world_size, min=1).item()


def _pred_permutation(indices: Indices) -> tuple[torch.Tensor, torch.Tensor]:
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    return batch_idx, torch.cat([src for src, _ in indices])


class SetCriterion(nn.Module):
    """Hungarian-matched class + point-sampled mask losses with deep supervision.

    Args:
        num_classes: K, number of real classes (the no-object class is index K).
        matcher: callable ``(outputs, targets, generator=...) -> indices`` (a ``HungarianMatcher``).
        weight_dict: weight of ``loss_ce`` / ``loss_mask`` / ``loss_dice`` (also used for aux levels);
            missing keys keep the Mask2Former defaults 2 / 5 / 5, a weight of 0 disables a term.
        eos_coef: class weight of the no-object class.
        num_points, oversample_ratio, importance_sample_ratio: PointRend importance sampling.
        mask_loss: ``"bce"`` (Mask2Former) or ``"focal"`` (MaskFormer).
    """

    def __init__(
        self,
        num_classes: int,
        matcher: Callable,
        weight_dict: dict[str, float] | None = None,
        eos_coef: float = 0.1,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        mask_loss: str = "bce",
        class_weights: torch.Tensor | None = None,
    ):
        super().__init__()
        if mask_loss not in ("bce", "focal"):
            raise ValueError(f"mask_loss must be 'bce' or 'focal', got {mask_loss!r}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0, **(weight_dict or {})}
        self.eos_coef = eos_coef
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.mask_loss = mask_loss
        empty_weight = torch.ones(num_classes + 1)
        if class_weights is not None:  # per-class weights; the no-object class keeps eos_coef
            empty_weight[:-1] = class_weights
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, weight_dict={self.weight_dict}, eos_coef={self.eos_coef}, "
            f"num_points={self.num_points}, oversample_ratio={self.oversample_ratio}, "
            f"importance_sample_ratio={self.importance_sample_ratio}, mask_loss={self.mask_loss!r}"
        )

    # ----------------------------------------------------------------------------- single terms
    def loss_labels(self, pred_logits: torch.Tensor, targets: Sequence[dict], indices: Indices) -> torch.Tensor:
        """Unweighted CE over all queries; queries absent from ``indices`` target no-object."""
        logits = pred_logits.float()
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        if sum(len(src) for src, _ in indices) > 0:
            batch_idx, src_idx = _pred_permutation(indices)
            matched = torch.cat([t["labels"].to(logits.device)[tgt] for t, (_, tgt) in zip(targets, indices)])
            target_classes[batch_idx.to(logits.device), src_idx.to(logits.device)] = matched
        return F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight.to(logits.device))

    def loss_masks(
        self,
        pred_masks: torch.Tensor,
        targets: Sequence[dict],
        indices: Indices,
        num_masks: float,
        generator: Generators = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unweighted (mask, dice) losses of the matched pairs on importance-sampled points.

        With one generator per image, image b's points come from generator b only, so the loss of an
        image does not depend on which other images share its batch (or DDP rank).
        """
        if sum(len(src) for src, _ in indices) == 0:
            # Nothing to supervise: zero losses that still reach pred_masks (keeps DDP graphs identical).
            zero = pred_masks.sum() * 0.0
            return zero, zero.clone()
        device = pred_masks.device
        batch_idx, src_idx = _pred_permutation(indices)
        src = pred_masks[batch_idx.to(device), src_idx.to(device)].float()[:, None]  # [N, 1, h, w]
        with torch.no_grad():
            if isinstance(generator, (list, tuple)):
                counts = [len(src_b) for src_b, _ in indices]
                coords = torch.cat([
                    self._sample_coords(chunk, g) for chunk, g in zip(src.split(counts), generator) if len(chunk)
                ])
            else:
                coords = self._sample_coords(src, generator)
            point_labels = self._matched_target_points(targets, indices, coords)
        point_logits = point_sample(src, coords, align_corners=False)[:, 0]
        if self.mask_loss == "bce":
            loss_mask = sigmoid_ce_loss(point_logits, point_labels, num_masks)
        else:
            loss_mask = sigmoid_focal_loss(point_logits, point_labels, num_masks)
        return loss_mask, dice_loss(point_logits, point_labels, num_masks)

    def _sample_coords(self, mask_logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return get_uncertain_point_coords_with_randomness(
            mask_logits, calculate_uncertainty, self.num_points, self.oversample_ratio,
            self.importance_sample_ratio, generator=generator,
        )

    @staticmethod
    def _matched_target_points(targets: Sequence[dict], indices: Indices, coords: torch.Tensor) -> torch.Tensor:
        """The matched GT masks read at `coords` [N, P, 2] -> [N, P], as if every image's masks were
        zero-padded to the batch's largest mask size (the official code pads them; here each image's
        points are rescaled to its own size instead, which reads the same values without copying
        any mask). Each image's masks are read in one `grid_sample`: a GT matched once has its points
        in its own row (GTs supervised several times, as MP-Former's groups, are read from copies)."""
        height = max(t["masks"].shape[-2] for t in targets)
        width = max(t["masks"].shape[-1] for t in targets)
        labels, start = [], 0
        for t, (_, tgt) in zip(targets, indices):
            if len(tgt) == 0:
                continue
            masks = t["masks"].to(device=coords.device, dtype=torch.float32)  # a no-op for the model's float masks
            tgt = tgt.to(coords.device)
            scale = coords.new_tensor([width / masks.shape[-1], height / masks.shape[-2]])
            points = coords[start:start + len(tgt)] * scale
            if len(torch.unique(tgt)) == len(tgt):
                grid = coords.new_zeros(masks.shape[0], coords.shape[1], 2)
                grid[tgt] = points
                labels.append(point_sample(masks[:, None], grid, align_corners=False)[tgt, 0])
            else:
                labels.append(point_sample(masks[tgt][:, None], points, align_corners=False)[:, 0])
            start += len(tgt)
        return torch.cat(labels)

    # ----------------------------------------------------------------------------- public API
    def compute_losses_for_indices(
        self,
        outputs: dict,
        targets: Sequence[dict],
        indices: Indices,
        num_masks: float | None = None,
        generator: Generators = None,
    ) -> dict[str, torch.Tensor]:
        """Weighted ``loss_ce`` / ``loss_mask`` / ``loss_dice`` of ONE prediction set for a given assignment.

        Use it to supervise queries whose GT is fixed in advance (e.g. MP-Former's mask-piloted
        queries): ``indices[b] = (query_idx, gt_idx)``; every query not listed targets no-object.
        ``num_masks`` defaults to :func:`count_num_masks` of ``targets`` (pass e.g. ``num_masks * groups``
        when each GT is supervised several times).
        """
        if num_masks is None:
            num_masks = count_num_masks(targets, outputs["pred_logits"].device)
        loss_ce = self.loss_labels(outputs["pred_logits"], targets, indices)
        loss_mask, loss_dice = self.loss_masks(outputs["pred_masks"], targets, indices, num_masks, generator)
        raw = {"loss_ce": loss_ce, "loss_mask": loss_mask, "loss_dice": loss_dice}
        return {name: value * self.weight_dict[name] for name, value in raw.items()}

    def forward(
        self,
        outputs: dict,
        targets: Sequence[dict],
        indices: Indices | None = None,
        generator: Generators = None,
    ) -> dict[str, torch.Tensor]:
        """Weighted losses of the final prediction set and every ``aux_outputs`` set.

        Args:
            outputs: ``{"pred_logits": [B, Q, K+1], "pred_masks": [B, Q, h, w], "aux_outputs": [...]}``.
            targets: per image ``{"labels": int64 [N], "masks": bool/float [N, Hp, Wp]}`` (padded input size).
            indices: optional precomputed assignment for the FINAL set (skips its matching);
                aux sets are always matched independently.
            generator: optional RNG for matching points and loss points: one generator, or one per
                image (batch-composition-independent losses; see ``loss_masks``).

        Returns:
            ``loss_ce``, ``loss_mask``, ``loss_dice`` and ``loss_ce_{i}`` ... for ``aux_outputs[i]``.
        """
        final = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        num_masks = count_num_masks(targets, final["pred_logits"].device)
        if indices is None:
            indices = self.matcher(final, targets, generator=generator)
        losses = self.compute_losses_for_indices(final, targets, indices, num_masks, generator)
        for i, aux in enumerate(outputs.get("aux_outputs") or []):
            aux_indices = self.matcher(aux, targets, generator=generator)
            aux_losses = self.compute_losses_for_indices(aux, targets, aux_indices, num_masks, generator)
            losses.update({f"{name}_{i}": value for name, value in aux_losses.items()})
        return losses
