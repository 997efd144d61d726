"""Semantic segmentation metrics from one dataset-level confusion matrix (mIoU, fwIoU, mAcc, pAcc)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from omniseg.evaluation.state import SummedState



def check_classes(num_classes: int, ignore_index: int, class_names: Sequence[str] | None) -> tuple[int, int, list[str]]:
    """(K, ignore index, K class names) for a per-class evaluator; ValueError on an inconsistent set."""
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    return int(num_classes), int(ignore_index), names

class SemanticEvaluator(SummedState):
    """Accumulates a `[K, K]` confusion matrix (rows = ground truth, columns = prediction).

    Definitions follow detectron2's SemSegEvaluator (percentages; pixels whose ground truth is
    `ignore_index` are skipped), with one choice made explicit: a class is left out of mIoU (its IoU
    is NaN) only when it is absent from *both* ground truth and prediction, so predicting a class
    that never occurs is penalised (mmseg / torchmetrics convention). mAcc averages over classes
    present in the ground truth, fwIoU weights IoU by ground-truth frequency.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, class_names: Sequence[str] | None = None):
        self.num_classes, self.ignore_index, self.class_names = check_classes(num_classes, ignore_index, class_names)
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        # Ground-truth pixels predicted as a label outside 0..K-1: wrong, but credited to no class.
        self.missed = torch.zeros(self.num_classes, dtype=torch.int64)

    @torch.no_grad()
    def process(self, gt: torch.Tensor, pred: torch.Tensor) -> None:
        """Add one image. `gt`/`pred`: int64 [H,W] contiguous ids; gt == ignore_index is skipped.

        Predicted labels outside 0..K-1 (e.g. an ignore label left in a prediction) count as wrong
        for the ground-truth class but are not credited to any class.
        """
        if gt.shape != pred.shape:
            raise ValueError(f"ground truth {tuple(gt.shape)} and prediction {tuple(pred.shape)} differ in shape")
        k = self.num_classes
        gt = gt.reshape(-1).long()
        pred = pred.reshape(-1).long().to(gt.device)
        ignored = gt == self.ignore_index
        bad = ~ignored & ((gt < 0) | (gt >= k))
        if bool(bad.any()):
            raise ValueError(f"ground-truth label {int(gt[bad][0])} is outside 0..{k - 1} and is not ignore_index")
        # Column k collects out-of-range predictions; one final bin collects ignored pixels.
        # (Index arithmetic instead of boolean masking keeps this a single pass over the pixels.)
        pred = torch.where((pred >= 0) & (pred < k), pred, k)
        index = torch.where(ignored, k * (k + 1), gt * (k + 1) + pred)
        counts = torch.bincount(index, minlength=k * (k + 1) + 1)[:-1].reshape(k, k + 1)
        if self.confusion.device != counts.device:
            self.confusion = self.confusion.to(counts.device)
            self.missed = self.missed.to(counts.device)
        self.confusion += counts[:, :k]
        self.missed += counts[:, k]

    # --- state for merging / DDP -------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        return {"confusion": self.confusion.clone(), "missed": self.missed.clone()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.confusion = state["confusion"].clone().long()
        missed = state.get("missed")
        self.missed = (
            torch.zeros(self.num_classes, dtype=torch.int64, device=self.confusion.device)
            if missed is None
            else missed.clone().long().to(self.confusion.device)
        )

    # --- metrics -------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Metrics over everything processed on every rank. All ranks must call it under DDP."""
        state = self.synced_state()
        return self.metrics_from_state(state["confusion"], state["missed"])

    def metrics_from_state(self, confusion: torch.Tensor, missed: torch.Tensor | None = None) -> dict:
        conf = confusion.double().cpu()
        tp = conf.diagonal()
        pos_gt = conf.sum(dim=1)
        if missed is not None:
            pos_gt = pos_gt + missed.double().cpu()
        pos_pred = conf.sum(dim=0)
        union = pos_gt + pos_pred - tp
        nan = torch.full_like(tp, math.nan)
        iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
        acc = torch.where(pos_gt > 0, tp / pos_gt.clamp(min=1), nan)
        total = pos_gt.sum()
        iou_valid = union > 0
        acc_valid = pos_gt > 0
        weights = pos_gt / total if total > 0 else torch.zeros_like(pos_gt)

        def mean(values: torch.Tensor, valid: torch.Tensor) -> float:
            return float(values[valid].mean()) * 100 if bool(valid.any()) else math.nan

        results = {
            "mIoU": mean(iou, iou_valid),
            "fwIoU": float((iou[iou_valid] * weights[iou_valid]).sum()) * 100 if total > 0 else math.nan,
            "mAcc": mean(acc, acc_valid),
            "pAcc": float(tp.sum() / total) * 100 if total > 0 else math.nan,
            "IoU": {name: float(v) * 100 for name, v in zip(self.class_names, iou)},
            "Acc": {name: float(v) * 100 for name, v in zip(self.class_names, acc)},
        }
        return results
