"""Boundary F-score (BF), the boundary-quality metric Gated-SCNN reports next to mIoU.

Conventions follow the official Gated-SCNN evaluation (nv-tlabs/GSCNN, `utils/f_boundary.py` and
`evaluate()` in `train.py`), itself the DAVIS `db_eval_boundary` / `seg2bmap` measure:

* Boundary map (`seg2bmap`): a pixel is on the boundary when its value differs from its right,
  bottom or bottom-right neighbour (a 1-px contour on the top/left side of each edge, so a
  background pixel can be a boundary pixel too); the image border is not a boundary.
* Ignore: pixels whose ground truth is the ignore label are set to background in *both* binary
  masks before the boundary maps are taken (not removed from the maps afterwards).
* Tolerance: a relative threshold `th` becomes a disk of radius `ceil(th * sqrt(H^2 + W^2))` px
  (skimage `disk`: integer offsets with dx^2 + dy^2 <= r^2); radius 0 means exact matching.
* Degenerate cases: no boundary in prediction nor ground truth -> P = R = 1 (F = 1); prediction
  without boundary, ground truth with -> P = 1, R = 0 (F = 0); the reverse -> P = 0, R = 1
  (F = 0); F = 0 whenever P + R = 0.
* Averaging: per class, the mean of the per-image F over *all* images (an image where the class
  has no boundary in either map counts as F = 1), then the plain mean over classes.
  `skip_absent=True` instead averages each class only over images where it has a boundary in
  the ground truth or the prediction (classes never seen are left out of the mean).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from omniseg.evaluation.semantic import check_classes
from omniseg.evaluation.state import SummedState

THRESHOLDS = (0.0005, 0.001875, 0.00375, 0.005)


def boundary_map(mask: torch.Tensor) -> torch.Tensor:
    """1-px boundary of a binary mask `[..., H, W]` (DAVIS `seg2bmap`, see the module docstring)."""
    mask = mask.bool()
    edge = torch.zeros_like(mask)
    edge[..., :, :-1] |= mask[..., :, :-1] != mask[..., :, 1:]
    edge[..., :-1, :] |= mask[..., :-1, :] != mask[..., 1:, :]
    edge[..., :-1, :-1] |= mask[..., :-1, :-1] != mask[..., 1:, 1:]
    return edge


def threshold_to_radius(threshold: float, height: int, width: int) -> int:
    """Tolerance in pixels for a threshold relative to the image diagonal (GSCNN: ceil(th * diag))."""
    return int(math.ceil(float(threshold) * math.sqrt(int(height) ** 2 + int(width) ** 2)))


def _edge_points(labels: torch.Tensor, none: int) -> torch.Tensor:
    """Sorted codes `class * H * W + y * W + x` of every class's `boundary_map`, straight from a label map.

    Pixel p is on the boundary of class c iff p and one of its right / bottom / bottom-right
    neighbours q differ in label and c is one of the two labels, so each differing pair yields
    two points; this avoids building K dense masks. Label `none` (ignored / unscored) is dropped.
    """
    height, width = labels.shape
    area = height * width
    position = torch.arange(area, device=labels.device).reshape(height, width)
    codes = []
    for here, there in (
        ((slice(None), slice(None, -1)), (slice(None), slice(1, None))),
        ((slice(None, -1), slice(None)), (slice(1, None), slice(None))),
        ((slice(None, -1), slice(None, -1)), (slice(1, None), slice(1, None))),
    ):
        a, b = labels[here], labels[there]
        differ = a != b
        where = position[here][differ]
        codes += [a[differ] * area + where, b[differ] * area + where]
    codes = torch.cat(codes)
    return torch.unique(codes[codes < none * area])


def _disk_offsets(radius: int) -> list[tuple[int, int, int]]:
    """(dy^2 + dx^2, dy, dx) of the digital disk of `radius` (skimage `disk`), nearest first."""
    return sorted((dy * dy + dx * dx, dy, dx) for dy in range(-radius, radius + 1)
                  for dx in range(-radius, radius + 1) if dy * dy + dx * dx <= radius * radius)


def _nearest_sq_distance(query: torch.Tensor, target: torch.Tensor, num_classes: int, height: int, width: int,
                         radius: int) -> torch.Tensor:
    """Squared distance from each query point to the nearest target point of its class, or
    `radius^2 + 1` if none lies within the disk.

    Scans the disk offsets nearest first and drops points as soon as they are matched, so the cost
    follows the number of boundary pixels (sparse) times the offsets they actually need.
    """
    far = radius * radius + 1
    best = torch.full((query.numel(),), far, dtype=torch.int64, device=query.device)
    if query.numel() == 0 or target.numel() == 0:
        return best
    area = height * width
    pad_h, pad_w = height + 2 * radius, width + 2 * radius
    # One padded grid per class that has target points; other classes share an empty one.
    classes = torch.unique(target // area)
    slot = torch.full((num_classes,), len(classes), dtype=torch.int64, device=query.device)
    slot[classes] = torch.arange(len(classes), device=query.device)

    def padded(codes: torch.Tensor) -> torch.Tensor:
        pos = codes % area
        return slot[codes // area] * (pad_h * pad_w) + (pos // width + radius) * pad_w + pos % width + radius

    grid = torch.zeros((len(classes) + 1) * pad_h * pad_w, dtype=torch.bool, device=query.device)
    grid[padded(target)] = True
    remaining = torch.arange(query.numel(), device=query.device)
    base = padded(query)
    for d2, dy, dx in _disk_offsets(radius):
        hit = grid[base + (dy * pad_w + dx)]
        best[remaining[hit]] = d2
        miss = ~hit
        remaining, base = remaining[miss], base[miss]
        if remaining.numel() == 0:
            break
    return best


def _precision_recall_f(n_pred, n_gt, matched_pred, matched_gt):
    """Per-element P, R, F (float64) with the DAVIS / GSCNN rules for empty boundaries."""
    n_pred, n_gt = n_pred.double(), n_gt.double()
    precision = torch.where(n_pred > 0, matched_pred.double() / n_pred.clamp(min=1), 1.0)
    # With no ground-truth boundary nothing can match, so a non-empty prediction gets P = 0, R = 1.
    recall = torch.where(n_gt > 0, matched_gt.double() / n_gt.clamp(min=1), 1.0)
    total = precision + recall
    f = torch.where(total > 0, 2 * precision * recall / total.clamp(min=1e-300), 0.0)
    return precision, recall, f


def _scores(pred: torch.Tensor, gt: torch.Tensor, num_classes: int, radii: Sequence[int]):
    """Per class boundary (P, R, F) for each radius, plus which classes have any boundary.

    `pred` / `gt` are `[H, W]` label maps in 0..K where K marks pixels that belong to no class.
    """
    height, width = gt.shape
    area = height * width
    pred_points = _edge_points(pred, num_classes)
    gt_points = _edge_points(gt, num_classes)
    pred_cls, gt_cls = pred_points // area, gt_points // area
    n_pred = torch.bincount(pred_cls, minlength=num_classes)
    n_gt = torch.bincount(gt_cls, minlength=num_classes)
    reach = max(radii)
    pred_dist = _nearest_sq_distance(pred_points, gt_points, num_classes, height, width, reach)
    gt_dist = _nearest_sq_distance(gt_points, pred_points, num_classes, height, width, reach)
    scores = []
    for radius in radii:
        matched_pred = torch.bincount(pred_cls, weights=(pred_dist <= radius * radius).double(), minlength=num_classes)
        matched_gt = torch.bincount(gt_cls, weights=(gt_dist <= radius * radius).double(), minlength=num_classes)
        scores.append(_precision_recall_f(n_pred, n_gt, matched_pred, matched_gt))
    return scores, (n_pred + n_gt) > 0


@torch.no_grad()
def boundary_f_score(pred_mask: torch.Tensor, gt_mask: torch.Tensor, radius: int,
                     ignore: torch.Tensor | None = None) -> tuple[float, float, float]:
    """(precision, recall, F) of the boundaries of one binary prediction / ground-truth pair `[H, W]`.

    `radius` is the match tolerance in pixels; `ignore` (bool `[H, W]`) marks pixels cleared in both
    masks before the boundaries are taken, as GSCNN does with the ignore label.
    """
    if pred_mask.shape != gt_mask.shape or pred_mask.dim() != 2:
        raise ValueError(f"expected two [H, W] masks, got {tuple(pred_mask.shape)} and {tuple(gt_mask.shape)}")
    if int(radius) < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    keep = torch.ones_like(gt_mask, dtype=torch.bool) if ignore is None else ~ignore.bool().to(gt_mask.device)
    # Label 0 = the mask, 1 = everything else (which is not scored).
    pred = torch.where(pred_mask.bool().to(gt_mask.device) & keep, 0, 1)
    gt = torch.where(gt_mask.bool() & keep, 0, 1)
    (scores,), _ = _scores(pred, gt, 1, [int(radius)])
    return tuple(float(v[0]) for v in scores)


class BoundaryFScoreEvaluator(SummedState):
    """Dataset-level boundary F-score per class at several tolerances (GSCNN definition).

    Tolerances are relative `thresholds` (radius from each image's diagonal, keys "BF@0.00375") or,
    if `radii_px` is given, fixed radii in pixels (keys "BF@3px"). State is a few count tensors,
    summed across workers and DDP ranks like SemanticEvaluator's confusion matrix.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, thresholds: Sequence[float] = THRESHOLDS,
                 radii_px: Sequence[int] | None = None, class_names: Sequence[str] | None = None,
                 skip_absent: bool = False):
        self.num_classes, self.ignore_index, self.class_names = check_classes(num_classes, ignore_index, class_names)
        self.skip_absent = bool(skip_absent)
        if radii_px is not None:
            self.radii_px = [int(r) for r in radii_px]
            if not self.radii_px or any(r < 0 or r != float(q) for r, q in zip(self.radii_px, radii_px)):
                raise ValueError(f"radii_px must be non-negative integers, got {list(radii_px)}")
            self.thresholds = None
            self.keys = [f"BF@{r}px" for r in self.radii_px]
        else:
            self.thresholds = [float(t) for t in thresholds]
            if not self.thresholds or any(not 0 < t < 1 for t in self.thresholds):
                raise ValueError(f"thresholds are fractions of the image diagonal in (0, 1) (use radii_px "
                                 f"for pixels), got {list(thresholds)}")
            self.radii_px = None
            self.keys = [f"BF@{t:g}" for t in self.thresholds]
        self.reset()

    def reset(self) -> None:
        n = len(self.keys)
        # F summed over the images where the class has a boundary in the ground truth or the
        # prediction; every other image contributes exactly F = 1 and is only counted.
        self.f_sum = torch.zeros(n, self.num_classes, dtype=torch.float64)
        self.present = torch.zeros(self.num_classes, dtype=torch.int64)
        self.images = torch.zeros(1, dtype=torch.int64)

    def radii(self, height: int, width: int) -> list[int]:
        """Match radius in pixels of each tolerance for an image of this size."""
        if self.radii_px is not None:
            return list(self.radii_px)
        return [threshold_to_radius(t, height, width) for t in self.thresholds]

    @torch.no_grad()
    def process(self, gt: torch.Tensor, pred: torch.Tensor) -> None:
        """Add one image. `gt`/`pred`: int64 [H,W] contiguous ids; gt == ignore_index is cleared.

        Predicted labels outside 0..K-1 belong to no class mask (a missed boundary for the class).
        """
        if gt.shape != pred.shape or gt.dim() != 2:
            raise ValueError(f"ground truth {tuple(gt.shape)} and prediction {tuple(pred.shape)} must be equal [H, W]")
        k = self.num_classes
        gt = gt.long()
        pred = pred.long().to(gt.device)
        ignored = gt == self.ignore_index
        bad = ~ignored & ((gt < 0) | (gt >= k))
        if bool(bad.any()):
            raise ValueError(f"ground-truth label {int(gt[bad][0])} is outside 0..{k - 1} and is not ignore_index")
        gt = torch.where(ignored, k, gt)
        pred = torch.where(ignored | (pred < 0) | (pred >= k), k, pred)
        scores, has_edge = _scores(pred, gt, k, self.radii(*gt.shape))
        f = torch.stack([score[2] for score in scores]).cpu()
        has_edge = has_edge.cpu()
        self.f_sum += torch.where(has_edge, f, 0.0)
        self.present += has_edge.long()
        self.images += 1

    # --- state for merging / DDP -------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        return {"f_sum": self.f_sum.clone(), "present": self.present.clone(), "images": self.images.clone()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.f_sum = state["f_sum"].clone().double().cpu()
        self.present = state["present"].clone().long().cpu()
        self.images = state["images"].clone().long().cpu().reshape(1)

    # --- metrics -------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """{"BF@<tol>": mean F over classes (%), ..., "BF_per_class": {"BF@<tol>": {class: F %}}}.

        Everything processed on every rank is included; all ranks must call it under DDP.
        """
        state = self.synced_state()
        return self.metrics_from_state(state["f_sum"], state["present"], state["images"])

    def metrics_from_state(self, f_sum: torch.Tensor, present: torch.Tensor, images: torch.Tensor) -> dict:
        f_sum, present = f_sum.double().cpu(), present.double().cpu()
        images = float(images.reshape(-1)[0])
        if self.skip_absent:
            count, total = present, f_sum
        else:
            count = torch.full_like(present, images)
            total = f_sum + (images - present)  # images without a boundary of the class score 1
        per_class = torch.where(count > 0, total / count.clamp(min=1), math.nan)
        valid = count > 0
        results: dict = {}
        for key, values in zip(self.keys, per_class):
            results[key] = float(values[valid].mean()) * 100 if bool(valid.any()) else math.nan
        results["BF_per_class"] = {
            key: {name: float(v) * 100 for name, v in zip(self.class_names, values)}
            for key, values in zip(self.keys, per_class)
        }
        return results
