"""Predictions -> the JSON the HTTP API returns, in the dataset's own ids, and the "view" the web page draws.

API formats: semantic as a label PNG of dataset ids (base64) or one COCO RLE per class present;
panoptic as the COCO panoptic PNG (base64) + `segments_info`; instances as COCO result records (RLE,
XYWH box, score). The view is, per task, an id map (RGB-encoded ids, as COCO panoptic PNGs, at most
`max_side` pixels on the longer side) plus the list of its segments with class, colour, score and
full-resolution area, so the page can draw, toggle and explain every segment without decoding RLE.
"""

from __future__ import annotations

import base64

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.nn import functional as F

from omniseg.data.meta import DatasetMeta
from omniseg.outputs import id_to_rgb, instances_to_coco_json, panoptic_png_array, png_bytes, semantic_to_dataset_ids

SEMANTIC_FORMATS = ("png", "rle")


def b64png(array: np.ndarray) -> str:
    return base64.b64encode(png_bytes(array)).decode("ascii")


def _rle(mask: torch.Tensor) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.cpu().numpy().astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def encode_prediction(pred: dict, meta: DatasetMeta, *, semantic_format: str = "png") -> dict:
    """One image's prediction (Predictor's dict) -> the API's JSON-ready answer."""
    out: dict = {"width": int(pred["width"]), "height": int(pred["height"])}
    if "semantic" in pred:
        labels = pred["semantic"]
        present = [int(c) for c in torch.unique(labels).tolist() if 0 <= c < meta.num_classes]
        if semantic_format == "png":
            out["semantic"] = {"format": "png", "png": b64png(semantic_to_dataset_ids(labels, meta)),
                               "category_ids": [meta.to_dataset_id(c) for c in present]}
        else:
            out["semantic"] = {"format": "rle", "segments": [
                {"category_id": meta.to_dataset_id(c), "segmentation": _rle(labels == c),
                 "area": int((labels == c).sum())} for c in present]}
    if "panoptic" in pred:
        rgb, segments = panoptic_png_array(pred["panoptic"]["segment_map"], pred["panoptic"]["segments_info"], meta)
        out["panoptic"] = {"png": b64png(rgb), "segments_info": segments}
    if "instances" in pred:
        records = instances_to_coco_json(None, pred["instances"], meta)
        out["instances"] = [{k: v for k, v in r.items() if k != "image_id"} for r in records]
    return out


def _shrink(ids: torch.Tensor, max_side: int) -> torch.Tensor:
    """An id map at most `max_side` on its longer side (nearest neighbour: ids are labels, not values)."""
    h, w = ids.shape
    scale = min(1.0, max_side / max(h, w))
    if scale == 1.0:
        return ids
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(ids[None, None].float(), size=size, mode="nearest")[0, 0].long()


def _segment(meta: DatasetMeta, segment_id: int, cls: int, area: int, score: float | None = None, **extra) -> dict:
    return {"id": int(segment_id), "class": int(cls), "category_id": meta.to_dataset_id(int(cls)),
            "name": meta.classes[int(cls)], "color": list(meta.colors[int(cls)]), "isthing": bool(meta.isthing[int(cls)]),
            "area": int(area), "score": None if score is None else float(score), **extra}


def encode_view(pred: dict, meta: DatasetMeta, *, max_side: int = 1600, score_threshold: float = 0.5) -> dict:
    """What the web page draws, per task: {"png": id map, "segments": [...]} at the display size."""
    h, w = int(pred["height"]), int(pred["width"])
    view: dict = {"width": w, "height": h}
    if "semantic" in pred:
        labels = pred["semantic"].cpu().long()
        ids = torch.where((labels >= 0) & (labels < meta.num_classes), labels + 1, torch.zeros_like(labels))
        counts = torch.bincount(ids.flatten(), minlength=meta.num_classes + 1)
        view["semantic"] = {"png": ids, "segments": [_segment(meta, c + 1, c, counts[c + 1])
                                                     for c in range(meta.num_classes) if counts[c + 1] > 0]}
    if "panoptic" in pred:
        ids = pred["panoptic"]["segment_map"].cpu().long()
        counts = torch.bincount(ids.flatten())
        view["panoptic"] = {"png": ids, "segments": [
            _segment(meta, s["id"], s["category"], counts[s["id"]] if s["id"] < len(counts) else 0, s.get("score"))
            for s in pred["panoptic"]["segments_info"]]}
    if "instances" in pred:
        inst = pred["instances"]
        ids = torch.zeros((h, w), dtype=torch.int64)
        segments = []
        order = inst["scores"].cpu().argsort()  # ascending: the most confident instance is painted last, on top
        for i in order.tolist():
            score = float(inst["scores"][i])
            if score < score_threshold:
                continue
            mask = inst["masks"][i].cpu()
            ids[mask] = i + 1
            box = [float(v) for v in inst["boxes"][i].tolist()] if "boxes" in inst else None
            segments.append(_segment(meta, i + 1, inst["labels"][i], mask.sum(), score, box=box))
        view["instances"] = {"png": ids, "segments": sorted(segments, key=lambda s: -s["score"])}
    for task in ("semantic", "panoptic", "instances"):
        if task in view:
            small = _shrink(view[task]["png"], max_side)
            view["display"] = {"width": int(small.shape[1]), "height": int(small.shape[0])}
            view[task]["png"] = b64png(id_to_rgb(small))
    return view


def encode_layers(sets: list[dict], image_size: tuple[int, int], padded_size: tuple[int, int],
                  meta: DatasetMeta, *, max_queries: int = 4, max_side: int = 256) -> dict:
    """The masks, prediction set by prediction set, of the queries that own the largest areas of the
    final prediction (each pixel owned by the query with the highest class score x mask probability,
    no-object queries left out), as binary PNGs at most `max_side` on the longer side."""
    h, w = image_size
    last = sets[-1]
    probs = last["pred_logits"].float().softmax(-1)
    scores, classes = probs[:, :-1].max(-1)
    objects = (probs.argmax(-1) != probs.shape[-1] - 1).float()  # queries whose best guess is a class
    masks = last["pred_masks"].float().sigmoid()
    ownership = (scores * objects)[:, None, None] * masks
    owner = ownership.argmax(0)
    area = torch.bincount(owner.flatten(), weights=(ownership.amax(0) > 0).flatten().float(),
                          minlength=masks.shape[0])
    queries = [int(q) for q in area.argsort(descending=True)[:max_queries].tolist() if area[q] > 0]
    scale = min(1.0, max_side / max(h, w))
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    hp, wp = padded_size
    rows = []
    for q in queries:
        pngs = []
        for s in sets:
            logits = F.interpolate(s["pred_masks"][q][None, None].float(), size=(hp, wp), mode="bilinear",
                                   align_corners=False)[..., :h, :w]
            small = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[0, 0]
            pngs.append(b64png(((small > 0).numpy() * 255).astype(np.uint8)))
        cls = int(classes[q])
        rows.append({"query": q, "class": cls, "name": meta.classes[cls], "color": list(meta.colors[cls]),
                     "score": float(scores[q]), "masks": pngs})
    return {"sets": len(sets), "width": size[1], "height": size[0], "queries": rows}
