"""The evaluation loop: a model over a dataset, scored at the original resolution (PQ / mIoU / AP)."""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig

from omniseg.data.loader import collate
from omniseg.data.training import gt_tasks
from omniseg.data.transforms import build_transforms
from omniseg.engine.distributed import unwrap


@torch.no_grad()
def evaluate(model, dataset, cfg: DictConfig, meta, *, tasks=None, device=None, max_images: int | None = None,
             batch_size: int = 1, progress: bool = True, rank: int = 0, world_size: int = 1,
             bbox: bool = False) -> dict:
    """Run the model over a dataset and score it (PQ / mIoU / AP) at the original resolution.

    `tasks` default to cfg.eval_tasks; of those, the tasks the dataset has no ground truth for are not
    scored (a semantic folder has no panoptic ground truth), and a task the model does not predict is
    refused by `predict`. Under DDP pass `rank`/`world_size`: each rank scores images rank,
    rank + world_size, ... and every rank must call this (the evaluators gather across ranks); all ranks
    get the global result. `bbox` adds box AP (bbox_AP, ...) to the instance results. `cfg.inference`
    chooses sliding windows and multi-scale + flip (semantic only; omniseg/test_time.py).
    """
    from tqdm.auto import tqdm

    from omniseg.evaluation.evaluator import DatasetEvaluator
    from omniseg.test_time import InferenceMode, predict_semantic

    segmenter = unwrap(model)
    tasks = list(tasks or cfg.eval_tasks)
    if len(dataset):
        available = gt_tasks(dataset[0])
        tasks = [t for t in tasks if t in available]
    device = device or next(model.parameters()).device
    mode = InferenceMode.from_settings(cfg.get("inference"))
    mode.check_tasks(tasks)
    # slide / augmented views are resized from the original image by predict_semantic
    transforms = (build_transforms(False, min_size_test=cfg.data.min_size_test, max_size_test=cfg.data.max_size_test)
                  if mode.plain else build_transforms(False))
    evaluator = DatasetEvaluator(meta, tasks, boundary_f=cfg.eval_boundary_f, seen_classes=segmenter.seen_classes,
                                 bbox=bbox)
    was_training = model.training
    model.eval()
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    shard = list(range(rank, n, world_size))
    for start in tqdm(range(0, len(shard), batch_size), desc="eval", disable=not progress, mininterval=1.0):
        samples = [transforms(dataset[i]) for i in shard[start:start + batch_size]]
        if mode.plain:
            batch = collate(samples, size_divisibility=cfg.data.size_divisibility)
            preds = segmenter.predict(batch.images.to(device), batch.image_sizes,
                                      [(s["height"], s["width"]) for s in samples], tasks=tasks)
        else:
            preds = [predict_semantic(segmenter, s["image"], mode, min_size_test=cfg.data.min_size_test,
                                      max_size_test=cfg.data.max_size_test,
                                      size_divisibility=cfg.data.size_divisibility, device=device)
                     for s in samples]
        for s, p in zip(samples, preds):
            evaluator.process(s, p)
    model.train(was_training)
    return evaluator.evaluate()


def flat_metrics(results: dict) -> dict:
    """{"panoptic": {"PQ": ..}, ...} -> {"PQ": .., "mIoU": .., "AP": ..} (headline numbers)."""
    out = {}
    for task in ("panoptic", "semantic", "instance"):
        for k, v in (results.get(task) or {}).items():
            if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
                out[k] = float(v)
    return out
