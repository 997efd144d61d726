"""Panoptic quality (PQ, SQ, RQ) with the COCO panopticapi definition, vectorised with one bincount."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from omniseg.data.meta import DatasetMeta
from omniseg.evaluation.state import SummedState

VOID = 0


def _segment_table(
    ids: torch.Tensor, segments_info: Sequence[dict], device: torch.device, with_crowd: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Category (-1 = not a described segment) and crowd flag for each id in `ids`."""
    by_id = {int(s["id"]): s for s in segments_info}
    categories, crowd = [], []
    for segment_id in ids.tolist():
        info = by_id.get(segment_id) if segment_id != VOID else None
        categories.append(int(info["category"]) if info is not None else -1)
        crowd.append(bool(info.get("iscrowd", False)) if (info is not None and with_crowd) else False)
    return (
        torch.tensor(categories, dtype=torch.int64, device=device),
        torch.tensor(crowd, dtype=torch.bool, device=device),
    )


class PanopticEvaluator(SummedState):
    """Per-category IoU sum, TP, FP and FN accumulated exactly as panopticapi's `pq_compute_single_core`.

    - ground-truth id 0 is VOID; a predicted id 0 is "no segment";
    - a (gt, pred) pair of the same category matches when IoU > 0.5, where the union leaves out the
      part of the prediction lying on VOID; crowd ground truth never matches;
    - unmatched non-crowd ground truth is a FN; an unmatched prediction is a FP unless more than half
      of it lies on VOID plus crowd regions of its own category;
    - categories with TP + FP + FN = 0 are left out of the averages.

    One deliberate generalisation: panopticapi keeps a single crowd region per category and image
    (the COCO format guarantees there is at most one); here all crowd segments of the category count.
    """

    def __init__(self, meta: DatasetMeta):
        self.meta = meta
        self.num_classes = meta.num_classes
        self.reset()

    def reset(self) -> None:
        k = self.num_classes
        self.iou_sum = torch.zeros(k, dtype=torch.float64)
        self.tp = torch.zeros(k, dtype=torch.int64)
        self.fp = torch.zeros(k, dtype=torch.int64)
        self.fn = torch.zeros(k, dtype=torch.int64)

    @torch.no_grad()
    def process(
        self,
        gt_segment_map: torch.Tensor,
        gt_segments_info: Sequence[dict],
        pred_segment_map: torch.Tensor,
        pred_segments_info: Sequence[dict],
    ) -> None:
        """Add one image. Maps are int64 [H,W] segment ids; infos carry "id" and contiguous "category".

        Ground-truth ids absent from `gt_segments_info` are neither segments nor VOID (as in
        panopticapi). A predicted non-zero id absent from `pred_segments_info` is an error.
        """
        if gt_segment_map.shape != pred_segment_map.shape:
            raise ValueError(
                f"ground truth {tuple(gt_segment_map.shape)} and prediction "
                f"{tuple(pred_segment_map.shape)} differ in shape"
            )
        device = gt_segment_map.device
        gt_flat = gt_segment_map.reshape(-1).long()
        pred_flat = pred_segment_map.reshape(-1).long().to(device)
        if gt_flat.numel() == 0:
            return
        if bool(gt_flat.min() < 0) or bool(pred_flat.min() < 0):
            raise ValueError("segment ids must be non-negative")
        # One sort over joint (gt, pred) ids gives every intersection area, as panopticapi's
        # `gt * OFFSET + pred` trick does; the id tables are then tiny.
        offset = int(pred_flat.max()) + 1
        pairs, pair_area = torch.unique(gt_flat * offset + pred_flat, return_counts=True)
        gt_ids, gt_index = torch.unique(pairs // offset, return_inverse=True)
        pred_ids, pred_index = torch.unique(pairs % offset, return_inverse=True)
        described = {int(s["id"]) for s in pred_segments_info}
        unknown = [i for i in pred_ids.tolist() if i != VOID and i not in described]
        if unknown:
            raise ValueError(f"predicted segment ids {unknown[:5]} are in the segment map but not in segments_info")
        for info in list(gt_segments_info) + list(pred_segments_info):
            if not 0 <= int(info["category"]) < self.num_classes:
                raise ValueError(f"segment {info['id']}: category {info['category']} outside 0..{self.num_classes - 1}")

        n_gt, n_pred = len(gt_ids), len(pred_ids)
        # intersection[i, j] = pixels with gt id gt_ids[i] and predicted id pred_ids[j].
        intersection = torch.zeros(n_gt * n_pred, dtype=torch.int64, device=device)
        intersection[gt_index * n_pred + pred_index] = pair_area
        intersection = intersection.reshape(n_gt, n_pred)
        gt_area = intersection.sum(dim=1)
        pred_area = intersection.sum(dim=0)
        gt_cat, gt_crowd = _segment_table(gt_ids, gt_segments_info, device, with_crowd=True)
        pred_cat, _ = _segment_table(pred_ids, pred_segments_info, device, with_crowd=False)
        gt_is_segment = gt_cat >= 0
        pred_is_segment = pred_cat >= 0

        void_rows = gt_ids == VOID
        pred_on_void = intersection[void_rows].sum(dim=0)  # zeros when the image has no VOID

        same_category = (gt_cat[:, None] == pred_cat[None, :]) & pred_is_segment[None, :]
        candidate = same_category & (gt_is_segment & ~gt_crowd)[:, None]
        union = pred_area[None, :] + gt_area[:, None] - intersection - pred_on_void[None, :]
        iou = intersection.double() / union.clamp(min=1).double()
        matched = candidate & (iou > 0.5)

        k = self.num_classes
        match_cat = gt_cat[:, None].expand_as(matched)[matched]
        tp = torch.bincount(match_cat, minlength=k)
        iou_sum = torch.zeros(k, dtype=torch.float64, device=device).index_add_(0, match_cat, iou[matched])

        gt_unmatched = gt_is_segment & ~gt_crowd & ~matched.any(dim=1)
        fn = torch.bincount(gt_cat[gt_unmatched], minlength=k)

        crowd_same_category = same_category & gt_crowd[:, None]
        ignorable = pred_on_void + (intersection * crowd_same_category).sum(dim=0)
        pred_unmatched = pred_is_segment & ~matched.any(dim=0) & (pred_area > 0)
        is_fp = pred_unmatched & ~(ignorable.double() / pred_area.clamp(min=1).double() > 0.5)
        fp = torch.bincount(pred_cat[is_fp], minlength=k)

        self._accumulate(iou_sum, tp, fp, fn)

    def _accumulate(self, iou_sum, tp, fp, fn) -> None:
        device = iou_sum.device
        if self.tp.device != device:
            self.load_state({key: value.to(device) for key, value in self.state().items()})
        self.iou_sum += iou_sum
        self.tp += tp
        self.fp += fp
        self.fn += fn

    # --- state for merging / DDP -------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        return {"iou_sum": self.iou_sum.clone(), "tp": self.tp.clone(), "fp": self.fp.clone(), "fn": self.fn.clone()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.iou_sum = state["iou_sum"].clone().double()
        self.tp, self.fp, self.fn = (state[key].clone().long() for key in ("tp", "fp", "fn"))

    # --- metrics -------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """PQ/SQ/RQ (percent) for All, Things, Stuff, plus per-class values. All ranks must call it."""
        state = self.synced_state()
        return self.metrics_from_state(state)

    def metrics_from_state(self, state: dict[str, torch.Tensor]) -> dict:
        iou_sum = state["iou_sum"].double().cpu()
        tp, fp, fn = (state[key].double().cpu() for key in ("tp", "fp", "fn"))
        denominator = tp + 0.5 * fp + 0.5 * fn
        counted = (tp + fp + fn) > 0
        pq = torch.where(denominator > 0, iou_sum / denominator.clamp(min=1e-12), torch.zeros_like(tp))
        sq = torch.where(tp > 0, iou_sum / tp.clamp(min=1), torch.zeros_like(tp))
        rq = torch.where(denominator > 0, tp / denominator.clamp(min=1e-12), torch.zeros_like(tp))
        isthing = torch.tensor(self.meta.isthing, dtype=torch.bool)

        def average(selection: torch.Tensor) -> dict:
            keep = counted & selection
            n = int(keep.sum())
            if n == 0:
                return {"PQ": math.nan, "SQ": math.nan, "RQ": math.nan, "n": 0}
            return {
                "PQ": float(pq[keep].mean()) * 100,
                "SQ": float(sq[keep].mean()) * 100,
                "RQ": float(rq[keep].mean()) * 100,
                "n": n,
            }

        overall = average(torch.ones_like(isthing))
        things = average(isthing)
        stuff = average(~isthing)
        results = {
            "PQ": overall["PQ"],
            "SQ": overall["SQ"],
            "RQ": overall["RQ"],
            "PQ_th": things["PQ"],
            "SQ_th": things["SQ"],
            "RQ_th": things["RQ"],
            "PQ_st": stuff["PQ"],
            "SQ_st": stuff["SQ"],
            "RQ_st": stuff["RQ"],
            "All": overall,
            "Things": things,
            "Stuff": stuff,
            "per_class": {
                name: {
                    "PQ": float(pq[i]) * 100 if counted[i] else math.nan,
                    "SQ": float(sq[i]) * 100 if counted[i] else math.nan,
                    "RQ": float(rq[i]) * 100 if counted[i] else math.nan,
                    "TP": int(tp[i]),
                    "FP": int(fp[i]),
                    "FN": int(fn[i]),
                }
                for i, name in enumerate(self.meta.classes)
            },
        }
        return results
