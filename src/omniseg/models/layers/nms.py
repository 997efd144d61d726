"""Class-wise NMS that exports: torchvision's `batched_nms` returns early when there are no boxes, a branch
on the number of boxes that an exported graph (where that number is symbolic) cannot take."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torchvision.ops.boxes as box_ops
from torchvision.ops import nms


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """torchvision.ops.batched_nms by its coordinate trick (each class's boxes moved beyond the others'),
    without the early return: the same kept boxes, by decreasing score, also for no boxes."""
    top = torch.cat([boxes.flatten(), boxes.new_zeros(1)]).max()
    offsets = idxs.to(boxes) * (top + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


@contextmanager
def exportable_torchvision_nms():
    """While exporting, callers of `torchvision.ops.boxes.batched_nms` (torchvision's RPN and RoI heads,
    omniseg's FCOS) get `batched_nms` above; outside an export nothing changes."""
    if not torch.compiler.is_exporting():
        yield
        return
    original = box_ops.batched_nms
    box_ops.batched_nms = batched_nms
    try:
        yield
    finally:
        box_ops.batched_nms = original
