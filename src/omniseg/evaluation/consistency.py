"""Layer consistency of query-based decoders (MP-Former, Table 1): mIoU-Li and Util per layer.

For every prediction set i (set 0 = the initial queries, set i = after decoder layer i, the last set
= the model's output) each image's GT segments are Hungarian-matched to the queries with that set's
predictions (Mask2Former's costs, fixed random points per image so results are reproducible).
Let q_j = the query matched to GT j at the LAST set. Then:

* ``Util[i]``: fraction of GT segments whose matched query at set i is q_j (query utilisation:
  does the layer already work on the object with the query that will finally own it?). Defined for
  i = 0 .. L-1: the last set is the reference, so its Util would be 100 by construction.
* ``mIoU-Li[i]`` (layer-to-layer, what the tables report): mean over GT segments of
  IoU(mask_i(q_j), mask_{i+1}(q_j)), masks binarised at logit 0: how much the final owner's mask
  changes between consecutive sets. Defined for i = 0 .. L-1.
* ``mIoU-Li-gt[i]`` (variant): mean IoU(mask_i(q_j), GT_j), for i = 0 .. L.

The paper's metric code was never released; both readings of its definition are computed. IoUs are
measured at the mask resolution (1/4 of the input), with GT masks area-downsampled (>= 0.5).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F

from omniseg.models.maskformer.matcher import HungarianMatcher

__all__ = ["LayerConsistencyEvaluator", "evaluate_consistency"]


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise IoU of bool [N, P] masks; two empty masks count as identical (IoU 1)."""
    inter = (a & b).sum(-1).float()
    union = (a | b).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


class LayerConsistencyEvaluator:
    """Accumulates mIoU-Li / Util over images; works with any model that returns per-layer
    (class logits, mask logits) sets, e.g. Mask2Former, MP-Former, MaskFormer."""

    def __init__(self, matcher: HungarianMatcher | None = None, seed: int = 0):
        self.matcher = matcher or HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=12544)
        self.seed = seed
        self.reset()

    def reset(self) -> None:
        self._images = 0
        self._objects = 0
        self._util: list[float] = []
        self._iou_next: list[float] = []
        self._iou_gt: list[float] = []

    @torch.no_grad()
    def process(self, sets: Sequence[dict], labels: torch.Tensor, masks: torch.Tensor) -> None:
        """One image. sets: per layer {"pred_logits": [Q, K+1], "pred_masks": [Q, h, w]} (no batch dim);
        labels [N]; masks [N, H, W] GT at the (padded) input size the predictions refer to."""
        n_sets = len(sets)
        if not self._iou_gt:
            self._util, self._iou_next, self._iou_gt = [0.0] * (n_sets - 1), [0.0] * (n_sets - 1), [0.0] * n_sets
        elif len(self._iou_gt) != n_sets:
            raise ValueError(f"got {n_sets} prediction sets, earlier images had {len(self._iou_gt)}")
        self._images += 1
        n = len(labels)
        if n == 0:
            return
        targets = [{"labels": labels, "masks": masks}]
        owners = []  # per set: query index matched to each GT j
        for s in sets:
            gen = torch.Generator(device=s["pred_masks"].device).manual_seed(self.seed + self._images)
            rows, cols = self.matcher({k: v[None] for k, v in s.items()}, targets, generator=gen)[0]
            owner = torch.empty(n, dtype=torch.int64)
            owner[cols] = rows
            owners.append(owner)
        final = owners[-1]
        h, w = sets[-1]["pred_masks"].shape[-2:]
        gt = F.interpolate(masks[None].float(), size=(h, w), mode="area")[0].flatten(1) >= 0.5
        binary = [(s["pred_masks"][final] > 0).flatten(1).cpu() for s in sets]
        gt = gt.cpu()
        for i in range(n_sets):
            self._iou_gt[i] += _iou(binary[i], gt).sum().item()
            if i + 1 < n_sets:
                self._util[i] += (owners[i] == final).sum().item()
                self._iou_next[i] += _iou(binary[i], binary[i + 1]).sum().item()
        self._objects += n

    def evaluate(self) -> dict:
        """Percentages per prediction set: {"Util": [...], "mIoU-Li": [...], "mIoU-Li-gt": [...], ...}."""
        n = max(self._objects, 1)
        return {
            "images": self._images,
            "objects": self._objects,
            "sets": "index 0 = initial queries, i = after decoder layer i",
            "Util": [100.0 * v / n for v in self._util],
            "mIoU-Li": [100.0 * v / n for v in self._iou_next],
            "mIoU-Li-gt": [100.0 * v / n for v in self._iou_gt],
        }


@torch.no_grad()
def evaluate_consistency(model, dataset, cfg, *, max_images: int | None = None, device=None,
                         figure: str | None = None, progress: bool = True) -> dict:
    """Layer consistency of `model` on `dataset` (GT segments derived for `cfg.task`, or for the task a
    task-conditioned model predicts by default).
    With `figure`, also draws the first image's masks layer by layer for a few queries."""
    from tqdm.auto import tqdm

    from omniseg.data.loader import collate
    from omniseg.data.targets import mask_targets
    from omniseg.data.transforms import build_transforms

    device = device or next(model.parameters()).device
    transforms = build_transforms(False, min_size_test=cfg.data.min_size_test, max_size_test=cfg.data.max_size_test)
    evaluator = LayerConsistencyEvaluator()
    # A task-conditioned model (OneFormer) is scored on the task its forward_raw predicts.
    task = model.default_task or str(cfg.task)
    was_training = model.training
    model.eval()
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    for i in tqdm(range(n), desc="consistency", disable=not progress, mininterval=1.0):
        sample = transforms(dataset[i])
        target = mask_targets(sample, task)
        batch = collate([sample], size_divisibility=cfg.data.size_divisibility)
        images = batch.images.to(device)
        layers = model.query_layers(model.normalize(images))
        if layers is None:
            raise ValueError(f"layer consistency needs a query decoder; {model.describe()} has none")
        sets = [{k: v[0].float() for k, v in s.items()} for s in layers]
        hp, wp = images.shape[-2:]
        masks = target["masks"].to(device)
        masks = F.pad(masks, (0, wp - masks.shape[-1], 0, hp - masks.shape[-2]))
        evaluator.process(sets, target["labels"].to(device), masks)
        if figure and i == 0:
            from omniseg.visualize import plot_layer_masks

            plot_layer_masks(sample["image"], sets, figure, labels=target["labels"], gt_masks=masks,
                             matcher=evaluator.matcher)
    model.train(was_training)
    return evaluator.evaluate()
