"""Panoptic-FPN's heuristic merge of instances and a stuff map (detectron2's
combine_semantic_and_instance_outputs), with omniseg's panoptic output format."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def combine_panoptic(masks: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, stuff_map: torch.Tensor,
                     stuff_probs: torch.Tensor | None, stuff_ids: Sequence[int], *, overlap_threshold: float = 0.5,
                     stuff_area_threshold: int = 4096, instance_score_threshold: float = 0.5
                     ) -> tuple[torch.Tensor, list[dict]]:
    """Instances by decreasing score (stop below `instance_score_threshold`): one is dropped when more than
    `overlap_threshold` of its mask is already taken, otherwise it takes its still-free pixels. Then each stuff
    class fills the free pixels it predicts, when they number at least `stuff_area_threshold`.

    masks bool [N,H,W], scores [N], labels [N] (contiguous ids); stuff_map int64 [H,W] with 0 = "things" and
    j >= 1 = stuff class stuff_ids[j-1]; stuff_probs [S+1,H,W] (softmax) gives stuff segments their score
    (mean probability over the segment; 1.0 without it).
    Returns segment_map int64 [H,W] (0 = void, ids from 1) and [{"id","category","isthing","score"}].
    """
    segment_map = torch.zeros(stuff_map.shape, dtype=torch.int64, device=stuff_map.device)
    infos: list[dict] = []
    current = 0
    for i in torch.argsort(scores, descending=True).tolist():
        score = float(scores[i])
        if score < instance_score_threshold:
            break
        mask = masks[i].to(segment_map.device)
        area = int(mask.sum())
        if area == 0:
            continue
        taken = mask & (segment_map > 0)
        if int(taken.sum()) / area > overlap_threshold:
            continue
        current += 1
        segment_map[mask & (segment_map == 0)] = current
        infos.append({"id": current, "category": int(labels[i]), "isthing": True, "score": score})
    for j in torch.unique(stuff_map).tolist():
        if j == 0:
            continue  # the "things" class
        mask = (stuff_map == j) & (segment_map == 0)
        area = int(mask.sum())
        if area < stuff_area_threshold or area == 0:
            continue
        current += 1
        segment_map[mask] = current
        score = float(stuff_probs[j][mask].mean()) if stuff_probs is not None else 1.0
        infos.append({"id": current, "category": int(stuff_ids[j - 1]), "isthing": False, "score": score})
    return segment_map, infos
