"""Binary-mask geometry shared by data loading, models and evaluation (so none imports another)."""

from __future__ import annotations

import torch

__all__ = ["nonempty_masks", "boxes_from_masks"]


def nonempty_masks(masks: torch.Tensor) -> torch.Tensor:
    """bool [N]: which masks have any pixel (bool reductions are slow on CPU, uint8 ones are not)."""
    if masks.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=masks.device)
    return masks.reshape(masks.shape[0], -1).view(torch.uint8).amax(dim=1) > 0


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """float32 [N,4] xyxy boxes in COCO convention (x2 = last pixel + 1); empty masks get zeros.

    Same result as torchvision.ops.masks_to_boxes (+1 on the far edges so boxes cover whole pixels),
    computed from row/column projections: masks_to_boxes scans every mask with nonzero(), ~100x slower
    on full-resolution COCO masks, and fails on empty masks.
    """
    n, h, w = masks.shape
    boxes = torch.zeros((n, 4), dtype=torch.float32, device=masks.device)
    if n == 0:
        return boxes
    m = masks.view(torch.uint8) if masks.dtype == torch.bool else (masks != 0).view(torch.uint8)
    rows, cols = m.amax(dim=2), m.amax(dim=1)  # [N,H], [N,W]
    nonempty = rows.amax(dim=1) > 0
    # argmax returns the first maximal index: first occupied row/col, and from the flipped side, the last.
    boxes[:, 0] = cols.argmax(dim=1).float()
    boxes[:, 1] = rows.argmax(dim=1).float()
    boxes[:, 2] = (w - cols.flip(1).argmax(dim=1)).float()
    boxes[:, 3] = (h - rows.flip(1).argmax(dim=1)).float()
    boxes[~nonempty] = 0
    return boxes
