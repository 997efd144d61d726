"""One object that scores a dataset for any mix of semantic, panoptic and instance tasks."""

from __future__ import annotations

import math
from collections.abc import Iterable

from omniseg.data.errors import DataError
from omniseg.data.meta import DatasetMeta
from omniseg.evaluation.boundary import BoundaryFScoreEvaluator
from omniseg.evaluation.instance import AP_KEYS, InstanceEvaluator
from omniseg.evaluation.panoptic import PanopticEvaluator
from omniseg.evaluation.semantic import SemanticEvaluator
from omniseg.tasks import TASKS

# Headline numbers, in the order `summary()` prints them.
HEADLINE = (("panoptic", "PQ"), ("semantic", "mIoU"), ("instance", "AP"))
SCALAR_KEYS = {
    "semantic": ("mIoU", "fwIoU", "mAcc", "pAcc"),
    "panoptic": ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st"),
    "instance": AP_KEYS,
}


def _file_of(sample: dict) -> str | None:
    return sample.get("file_name") or (str(sample["image_id"]) if "image_id" in sample else None)


class DatasetEvaluator:
    """Feeds raw samples (ground truth at original size) and predictions to the per-task evaluators.

    Ground truth is taken from whatever the sample carries: `sem_seg`, or derived from `pan_seg`
    for semantic; `instances`, or derived from `pan_seg` for instance; `pan_seg` for panoptic.
    Under DDP every rank calls `process` on its shard and then `evaluate()`; results are global.
    With `boundary_f`, semantic results also carry the Gated-SCNN boundary F-score ("BF@<th>",
    see `omniseg.evaluation.boundary`); it is off by default because it costs more than mIoU.
    With `seen_classes` S (a class-incremental model that has learnt classes 0..S-1 so far), semantic
    ground truth of classes >= S is ignored, the usual continual-segmentation protocol; those classes
    then have no IoU and stay out of mIoU.
    """

    def __init__(self, meta: DatasetMeta, tasks: Iterable[str], boundary_f: bool = False,
                 seen_classes: int | None = None, bbox: bool = False):
        tasks = list(dict.fromkeys(tasks))
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or not tasks:
            raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {tasks}")
        self.meta = meta
        self.tasks = tasks
        self.evaluators: dict[str, object] = {}
        if "semantic" in tasks:
            self.evaluators["semantic"] = SemanticEvaluator(meta.num_classes, meta.ignore_index, meta.classes)
        if "panoptic" in tasks:
            self.evaluators["panoptic"] = PanopticEvaluator(meta)
        if "instance" in tasks:
            self.evaluators["instance"] = InstanceEvaluator(meta, bbox=bbox)
        self.boundary: BoundaryFScoreEvaluator | None = None
        if boundary_f and "semantic" in tasks:
            self.boundary = BoundaryFScoreEvaluator(meta.num_classes, meta.ignore_index, class_names=meta.classes)
        self.seen_classes = None if seen_classes is None or seen_classes >= meta.num_classes else int(seen_classes)
        self.results: dict | None = None

    def reset(self) -> None:
        for evaluator in self.evaluators.values():
            evaluator.reset()
        if self.boundary is not None:
            self.boundary.reset()
        self.results = None

    # --- ground truth --------------------------------------------------------------------------
    def _semantic_gt(self, sample: dict):
        if sample.get("sem_seg") is not None:
            gt = sample["sem_seg"]
        elif sample.get("pan_seg") is not None:
            from omniseg.data.targets import semantic_from_panoptic

            gt = semantic_from_panoptic(sample["pan_seg"], sample["segments_info"], self.meta.ignore_index)
        else:
            raise DataError(_file_of(sample), "semantic evaluation needs 'sem_seg' or 'pan_seg' ground truth")
        if self.seen_classes is not None:
            gt = gt.masked_fill((gt >= self.seen_classes) & (gt != self.meta.ignore_index), self.meta.ignore_index)
        return gt

    def _instance_gt(self, sample: dict) -> dict:
        if sample.get("instances") is not None:
            return sample["instances"]
        if sample.get("pan_seg") is not None:
            from omniseg.data.targets import instances_from_panoptic

            return instances_from_panoptic(sample["pan_seg"], sample["segments_info"])
        raise DataError(_file_of(sample), "instance evaluation needs 'instances' or 'pan_seg' ground truth")

    # --- loop ----------------------------------------------------------------------------------
    def process(self, sample: dict, prediction: dict) -> None:
        """Score one image. `prediction` holds "semantic", "panoptic" and/or "instances" per the design."""
        file = _file_of(sample)
        for task in self.tasks:
            key = "instances" if task == "instance" else task
            if prediction.get(key) is None:
                raise KeyError(f"{file}: the prediction has no '{key}' output, needed for {task} evaluation")
        if "semantic" in self.evaluators:
            gt = self._semantic_gt(sample)
            self._check_size(file, gt.shape[-2:], prediction["semantic"].shape[-2:], "semantic")
            self.evaluators["semantic"].process(gt, prediction["semantic"])
            if self.boundary is not None:
                self.boundary.process(gt, prediction["semantic"])
        if "panoptic" in self.evaluators:
            if sample.get("pan_seg") is None:
                raise DataError(file, "panoptic evaluation needs 'pan_seg' and 'segments_info' ground truth")
            pred = prediction["panoptic"]
            self._check_size(file, sample["pan_seg"].shape[-2:], pred["segment_map"].shape[-2:], "panoptic")
            self.evaluators["panoptic"].process(
                sample["pan_seg"], sample["segments_info"], pred["segment_map"], pred["segments_info"]
            )
        if "instance" in self.evaluators:
            gt = self._instance_gt(sample)
            height, width = int(sample["height"]), int(sample["width"])
            image_id = sample.get("image_id", file)
            self.evaluators["instance"].process(image_id, height, width, gt, prediction["instances"])

    @staticmethod
    def _check_size(file, gt_size, pred_size, task: str) -> None:
        if tuple(gt_size) != tuple(pred_size):
            raise ValueError(
                f"{file}: {task} prediction is {tuple(pred_size)} but ground truth is {tuple(gt_size)}; "
                "predictions must be at the original resolution"
            )

    def evaluate(self) -> dict:
        """{"semantic": {...}, "panoptic": {...}, "instance": {...}} for the requested tasks."""
        self.results = {task: evaluator.evaluate() for task, evaluator in self.evaluators.items()}
        if self.boundary is not None:
            self.results["semantic"].update(self.boundary.evaluate())
        return self.results

    # --- reporting -----------------------------------------------------------------------------
    def scalars(self, results: dict | None = None) -> dict[str, float]:
        """Flat headline metrics (no per-class tables), e.g. for metrics.jsonl / TensorBoard."""
        results = self._results(results)
        return {key: results[task][key] for task in self.tasks for key in self._scalar_keys(task) if task in results}

    def summary(self, results: dict | None = None) -> str:
        """One line such as "PQ 51.2 | mIoU 63.0 | AP 30.1"."""
        results = self._results(results)
        parts = []
        for task, key in HEADLINE:
            if task in results:
                for name in (key, *self._boundary_keys()) if task == "semantic" else (key,):
                    value = results[task][name]
                    parts.append(f"{name} {'n/a' if value is None or math.isnan(value) else f'{value:.1f}'}")
        return " | ".join(parts)

    def _boundary_keys(self) -> tuple[str, ...]:
        return tuple(self.boundary.keys) if self.boundary is not None else ()

    def _scalar_keys(self, task: str) -> tuple[str, ...]:
        return SCALAR_KEYS[task] + (self._boundary_keys() if task == "semantic" else ())

    def _results(self, results: dict | None) -> dict:
        if results is not None:
            return results
        if self.results is None:
            self.evaluate()
        return self.results
