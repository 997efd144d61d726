"""Polygons <-> masks for the polygon formats omniseg reads and writes (YOLO-seg, LabelMe). A pixel
belongs to a polygon when its centre is inside. Coordinates are pixel-centre units (pixel (i, j) centred
on x = i, y = j, as LabelMe's points) or, with `centres=False`, corner units (pixel i spans [i, i + 1],
as YOLO's normalised coordinates times the image size). Masks are traced at the 0.5 level (contourpy,
matplotlib's contouring), so writing a mask and reading it back gives the same pixels, except where a
region touches itself only at a pixel corner; holes are filled, as neither format has them.

Also the panoptic sample both readers build when some classes are stuff.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils

from omniseg.data.meta import DatasetMeta
from omniseg.masks import boxes_from_masks


def rasterize(polygons: Sequence[Sequence[float]], height: int, width: int, *, centres: bool = True) -> np.ndarray:
    """Flat [x0, y0, x1, y1, ...] polygons -> bool [H, W] (their union); pycocotools works in corner units."""
    shift = 0.5 if centres else 0.0
    flat = [[float(v) + shift for v in p] for p in polygons if len(p) >= 6]
    if not flat:
        return np.zeros((height, width), dtype=bool)
    rle = mask_utils.merge(mask_utils.frPyObjects(flat, height, width))
    with warnings.catch_warnings():  # pycocotools' numpy-2 __array__ DeprecationWarning is noise for users
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)


def trace(mask: np.ndarray | torch.Tensor) -> list[np.ndarray]:
    """bool [H, W] -> the outer boundary of each connected region, as [N, 2] (x, y) arrays in
    pixel-centre coordinates (largest first); `rasterize` of them gives the mask back, holes filled."""
    import contourpy

    m = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask, dtype=np.float64)
    if not m.any():
        return []
    padded = np.pad(m, 1)
    lines = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate).lines(0.5)
    outer = []
    for line in lines:
        xy = line[:-1] - 1.0 if len(line) > 1 and np.allclose(line[0], line[-1]) else line - 1.0
        if len(xy) < 3:
            continue
        x, y = xy[:, 0], xy[:, 1]
        area = 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
        outer.append((abs(area), area, xy))
    # An outer boundary and a hole run in opposite directions; the largest ring is always outer.
    if not outer:
        return []
    sign = np.sign(max(outer, key=lambda t: t[0])[1])
    return [xy for _, area, xy in sorted(outer, key=lambda t: -t[0]) if np.sign(area) == sign]


def bridge(polygons: Sequence[np.ndarray]) -> np.ndarray:
    """Several rings -> one, joined by out-and-back bridges between their closest vertices (how YOLO-seg,
    one polygon per object, stores an object in several parts); the bridges enclose no pixel centre."""
    rings = [np.asarray(p, dtype=np.float64) for p in polygons]
    merged = rings[0]
    for ring in rings[1:]:
        d = ((merged[:, None, :] - ring[None, :, :]) ** 2).sum(-1)
        i, j = np.unravel_index(int(d.argmin()), d.shape)
        ring = np.roll(ring, -j, axis=0)
        merged = np.concatenate([merged[: i + 1], ring, ring[:1], merged[i:]])
    return merged


def panoptic_sample(masks: Sequence[np.ndarray], labels: Sequence[int], isthing: Sequence[bool],
                    height: int, width: int) -> tuple[torch.Tensor, list[dict]]:
    """Regions in drawing order (later ones on top) -> (pan_seg int64 [H, W], segments_info): every thing
    region its own segment, the regions of one stuff class one segment; pixels of no region are void."""
    pan = np.zeros((height, width), dtype=np.int64)
    infos: list[dict] = []
    stuff_ids: dict[int, int] = {}
    for mask, label in zip(masks, labels):
        if not isthing[label]:
            if label not in stuff_ids:
                infos.append({"id": len(infos) + 1, "category": int(label), "isthing": False, "iscrowd": False})
                stuff_ids[label] = len(infos)
            pan[mask] = stuff_ids[label]
        else:
            infos.append({"id": len(infos) + 1, "category": int(label), "isthing": True, "iscrowd": False})
            pan[mask] = len(infos)
    present = set(np.unique(pan).tolist())
    return torch.from_numpy(pan), [s for s in infos if s["id"] in present]


def region_annotations(masks: list[np.ndarray], classes: list[int], meta: DatasetMeta, height: int, width: int,
                       panoptic: bool) -> dict:
    """A sample's annotations from regions in drawing order: "instances" (the things) and, when some
    classes are stuff, "pan_seg" + "segments_info"."""
    things = [i for i, c in enumerate(classes) if meta.isthing[c]]
    stacked = torch.from_numpy(np.stack([masks[i] for i in things])) if things else torch.zeros((0, height, width),
                                                                                              dtype=torch.bool)
    out = {"instances": {"masks": stacked, "labels": torch.tensor([classes[i] for i in things], dtype=torch.int64),
                         "boxes": boxes_from_masks(stacked), "iscrowd": torch.zeros(len(things), dtype=torch.bool)}}
    if panoptic:
        out["pan_seg"], out["segments_info"] = panoptic_sample(masks, classes, meta.isthing, height, width)
    return out
