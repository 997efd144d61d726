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

``mode="fast"`` makes the same decisions without resizing N maps to full resolution (see
:mod:`omniseg.models.layers.resize_grid`): semantic scores are summed at mask resolution before the
resize (HF transformers' order) and their argmax is taken exactly over the resized scores; panoptic
winners, confidences and areas and instance masks are those of the official order, evaluated
exactly only near boundaries; instance mask scores take the sigmoid exactly at mask edges and at
the window bounds' midpoint inside. Outputs agree with the official order except at pixels within float rounding of a decision (and the semantic
sigmoid order); ``benchmarks/`` asserts the agreement.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from omniseg.masks import boxes_from_masks
from omniseg.models.layers.resize_grid import ResizeGrid, resize_chain
from omniseg.tasks import TASKS

__all__ = [
    "semantic_inference",
    "panoptic_inference",
    "instance_inference",
    "resize_mask_logits",
    "postprocess",
]

MODES = ("official", "fast")


def check_mode(mode: str) -> str:
    """The post-processing mode, or a ValueError naming the choices (config, API and CLI all call this)."""
    if mode not in MODES:
        raise ValueError(f"unknown post-processing mode {mode!r}; expected one of {MODES}")
    return mode


def semantic_inference(mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> torch.Tensor:
    """Per-class scores [K, h, w] = sum_q p_q(c) * sigmoid(mask_q) (no-object dropped)."""
    probs = F.softmax(mask_cls.float(), dim=-1)[:, :-1]
    return torch.einsum("qc,qhw->chw", probs, mask_pred.float().sigmoid())


def _panoptic_selection(mask_cls: torch.Tensor, object_mask_threshold: float):
    """(keep, scores, classes): queries predicting a real class with max-softmax score above the
    threshold, and every query's max-softmax score and class."""
    scores, labels = F.softmax(mask_cls.float(), dim=-1).max(-1)
    return labels.ne(mask_cls.shape[-1] - 1) & (scores > object_mask_threshold), scores, labels


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
    keep, scores, labels = _panoptic_selection(mask_cls, object_mask_threshold)
    cur_scores = scores[keep]
    cur_classes = labels[keep]
    cur_masks = mask_pred[keep].float().sigmoid()
    h, w = mask_pred.shape[-2:]
    segment_map = torch.zeros((h, w), dtype=torch.int64, device=mask_pred.device)
    segments_info: list[dict] = []
    if cur_masks.shape[0] == 0:
        return segment_map, segments_info
    return _merge_kept(cur_scores, cur_classes, cur_masks, thing_ids, overlap_threshold)


def _merge_kept(scores, classes, probs, thing_ids, overlap_threshold,
                channels_last: bool = False) -> tuple[torch.Tensor, list[dict]]:
    """The merge on full-resolution mask probabilities [N, H, W] of the kept queries ([H, W, N] with
    `channels_last`: the same decisions, from reductions over contiguous memory)."""
    if channels_last:
        winner = (probs * scores).max(-1).indices  # the first maximum, as argmax
        confident = probs.gather(-1, winner[..., None])[..., 0] >= 0.5
        original_area = (probs >= 0.5).flatten(0, 1).sum(0)
    else:
        winner = (scores.view(-1, 1, 1) * probs).argmax(0)
        confident = probs.gather(0, winner[None])[0] >= 0.5
        original_area = (probs >= 0.5).flatten(1).sum(1)
    return merge_segments(winner, confident, original_area, scores, classes,
                          thing_ids=thing_ids, overlap_threshold=overlap_threshold)


def merge_segments(winner: torch.Tensor, confident: torch.Tensor, original_area: torch.Tensor,
                   scores: torch.Tensor, classes: torch.Tensor, *, thing_ids: Iterable[int],
                   overlap_threshold: float) -> tuple[torch.Tensor, list[dict]]:
    """The official per-query merge, from per-pixel facts instead of N full-resolution masks.

    winner [H, W]: query with the largest score * sigmoid; confident [H, W]: the winner's sigmoid >= 0.5;
    original_area [N]: pixels where each query's sigmoid >= 0.5. Query k's segment is
    ``(winner == k) & confident``, dropped when empty or when ``#(winner == k) / original_area <
    overlap_threshold``; stuff segments of one class share an id. Segments are disjoint, so one lookup
    table replaces the official per-query loop over full-resolution masks.
    """
    thing_ids = {int(t) for t in thing_ids}
    n = scores.shape[0]
    final = torch.where(confident, winner, n)
    won_area = torch.bincount(winner.flatten(), minlength=n)[:n].tolist()
    final_area = torch.bincount(final.flatten(), minlength=n + 1)[:n].tolist()
    original_area = original_area.tolist()
    lut = [0] * (n + 1)
    segments_info: list[dict] = []
    stuff_segment_of_class: dict[int, int] = {}
    current_id = 0
    for k, pred_class in enumerate(classes.tolist()):
        if won_area[k] == 0 or original_area[k] == 0 or final_area[k] == 0:
            continue
        if won_area[k] / original_area[k] < overlap_threshold:
            continue
        isthing = pred_class in thing_ids
        if not isthing and pred_class in stuff_segment_of_class:
            lut[k] = stuff_segment_of_class[pred_class]
            continue
        current_id += 1
        if not isthing:
            stuff_segment_of_class[pred_class] = current_id
        lut[k] = current_id
        segments_info.append({"id": current_id, "category": pred_class, "isthing": isthing,
                              "score": float(scores[k].item())})
    segment_map = torch.tensor(lut, dtype=torch.int64, device=winner.device)[final]
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
    class_scores: torch.Tensor, labels: torch.Tensor, mask_logits: torch.Tensor, mask_threshold: float,
    inverse: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Binarise selected mask logits; score = class prob * mean mask prob inside the mask. With `inverse`,
    `mask_logits` holds each distinct query once and detection i uses row inverse[i] (a query selected
    with several classes is binarised and scored once)."""
    masks = mask_logits > mask_threshold
    flat_masks = masks.flatten(1).float()
    mask_scores = (mask_logits.float().sigmoid().flatten(1) * flat_masks).sum(1) / (flat_masks.sum(1) + 1e-6)
    return _detections(class_scores, labels, masks, mask_scores, inverse)


def _detections(class_scores, labels, masks, mask_scores, inverse: torch.Tensor | None = None) -> dict:
    """The instance result: per detection its mask, label, class x mask score and box. With `inverse`,
    `masks` / `mask_scores` hold each distinct query once (boxed once) and detection i uses row inverse[i]."""
    boxes = _inclusive_boxes(masks)
    if inverse is not None:
        masks, mask_scores, boxes = masks[inverse], mask_scores[inverse], boxes[inverse]
    return {"masks": masks, "labels": labels.to(torch.int64), "scores": class_scores * mask_scores, "boxes": boxes}


def _inclusive_boxes(masks: torch.Tensor) -> torch.Tensor:
    """xyxy boxes with the far edges on the last pixel (``torchvision.ops.masks_to_boxes``), zeros if empty."""
    boxes = boxes_from_masks(masks)
    boxes[:, 2:] -= (boxes[:, 2:] > 0).float()
    return boxes


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
    """[N, h, w] logits -> [N, H, W] float32: upsample to the padded input, crop the image, resize to the output."""
    return resize_chain(mask_pred.float(), padded_size, image_size, output_size)


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
    mode: str = "official",
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
        mode: ``"official"`` (detectron2 order, bit-for-bit) or ``"fast"`` (same decisions without
            full-resolution mask stacks; see the module docstring).
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

    if check_mode(mode) == "fast":
        if return_semantic_scores:
            raise ValueError("return_semantic_scores needs mode='official' (fast mode never forms [K, H, W] scores)")
        return _postprocess_fast(mask_cls, mask_pred, padded_size, image_size, output_size, tasks, thing_ids,
                                 object_mask_threshold, overlap_threshold, topk, instance_things_only)

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
        keep = torch.nonzero(_panoptic_selection(mask_cls, object_mask_threshold)[0]).flatten()
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
        unique_queries, inverse = torch.unique(query_idx, return_inverse=True)
        selected = all_resized[unique_queries] if all_resized is not None else resize(mask_pred[unique_queries])
        result["instances"] = _instances_from_selected(scores, labels, selected, 0.0, inverse)
    return result


def _postprocess_fast(mask_cls, mask_pred, padded_size, image_size, output_size, tasks, thing_ids,
                      object_mask_threshold, overlap_threshold, topk, instance_things_only) -> dict:
    """``mode="fast"``: every decision from window bounds, exact values only where they are undecided.
    Where undecided windows are so many that exact evaluation would cost more than a dense resize
    (maps with edges everywhere, e.g. from random weights), a task takes the dense route instead."""
    grid = ResizeGrid(mask_pred.shape[-2:], padded_size, image_size, output_size, device=mask_pred.device)
    mask_pred = mask_pred.float()
    result: dict = {}
    if "semantic" in tasks:
        probs = F.softmax(mask_cls.float(), dim=-1)[:, :-1]
        scores = (probs.T @ mask_pred.sigmoid().flatten(1)).view(-1, *mask_pred.shape[-2:])  # [K, h, w]
        candidates = grid.argmax_candidates(*grid.window_min_max(scores))
        if grid.exact_work_exceeds_dense(candidates.work, scores.shape[0]):
            result["semantic"] = grid.resize(scores, channels_last=True).max(-1).indices  # first maximum
        else:
            result["semantic"] = grid.resized_argmax(scores, candidates)[0]
    if "panoptic" in tasks:
        keep, scores, classes = _panoptic_selection(mask_cls, object_mask_threshold)
        result["panoptic"] = _fast_panoptic(grid, scores[keep], classes[keep], mask_pred[keep], thing_ids,
                                            overlap_threshold)
    if "instance" in tasks:
        num_classes = mask_cls.shape[-1] - 1
        scores, labels, query_idx = _instance_selection(
            mask_cls, num_classes, topk, thing_ids if instance_things_only else None
        )
        result["instances"] = _fast_instances(grid, scores, labels, query_idx, mask_pred)
    return result


def _fast_panoptic(grid: ResizeGrid, scores: torch.Tensor, classes: torch.Tensor, logits: torch.Tensor, thing_ids,
                   overlap_threshold) -> dict:
    """Official panoptic merge of the kept queries' resized logits, without resizing them."""
    n = logits.shape[0]
    if n == 0:
        return {"segment_map": torch.zeros(grid.output_size, dtype=torch.int64, device=logits.device),
                "segments_info": []}
    low, high = grid.window_min_max(logits)  # logit bounds per window
    straddles = (low < 0) & (high >= 0)  # windows where "logit >= 0" is not decided by the bounds
    s = scores.view(-1, 1, 1)
    candidates = grid.argmax_candidates(s * low.sigmoid(), s * high.sigmoid())
    # the dense route does more per pixel here (sigmoid, score product, argmax over N): break-even ~10%
    if grid.exact_work_exceeds_dense(candidates.work + grid.selected_work(straddles), n, fraction=0.10):
        segment_map, segments_info = _merge_kept(scores, classes, grid.resize(logits, channels_last=True).sigmoid(),
                                                 thing_ids, overlap_threshold, channels_last=True)
        return {"segment_map": segment_map, "segments_info": segments_info}
    winner, pixels, winner_logits = grid.resized_argmax(logits, candidates, winner_maps=True,
                                                        value_at=lambda u, k: scores[k] * u.sigmoid())
    # Is the winner's logit >= 0? From the winner's bounds where they decide, exactly elsewhere.
    window_winner = candidates.winner
    confident = grid.to_pixels(low.gather(0, window_winner[None])[0] >= 0)
    flat = confident.view(-1)
    flat[pixels] = winner_logits >= 0  # undecided windows
    wr, wc = torch.nonzero(straddles.gather(0, window_winner[None])[0] & candidates.decided, as_tuple=True)
    _, block, _, values = grid.window_values(logits, window_winner[wr, wc], wr, wc)
    flat[block.flatten()] = (values >= 0).flatten()
    # Each query's area with logit >= 0: whole windows from the bounds, straddling windows pixel by pixel.
    area = ((low >= 0) * grid.window_pixel_count).flatten(1).sum(1)
    k, _, valid, values = grid.edge_blocks(logits, straddles)
    area = area.index_add(0, k, ((values >= 0) & valid).flatten(1).sum(1))
    segment_map, segments_info = merge_segments(winner, confident, area, scores, classes, thing_ids=thing_ids,
                                                overlap_threshold=overlap_threshold)
    return {"segment_map": segment_map, "segments_info": segments_info}


def _fast_instances(grid: ResizeGrid, class_scores, labels, query_idx, mask_pred, threshold: float = 0.0) -> dict:
    """Resized masks (logit > threshold) of the selected queries and their mean-sigmoid scores."""
    unique_queries, inverse = torch.unique(query_idx, return_inverse=True)
    logits = mask_pred[unique_queries]
    low, high = grid.window_min_max(logits)
    straddles = (low <= threshold) & (high > threshold)
    if grid.exact_work_exceeds_dense(grid.selected_work(straddles), logits.shape[0]):
        return _instances_from_selected(class_scores, labels, grid.resize(logits), threshold, inverse)
    inside = low > threshold
    masks = grid.to_pixels(inside)
    k, block, valid, values = grid.edge_blocks(logits, straddles)
    above = values > threshold  # padded block entries repeat a real pixel with its value: safe to write
    masks.view(-1)[(block + (k * masks[0].numel())[:, None, None]).flatten()] = above.flatten()
    positive = above & valid  # ... but not to count
    # mean sigmoid over the mask: edge pixels exactly, inside windows from their bounds' midpoint
    # (logits are large there, where the sigmoid is flat)
    count = grid.window_pixel_count
    area = (inside * count).flatten(1).sum(1).float()
    total = (inside * count * ((low + high) / 2).sigmoid()).flatten(1).sum(1)
    area = area.index_add(0, k, positive.flatten(1).sum(1).float())
    total = total.index_add(0, k, (values.sigmoid() * positive).flatten(1).sum(1))
    return _detections(class_scores, labels, masks, total / (area + 1e-6), inverse)
