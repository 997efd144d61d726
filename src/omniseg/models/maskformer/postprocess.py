"""Inference for mask-classification outputs (one image at a time), as Mask2Former's official code.

Resizing follows the official order: mask *logits* are upsampled bilinearly to the padded input
size, cropped to the un-padded ``image_size`` and resized bilinearly to the original
``output_size``; sigmoid / thresholds are applied afterwards. Because query selection in panoptic
(class score > threshold) and instance (top-k (query, class) pairs) inference depends only on the
class logits, :func:`postprocess` resizes just the selected queries' masks: the result is
identical to resizing all Q masks first. Semantic inference needs every query; it is resized in
one ``interpolate`` call. Official detectron2 switches between two semantic orders: when panoptic or
instance inference is also requested, masks are resized before the einsum (``sem_seg_postprocess``
"before inference"); for semantic-only models the [K, Hp, Wp] scores are cropped and resized
instead. ``semantic_before_inference=None`` picks the same way.

``exact=False`` runs inference at the un-padded input resolution and only resizes the results
(nearest for maps and masks, bilinear for semantic scores): much cheaper for large originals,
not bit-identical to the official outputs.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import masks_to_boxes

__all__ = [
    "semantic_inference",
    "panoptic_inference",
    "instance_inference",
    "resize_mask_logits",
    "postprocess",
]

TASKS = ("semantic", "panoptic", "instance")


def semantic_inference(mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> torch.Tensor:
    """Per-class scores [K, h, w] = sum_q p_q(c) * sigmoid(mask_q) (no-object dropped)."""
    probs = F.softmax(mask_cls.float(), dim=-1)[:, :-1]
    return torch.einsum("qc,qhw->chw", probs, mask_pred.float().sigmoid())


def _panoptic_keep(mask_cls: torch.Tensor, object_mask_threshold: float) -> torch.Tensor:
    """Queries predicting a real class with max-softmax score above the threshold."""
    scores, labels = F.softmax(mask_cls.float(), dim=-1).max(-1)
    return labels.ne(mask_cls.shape[-1] - 1) & (scores > object_mask_threshold)


def panoptic_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    *,
    thing_ids: Iterable[int],
    object_mask_threshold: float = 0.8,
    overlap_threshold: float = 0.8,
) -> tuple[torch.Tensor, list[dict]]:
    """Official Mask2Former panoptic merge.

    Kept queries (real class, score > ``object_mask_threshold``) compete per pixel by
    ``score * sigmoid(mask)``; query k's segment is ``(argmax == k) & (sigmoid_k >= 0.5)`` and is
    dropped when empty or when ``#(argmax == k) / #(sigmoid_k >= 0.5) < overlap_threshold``. Stuff
    segments of the same class share one id; ids start at 1, 0 is void.

    Returns:
        ``segment_map`` int64 [h, w] and ``segments_info`` ``[{"id", "category", "isthing", "score"}]``
        (``score`` = class probability of the query that created the segment).
    """
    thing_ids = {int(t) for t in thing_ids}
    probs = F.softmax(mask_cls.float(), dim=-1)
    scores, labels = probs.max(-1)
    keep = labels.ne(mask_cls.shape[-1] - 1) & (scores > object_mask_threshold)
    cur_scores = scores[keep]
    cur_classes = labels[keep]
    cur_masks = mask_pred[keep].float().sigmoid()
    h, w = mask_pred.shape[-2:]
    segment_map = torch.zeros((h, w), dtype=torch.int64, device=mask_pred.device)
    segments_info: list[dict] = []
    if cur_masks.shape[0] == 0:
        return segment_map, segments_info

    cur_mask_ids = (cur_scores.view(-1, 1, 1) * cur_masks).argmax(0)
    stuff_segment_of_class: dict[int, int] = {}
    current_id = 0
    for k in range(cur_classes.shape[0]):
        pred_class = int(cur_classes[k].item())
        isthing = pred_class in thing_ids
        won = cur_mask_ids == k
        confident = cur_masks[k] >= 0.5
        mask_area = int(won.sum().item())
        original_area = int(confident.sum().item())
        mask = won & confident
        if mask_area == 0 or original_area == 0 or not bool(mask.any()):
            continue
        if mask_area / original_area < overlap_threshold:
            continue
        if not isthing and pred_class in stuff_segment_of_class:
            segment_map[mask] = stuff_segment_of_class[pred_class]
            continue
        current_id += 1
        if not isthing:
            stuff_segment_of_class[pred_class] = current_id
        segment_map[mask] = current_id
        segments_info.append(
            {"id": current_id, "category": pred_class, "isthing": isthing, "score": float(cur_scores[k].item())}
        )
    return segment_map, segments_info


def _instance_selection(
    mask_cls: torch.Tensor, num_classes: int, topk: int, thing_ids: Iterable[int] | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k (query, class) pairs by class probability -> (scores, labels, query indices), best first."""
    probs = F.softmax(mask_cls.float(), dim=-1)[:, :-1]
    if probs.shape[1] != num_classes:
        raise ValueError(f"mask_cls has {probs.shape[1]} real classes, expected num_classes={num_classes}")
    flat = probs.flatten()
    scores, flat_idx = flat.topk(min(topk, flat.numel()), sorted=True)
    labels = flat_idx % num_classes
    query_idx = torch.div(flat_idx, num_classes, rounding_mode="floor")
    if thing_ids is not None:
        things = torch.as_tensor(sorted({int(t) for t in thing_ids}), dtype=labels.dtype, device=labels.device)
        is_thing = torch.isin(labels, things)
        scores, labels, query_idx = scores[is_thing], labels[is_thing], query_idx[is_thing]
    return scores, labels, query_idx


def _instances_from_selected(
    class_scores: torch.Tensor, labels: torch.Tensor, mask_logits: torch.Tensor, mask_threshold: float
) -> dict[str, torch.Tensor]:
    """Binarise selected mask logits; score = class prob * mean mask prob inside the mask."""
    masks = mask_logits > mask_threshold
    flat_masks = masks.flatten(1).float()
    mask_scores = (mask_logits.float().sigmoid().flatten(1) * flat_masks).sum(1) / (flat_masks.sum(1) + 1e-6)
    return {
        "masks": masks,
        "labels": labels.to(torch.int64),
        "scores": class_scores * mask_scores,
        "boxes": masks_to_boxes(masks).float(),
    }


def instance_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    *,
    num_classes: int,
    topk: int = 100,
    thing_ids: Iterable[int] | None = None,
    mask_threshold: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Official Mask2Former instance inference on one image.

    The top ``topk`` (query, class) pairs by class probability are kept (sorted by class score,
    where the official code leaves the order unspecified); with ``thing_ids`` only thing classes
    survive (panoptic models). Mask = logit > ``mask_threshold``; score = class prob * mean
    sigmoid inside the mask. Boxes are ``torchvision.ops.masks_to_boxes`` (zeros for empty masks).
    """
    scores, labels, query_idx = _instance_selection(mask_cls, num_classes, topk, thing_ids)
    return _instances_from_selected(scores, labels, mask_pred[query_idx], mask_threshold)


def resize_mask_logits(
    mask_pred: torch.Tensor,
    padded_size: Sequence[int],
    image_size: Sequence[int],
    output_size: Sequence[int],
) -> torch.Tensor:
    """[N, h, w] logits -> [N, H, W]: upsample to the padded input, crop the image, resize to the output."""
    if mask_pred.shape[0] == 0:  # nothing kept (e.g. every query predicts no-object): interpolate rejects N=0
        return mask_pred.new_zeros((0, *output_size), dtype=torch.float32)
    x = mask_pred.float()[None]
    if tuple(x.shape[-2:]) != tuple(padded_size):
        x = F.interpolate(x, size=tuple(padded_size), mode="bilinear", align_corners=False)
    x = x[..., : image_size[0], : image_size[1]]
    if tuple(x.shape[-2:]) != tuple(output_size):
        x = F.interpolate(x, size=tuple(output_size), mode="bilinear", align_corners=False)
    return x[0]


def postprocess(
    outputs: Mapping[str, torch.Tensor],
    image_size: Sequence[int],
    output_size: Sequence[int],
    tasks: Sequence[str],
    thing_ids: Iterable[int] | None = None,
    *,
    padded_size: Sequence[int] | None = None,
    object_mask_threshold: float = 0.8,
    overlap_threshold: float = 0.8,
    topk: int = 100,
    instance_things_only: bool | None = None,
    semantic_before_inference: bool | None = None,
    return_semantic_scores: bool = False,
    exact: bool = True,
) -> dict:
    """Turn one image's raw outputs into the prediction dict of docs/design.md.

    Args:
        outputs: ``{"pred_logits": [Q, K+1], "pred_masks": [Q, h, w]}`` of ONE image.
        image_size: (h, w) of the un-padded network input.
        output_size: (H, W) of the original image; every prediction is returned at this size.
        tasks: any of ``"semantic"``, ``"panoptic"``, ``"instance"``.
        thing_ids: contiguous ids of thing classes (required for panoptic).
        padded_size: padded input size; defaults to 4x the mask resolution (masks at stride 4).
        object_mask_threshold, overlap_threshold: panoptic thresholds (official 0.8 / 0.8).
        topk: instance detections per image.
        instance_things_only: restrict instances to ``thing_ids``; default: when panoptic is also requested
            (official behaviour).
        semantic_before_inference: resize the Q masks before the semantic einsum; default: only when
            panoptic or instance is also requested (official behaviour).
        return_semantic_scores: also return ``semantic_scores`` [K, H, W].
        exact: official resize order (see the module docstring); False = cheap low-resolution path.
    """
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; expected a subset of {TASKS}")
    mask_cls = outputs["pred_logits"]
    mask_pred = outputs["pred_masks"]
    if mask_cls.dim() != 2 or mask_pred.dim() != 3:
        raise ValueError(
            f"postprocess expects one image: pred_logits [Q, K+1] and pred_masks [Q, h, w], "
            f"got {tuple(mask_cls.shape)} and {tuple(mask_pred.shape)}"
        )
    num_classes = mask_cls.shape[-1] - 1
    if padded_size is None:
        padded_size = (mask_pred.shape[-2] * 4, mask_pred.shape[-1] * 4)
    image_size = (int(image_size[0]), int(image_size[1]))
    output_size = (int(output_size[0]), int(output_size[1]))
    if "panoptic" in tasks and thing_ids is None:
        raise ValueError("panoptic inference needs thing_ids (contiguous ids of the thing classes)")
    if instance_things_only is None:
        instance_things_only = "panoptic" in tasks
    if instance_things_only and thing_ids is None:
        raise ValueError("instance_things_only=True needs thing_ids")

    if not exact:
        result = postprocess(
            outputs, image_size, image_size, tasks, thing_ids,
            padded_size=padded_size, object_mask_threshold=object_mask_threshold,
            overlap_threshold=overlap_threshold, topk=topk, instance_things_only=instance_things_only,
            semantic_before_inference=False, return_semantic_scores=return_semantic_scores, exact=True,
        )  # fmt: skip
        return _resize_prediction(result, output_size)

    if semantic_before_inference is None:
        semantic_before_inference = "panoptic" in tasks or "instance" in tasks

    def resize(selected: torch.Tensor) -> torch.Tensor:
        return resize_mask_logits(selected, padded_size, image_size, output_size)

    result: dict = {}
    all_resized: torch.Tensor | None = None  # Q masks at output size, reused by later tasks when computed
    if "semantic" in tasks:
        if semantic_before_inference:
            all_resized = resize(mask_pred)
            sem_scores = semantic_inference(mask_cls, all_resized)
        else:
            padded = resize_mask_logits(mask_pred, padded_size, padded_size, padded_size)
            sem_scores = resize_mask_logits(semantic_inference(mask_cls, padded), padded_size, image_size, output_size)
        result["semantic"] = sem_scores.argmax(0)
        if return_semantic_scores:
            result["semantic_scores"] = sem_scores

    if "panoptic" in tasks:
        keep = torch.nonzero(_panoptic_keep(mask_cls, object_mask_threshold)).flatten()
        kept_masks = all_resized[keep] if all_resized is not None else resize(mask_pred[keep])
        segment_map, segments_info = panoptic_inference(
            mask_cls[keep], kept_masks, thing_ids=thing_ids,
            object_mask_threshold=object_mask_threshold, overlap_threshold=overlap_threshold,
        )  # fmt: skip
        result["panoptic"] = {"segment_map": segment_map, "segments_info": segments_info}

    if "instance" in tasks:
        scores, labels, query_idx = _instance_selection(
            mask_cls, num_classes, topk, thing_ids if instance_things_only else None
        )
        if all_resized is not None:
            selected = all_resized[query_idx]
        else:
            unique_queries, inverse = torch.unique(query_idx, return_inverse=True)
            selected = resize(mask_pred[unique_queries])[inverse]
        result["instances"] = _instances_from_selected(scores, labels, selected, 0.0)
    return result


def _resize_prediction(result: dict, output_size: tuple[int, int]) -> dict:
    """Bring a prediction computed at input resolution to the output size (the ``exact=False`` path)."""
    out: dict = {}
    if "semantic_scores" in result:
        scores = result["semantic_scores"][None]
        scores = F.interpolate(scores, size=output_size, mode="bilinear", align_corners=False)[0]
        out["semantic_scores"] = scores
        out["semantic"] = scores.argmax(0)
    elif "semantic" in result:
        out["semantic"] = _resize_nearest(result["semantic"], output_size)
    if "panoptic" in result:
        pan = result["panoptic"]
        out["panoptic"] = {
            "segment_map": _resize_nearest(pan["segment_map"], output_size),
            "segments_info": pan["segments_info"],
        }
    if "instances" in result:
        inst = dict(result["instances"])
        inst["masks"] = _resize_nearest(inst["masks"], output_size)
        inst["boxes"] = masks_to_boxes(inst["masks"]).float()
        out["instances"] = inst
    return out


def _resize_nearest(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest resize of a label map [h, w] or mask stack [N, h, w], keeping the dtype."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    batched = x[None, None] if x.dim() == 2 else x[:, None]
    resized = F.interpolate(batched.float(), size=size, mode="nearest-exact")
    resized = resized[0, 0] if x.dim() == 2 else resized[:, 0]
    return resized.to(x.dtype)
