"""Mask AP with the reference implementation: pycocotools RLE + COCOeval(iouType="segm")."""

from __future__ import annotations

import contextlib
import io
import math
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from omniseg.data.meta import DatasetMeta
from omniseg.evaluation.state import distributed_ready
from omniseg.masks import CroppedMasks

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def encode_masks(masks: torch.Tensor) -> list[dict]:
    """bool [N,H,W] (or CroppedMasks) -> COCO RLEs with `counts` as str (JSON-ready)."""
    if isinstance(masks, CroppedMasks):
        return masks.rles()
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N,H,W], got shape {tuple(masks.shape)}")
    if masks.shape[0] == 0:
        return []
    array = np.asfortranarray(masks.detach().to("cpu", torch.uint8).permute(1, 2, 0).numpy())
    rles = mask_utils.encode(array)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def to_coco_results(image_id: Any, pred: dict, meta: DatasetMeta) -> list[dict]:
    """Instance predictions of one image -> COCO "segm" result records (dataset category ids).

    `pred`: {"masks": bool [N,H,W], "labels": int64 [N] contiguous, "scores": float [N]}.
    The box is the mask's tight box (XYWH), as COCO derives it from the segmentation.
    """
    masks, labels, scores = pred["masks"], pred["labels"], pred["scores"]
    if not (len(masks) == len(labels) == len(scores)):
        raise ValueError(f"{len(masks)} masks, {len(labels)} labels and {len(scores)} scores: counts must agree")
    rles = encode_masks(masks.bool())
    if not rles:
        return []
    boxes = mask_utils.toBbox(rles).tolist()
    labels, scores = labels.tolist(), scores.tolist()
    return [
        {
            "image_id": image_id,
            "category_id": meta.to_dataset_id(label),
            "segmentation": rle,
            "score": float(score),
            "bbox": [float(v) for v in box],
        }
        for rle, label, score, box in zip(rles, labels, scores, boxes)
    ]


def _ground_truth_records(gt: dict, meta: DatasetMeta) -> list[dict]:
    masks = gt["masks"].bool()
    labels = gt["labels"].tolist()
    iscrowd = gt.get("iscrowd")
    iscrowd = [False] * len(labels) if iscrowd is None else [bool(v) for v in iscrowd.tolist()]
    rles = encode_masks(masks)
    if not rles:
        return []
    areas = mask_utils.area(rles).tolist()
    boxes = mask_utils.toBbox(rles).tolist()
    return [
        {
            "category_id": meta.to_dataset_id(label),
            "segmentation": rle,
            "area": float(area),
            "bbox": [float(v) for v in box],
            "iscrowd": int(crowd),
        }
        for rle, label, crowd, area, box in zip(rles, labels, iscrowd, areas, boxes)
    ]


class InstanceEvaluator:
    """Collects RLE-encoded ground truth and predictions per image, then runs COCOeval on them.

    Images are keyed by `image_id`; an image seen twice (e.g. a distributed sampler padding the
    last batch) is counted once. Category ids given to COCO are the dataset's own ids.
    """

    def __init__(self, meta: DatasetMeta, verbose: bool = False, bbox: bool = False):
        self.meta = meta
        self.verbose = verbose
        self.bbox = bbox  # also box AP (bbox_AP, ...); results with boxes only get box AP alone
        self.reset()

    def reset(self) -> None:
        self.records: dict[Any, dict] = {}

    def process(self, image_id: Any, height: int, width: int, gt: dict, pred: dict | list[dict]) -> None:
        """Add one image. gt: {"masks","labels","iscrowd"}; pred: {"masks","labels","scores"}, or the image's
        COCO result records ({"category_id" (dataset id), "score", "segmentation" RLE and/or "bbox"}), as
        saved prediction files hold them."""
        checked = (("ground-truth", gt["masks"]),) + (() if isinstance(pred, list) else (("predicted", pred["masks"]),))
        for name, masks in checked:
            if masks.ndim != 3 or (masks.shape[0] > 0 and tuple(masks.shape[1:]) != (height, width)):
                raise ValueError(f"image {image_id}: {name} masks {tuple(masks.shape)} are not [N,{height},{width}]")
        if image_id in self.records:
            return
        self.records[image_id] = {
            "height": int(height),
            "width": int(width),
            "gt": _ground_truth_records(gt, self.meta),
            "dt": [{**d, "image_id": image_id} for d in pred] if isinstance(pred, list)
            else to_coco_results(image_id, pred, self.meta),
        }

    # --- state for merging / DDP -------------------------------------------------------------
    def state(self) -> dict:
        return dict(self.records)

    def load_state(self, state: dict) -> None:
        self.records = dict(state)

    def merge(self, other: "InstanceEvaluator") -> None:
        for image_id, record in other.records.items():
            self.records.setdefault(image_id, record)

    def synced_state(self) -> dict:
        """Records gathered from every DDP rank (a copy; a no-op without torch.distributed)."""
        if not distributed_ready():
            return dict(self.records)
        gathered: list[dict | None] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, self.records)
        merged: dict = {}
        for part in gathered:
            for image_id, record in (part or {}).items():
                merged.setdefault(image_id, record)
        return merged

    # --- metrics -------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """AP, AP50, AP75, APs, APm, APl (percent) and per-class AP. All ranks must call it under DDP."""
        return self.metrics_from_state(self.synced_state())

    def metrics_from_state(self, records: dict) -> dict:
        nan_result = {key: math.nan for key in AP_KEYS}
        nan_result["per_class"] = {name: math.nan for name in self.meta.classes}
        if not records:
            return nan_result
        images, gt_annotations, detections = [], [], []
        for index, (image_id, record) in enumerate(records.items(), start=1):
            images.append({"id": index, "height": record["height"], "width": record["width"]})
            for ann in record["gt"]:
                gt_annotations.append({**ann, "image_id": index, "id": len(gt_annotations) + 1})
            for det in record["dt"]:
                detections.append({**det, "image_id": index})
        if not gt_annotations:
            return nan_result  # AP is undefined without ground truth
        categories = [{"id": self.meta.to_dataset_id(i), "name": n} for i, n in enumerate(self.meta.classes)]
        # Mask AP needs every result to carry a mask; box-only results get box AP alone (pycocotools would
        # otherwise score their boxes as polygons under "segm").
        masks = all("segmentation" in d for d in detections)
        results = dict(nan_result)
        if masks:
            results = self._coco_eval("segm", images, gt_annotations, detections, categories)
        if self.bbox or not masks:
            boxes = self._coco_eval("bbox", images, gt_annotations, detections, categories)
            results.update({f"bbox_{k}": v for k, v in boxes.items()})
        return results

    def _coco_eval(self, iou_type: str, images, gt_annotations, detections, categories) -> dict:
        quiet = contextlib.nullcontext() if self.verbose else contextlib.redirect_stdout(io.StringIO())
        with quiet:
            coco_gt = COCO()
            coco_gt.dataset = {"images": images, "annotations": [dict(a) for a in gt_annotations],
                               "categories": categories}
            coco_gt.createIndex()
            if detections:
                coco_dt = coco_gt.loadRes([dict(d) for d in detections])  # (loadRes writes into the records)
            else:
                # loadRes cannot take an empty list; an empty result set scores AP 0 wherever GT exists.
                coco_dt = COCO()
                coco_dt.dataset = {"images": images, "annotations": [], "categories": categories}
                coco_dt.createIndex()
            coco_eval = COCOeval(coco_gt, coco_dt, iouType=iou_type)
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()

        results = {
            key: float(value) * 100 if value >= 0 else math.nan for key, value in zip(AP_KEYS, coco_eval.stats[:6])
        }
        # precision: [iou thresholds, recall points, categories, area ranges, max dets]; -1 = no GT.
        precision = coco_eval.eval["precision"]
        per_class = {}
        for k, category_id in enumerate(coco_eval.params.catIds):
            values = precision[:, :, k, 0, -1]
            values = values[values > -1]
            name = self.meta.classes[self.meta.to_contiguous(category_id)]
            per_class[name] = float(values.mean()) * 100 if values.size else math.nan
        results["per_class"] = per_class
        return results
