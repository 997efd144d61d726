"""Mask-classification targets ({labels, masks}) derived from whichever annotation a sample carries.

One derivation for every format keeps the three tasks consistent: the semantic map of a panoptic
sample is exactly what `semantic_from_panoptic` says, and training targets never disagree with it.
"""

from __future__ import annotations

import torch

from omniseg.data.errors import DataError
from omniseg.masks import boxes_from_masks, nonempty_masks  # noqa: F401  (re-exported: data code uses them)
from omniseg.tasks import TASKS



def semantic_from_panoptic(pan_seg: torch.Tensor, segments_info: list[dict], ignore_index: int = 255) -> torch.Tensor:
    """int64 [H,W] class map: each segment's category; void (0), crowd and unknown ids -> ignore_index."""
    labelled = sorted((int(s["id"]), int(s["category"])) for s in segments_info
                      if not s.get("iscrowd", False) and int(s["id"]) != 0)
    if not labelled:
        return torch.full(pan_seg.shape, ignore_index, dtype=torch.int64, device=pan_seg.device)
    # searchsorted against the few segment ids: a per-pixel lookup without torch.unique's full sort.
    ids = torch.tensor([i for i, _ in labelled], dtype=pan_seg.dtype, device=pan_seg.device)
    cats = torch.tensor([c for _, c in labelled], dtype=torch.int64, device=pan_seg.device)
    pos = torch.searchsorted(ids, pan_seg.contiguous()).clamp_(max=len(labelled) - 1)
    found = ids[pos] == pan_seg
    return torch.where(found, cats[pos], torch.full_like(cats[pos], ignore_index))


def instances_from_panoptic(pan_seg: torch.Tensor, segments_info: list[dict]) -> dict:
    """Thing segments as instances (crowd ones kept, flagged). Boxes from the masks."""
    things = [s for s in segments_info if s.get("isthing", False)]
    h, w = pan_seg.shape[-2:]
    if not things:
        masks = torch.zeros((0, h, w), dtype=torch.bool)
    else:
        ids = torch.tensor([int(s["id"]) for s in things], dtype=pan_seg.dtype)
        masks = pan_seg[None] == ids[:, None, None]
    return {
        "masks": masks,
        "labels": torch.tensor([int(s["category"]) for s in things], dtype=torch.int64),
        "boxes": boxes_from_masks(masks),
        "iscrowd": torch.tensor([bool(s.get("iscrowd", False)) for s in things], dtype=torch.bool),
    }


def _empty(h: int, w: int) -> dict:
    return {"labels": torch.zeros((0,), dtype=torch.int64), "masks": torch.zeros((0, h, w), dtype=torch.bool)}


def _per_class(sem_seg: torch.Tensor, ignore_index: int, classes: set[int] | None = None) -> dict:
    """One mask per class present in a class map (optionally restricted to `classes`)."""
    present = [int(c) for c in torch.unique(sem_seg).tolist() if int(c) != ignore_index]
    if classes is not None:
        present = [c for c in present if c in classes]
    if not present:
        return _empty(*sem_seg.shape[-2:])
    labels = torch.tensor(present, dtype=torch.int64)
    return {"labels": labels, "masks": sem_seg[None] == labels[:, None, None]}


def _drop_empty(t: dict) -> dict:
    if t["masks"].shape[0] == 0:
        return t
    keep = nonempty_masks(t["masks"])
    return {"labels": t["labels"][keep], "masks": t["masks"][keep]}


def mask_targets(sample: dict, task: str, *, ignore_index: int = 255, stuff_classes=None) -> dict:
    """{"labels": int64 [N], "masks": bool [N,H,W]} for task in {"semantic", "instance", "panoptic"}.

    Uses the richest annotation available: pan_seg first, then instances, then sem_seg (semantic).
    Crowd regions never become targets. Masks empty after cropping are dropped. For the panoptic task
    without pan_seg, `stuff_classes` (contiguous ids) selects which sem_seg classes form stuff segments
    next to the instances.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    name = sample.get("file_name")
    if "pan_seg" in sample:
        pan, infos = sample["pan_seg"], sample["segments_info"]
        h, w = pan.shape[-2:]
        if task == "semantic":
            return _per_class(semantic_from_panoptic(pan, infos, ignore_index), ignore_index)
        keep = [s for s in infos if not s.get("iscrowd", False) and (task == "panoptic" or s.get("isthing", False))]
        if not keep:
            return _empty(h, w)
        ids = torch.tensor([int(s["id"]) for s in keep], dtype=pan.dtype)
        labels = torch.tensor([int(s["category"]) for s in keep], dtype=torch.int64)
        return _drop_empty({"labels": labels, "masks": pan[None] == ids[:, None, None]})

    inst = sample.get("instances")
    if inst is not None and task in ("instance", "semantic") and not (task == "semantic" and "sem_seg" in sample):
        crowd = inst.get("iscrowd")
        keep = ~crowd if crowd is not None else torch.ones(len(inst["labels"]), dtype=torch.bool)
        masks, labels = inst["masks"][keep].bool(), inst["labels"][keep].long()
        if task == "instance":
            return _drop_empty({"labels": labels, "masks": masks})
        # Semantic from instances: union per class, later instances winning where they overlap.
        h, w = masks.shape[-2:]
        sem = torch.full((h, w), ignore_index, dtype=torch.int64)
        for m, c in zip(masks, labels.tolist()):
            sem[m] = c
        return _per_class(sem, ignore_index)

    if "sem_seg" in sample:
        sem = sample["sem_seg"]
        if task == "semantic":
            return _per_class(sem, ignore_index)
        if task == "panoptic" and inst is not None and stuff_classes is not None:
            stuff = _per_class(sem, ignore_index, set(int(c) for c in stuff_classes))
            things = mask_targets({"instances": inst, "file_name": name}, "instance")
            return {
                "labels": torch.cat([things["labels"], stuff["labels"]]),
                "masks": torch.cat([things["masks"], stuff["masks"]]),
            }
    raise DataError(name, f"sample has no annotation from which {task} targets can be derived "
                          f"(keys: {sorted(k for k in sample if k != 'image')})")
