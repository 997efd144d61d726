"""Binary-mask geometry shared by data loading, models and evaluation (so none imports another)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["nonempty_masks", "boxes_from_masks", "CroppedMasks", "mask_crops", "combine_panoptic"]


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


class CroppedMasks:
    """Instance masks of a large image kept as tight crops: `crops[i]` bool [h_i, w_i] placed at
    `offsets[i]` = (y, x) in an image of `size` (H, W).

    Tiled inference returns these because N full-size masks of a 10000x10000 image would not fit in memory.
    They stand in for a bool [N,H,W] tensor where omniseg reads instance masks (RLE encoding, polygons,
    overlays, the panoptic merge): `len`, `shape`, `bool()`, `masks[i]` (one dense mask) and `masks[index]`
    (a subset) behave as on the tensor, and `dense()` gives the tensor itself when it fits.
    """

    def __init__(self, crops: Sequence[torch.Tensor], offsets: torch.Tensor | Sequence[Sequence[int]],
                 size: tuple[int, int]):
        self.crops = [c.bool() for c in crops]
        self.offsets = torch.as_tensor(offsets, dtype=torch.int64).reshape(-1, 2)
        self.size = (int(size[0]), int(size[1]))
        if len(self.crops) != self.offsets.shape[0]:
            raise ValueError(f"{len(self.crops)} crops but {self.offsets.shape[0]} offsets")
        for c, (y, x) in zip(self.crops, self.offsets.tolist()):
            if c.ndim != 2 or y < 0 or x < 0 or y + c.shape[0] > self.size[0] or x + c.shape[1] > self.size[1]:
                raise ValueError(f"a crop {tuple(c.shape)} at (y={y}, x={x}) does not fit an image of {self.size}")

    @classmethod
    def from_dense(cls, masks: torch.Tensor) -> "CroppedMasks":
        """bool [N,H,W] -> each mask cut to its tight box (an empty mask becomes an empty crop at (0, 0))."""
        boxes = boxes_from_masks(masks).long().tolist()
        crops = [masks[i, y0:y1, x0:x1].clone() for i, (x0, y0, x1, y1) in enumerate(boxes)]
        return cls(crops, [(y0, x0) for x0, y0, _, _ in boxes], tuple(masks.shape[-2:]))

    def __len__(self) -> int:
        return len(self.crops)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.crops), *self.size))

    @property
    def dtype(self) -> torch.dtype:
        return torch.bool

    @property
    def device(self) -> torch.device:
        return self.crops[0].device if self.crops else torch.device("cpu")

    def bool(self) -> "CroppedMasks":
        return self

    def to(self, device) -> "CroppedMasks":
        return CroppedMasks([c.to(device) for c in self.crops], self.offsets, self.size)

    def cpu(self) -> "CroppedMasks":
        return self.to("cpu")

    def __getitem__(self, index):
        if isinstance(index, int):
            return self._dense_one(index)
        picked = torch.arange(len(self))[index].reshape(-1).tolist()
        return CroppedMasks([self.crops[i] for i in picked], self.offsets[picked], self.size)

    def __iter__(self):
        return (self._dense_one(i) for i in range(len(self)))

    def _dense_one(self, i: int) -> torch.Tensor:
        out = torch.zeros(self.size, dtype=torch.bool, device=self.crops[i].device)
        (y, x), crop = self.offsets[i].tolist(), self.crops[i]
        out[y:y + crop.shape[0], x:x + crop.shape[1]] = crop
        return out

    def dense(self) -> torch.Tensor:
        """bool [N,H,W]."""
        if not self.crops:
            return torch.zeros((0, *self.size), dtype=torch.bool)
        return torch.stack([self._dense_one(i) for i in range(len(self))])

    def areas(self) -> torch.Tensor:
        return torch.tensor([int(c.sum()) for c in self.crops], dtype=torch.int64)

    def boxes(self) -> torch.Tensor:
        """float32 [N,4] xyxy tight boxes in the COCO convention of `boxes_from_masks`."""
        out = torch.zeros((len(self), 4), dtype=torch.float32)
        for i, (crop, (y, x)) in enumerate(zip(self.crops, self.offsets.tolist())):
            if crop.numel():
                out[i] = boxes_from_masks(crop[None].cpu())[0] + torch.tensor([x, y, x, y], dtype=torch.float32)
        return out

    def rles(self) -> list[dict]:
        """COCO RLEs of the full-size masks (counts as str), built from the crops without full-size masks:
        COCO runs go down the columns, so a crop's runs over full-height columns, shifted by the columns
        before it, are the mask's."""
        from pycocotools import mask as mask_utils

        height, width = self.size
        rles = []
        for crop, (y, x) in zip(self.crops, self.offsets.tolist()):
            h, w = crop.shape
            columns = np.zeros((w, height), dtype=np.uint8)  # column-major order of the strip under the crop
            columns[:, y:y + h] = crop.cpu().numpy().T
            flat = columns.reshape(-1)
            change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
            runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
            if flat.size and flat[0]:
                runs.insert(0, 0)  # COCO runs start with background
            if not runs:
                runs = [0]
            runs[0] += x * height
            tail = (width - x - w) * height
            if len(runs) % 2:  # ends on background
                runs[-1] += tail
            elif tail:
                runs.append(tail)
            rle = mask_utils.frPyObjects({"counts": runs, "size": [height, width]}, height, width)
            rle["counts"] = rle["counts"].decode("ascii")
            rles.append(rle)
        return rles


def mask_crops(masks: torch.Tensor | CroppedMasks) -> list[tuple[torch.Tensor, int, int]]:
    """(crop, y, x) per mask: each mask cut to its tight box, for code that works on crops whatever the
    masks came as (a dense bool [N,H,W] tensor or CroppedMasks)."""
    if not isinstance(masks, CroppedMasks):
        masks = CroppedMasks.from_dense(masks.bool())
    return [(c, y, x) for c, (y, x) in zip(masks.crops, masks.offsets.tolist())]


def combine_panoptic(masks: torch.Tensor | CroppedMasks, scores: torch.Tensor, labels: torch.Tensor,
                     stuff_map: torch.Tensor, stuff_probs: torch.Tensor | None, stuff_ids: Sequence[int], *,
                     overlap_threshold: float = 0.5, stuff_area_threshold: int = 4096,
                     instance_score_threshold: float = 0.5, band_rows: int = 2048) -> tuple[torch.Tensor, list[dict]]:
    """Panoptic-FPN's heuristic merge of instances and a stuff map (detectron2's
    combine_semantic_and_instance_outputs), in omniseg's panoptic format.

    Instances by decreasing score (stop below `instance_score_threshold`): one is dropped when more than
    `overlap_threshold` of its mask is already taken, otherwise it takes its still-free pixels. Then each stuff
    class fills the free pixels it predicts, when they number at least `stuff_area_threshold`.

    masks bool [N,H,W] or CroppedMasks, scores [N], labels [N] (contiguous ids); stuff_map integer [H,W] with
    0 = "things" and j >= 1 = stuff class stuff_ids[j-1]; stuff_probs [S+1,H,W] (softmax) gives stuff segments
    their score (mean probability over the segment; 1.0 without it). Instances are painted crop by crop and
    the stuff pass goes `band_rows` rows at a time, so memory beyond the output stays small on huge images.
    Returns segment_map int64 [H,W] (0 = void, ids from 1) and [{"id","category","isthing","score"}].
    """
    height, width = stuff_map.shape
    segment_map = torch.zeros((height, width), dtype=torch.int64, device=stuff_map.device)
    infos: list[dict] = []
    crops = mask_crops(masks)
    for i in torch.argsort(scores, descending=True).tolist():
        score = float(scores[i])
        if score < instance_score_threshold:
            break
        crop, y, x = crops[i]
        crop = crop.to(segment_map.device)
        area = int(crop.sum())
        if area == 0:
            continue
        region = segment_map[y:y + crop.shape[0], x:x + crop.shape[1]]
        if int((crop & (region > 0)).sum()) / area > overlap_threshold:
            continue
        region[crop & (region == 0)] = len(infos) + 1
        infos.append({"id": len(infos) + 1, "category": int(labels[i]), "isthing": True, "score": score})

    num_stuff = len(stuff_ids) + 1
    bands = [(r, min(r + band_rows, height)) for r in range(0, height, band_rows)]

    def free_stuff(r0: int, r1: int) -> torch.Tensor:  # stuff index of the still-free pixels, 0 elsewhere
        band = stuff_map[r0:r1].long()
        return torch.where(segment_map[r0:r1] == 0, band, torch.zeros_like(band))

    areas = torch.zeros(num_stuff, dtype=torch.int64)
    sums = torch.zeros(num_stuff, dtype=torch.float64)
    for r0, r1 in bands:
        free = free_stuff(r0, r1)
        areas += torch.bincount(free.flatten().cpu(), minlength=num_stuff)
        if stuff_probs is not None:
            p = stuff_probs[:, r0:r1].gather(0, free[None])[0]
            sums += torch.bincount(free.flatten().cpu(), weights=p.flatten().double().cpu(), minlength=num_stuff)
    new_id = torch.zeros(num_stuff, dtype=torch.int64)
    for j in range(1, num_stuff):  # the "things" class 0 stays void
        if areas[j] > 0 and areas[j] >= stuff_area_threshold:
            new_id[j] = len(infos) + 1
            score = float(sums[j] / areas[j]) if stuff_probs is not None else 1.0
            infos.append({"id": len(infos) + 1, "category": int(stuff_ids[j - 1]), "isthing": False, "score": score})
    new_id = new_id.to(segment_map.device)
    for r0, r1 in bands:
        ids = new_id[free_stuff(r0, r1)]
        segment_map[r0:r1] = torch.where(ids > 0, ids, segment_map[r0:r1])
    return segment_map, infos
