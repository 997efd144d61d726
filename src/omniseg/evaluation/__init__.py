"""Metrics with the reference definitions: mIoU (confusion matrix), PQ (panopticapi), mask AP (COCOeval)."""

from omniseg.evaluation.evaluator import DatasetEvaluator
from omniseg.evaluation.instance import InstanceEvaluator, encode_masks, to_coco_results
from omniseg.evaluation.panoptic import PanopticEvaluator
from omniseg.evaluation.semantic import SemanticEvaluator

__all__ = [
    "DatasetEvaluator",
    "InstanceEvaluator",
    "PanopticEvaluator",
    "SemanticEvaluator",
    "encode_masks",
    "to_coco_results",
]
