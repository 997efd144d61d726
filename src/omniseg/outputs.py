"""Prediction writers in the formats other tools read: label PNGs, COCO panoptic PNG+JSON, COCO results JSON.

Every file is written through `omniseg.files.atomic_path`, so an interrupted run never leaves a
truncated PNG or JSON behind.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from omniseg.data.meta import DatasetMeta
from omniseg.evaluation.instance import to_coco_results
from omniseg.files import atomic_path

SEMANTIC_IGNORE = 255


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj))
    return Path(path)


def _save_png(path: str | os.PathLike, array: np.ndarray) -> Path:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return Path(path)


def png_bytes(array: np.ndarray) -> bytes:
    """The PNG encoding of a uint8 / uint16 [H,W] or uint8 [H,W,3] array, in memory (the server's answers)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


# --- panoptic id <-> colour (panopticapi convention) --------------------------------------------
def id_to_rgb(ids: torch.Tensor | np.ndarray) -> np.ndarray:
    """Segment ids [H,W] -> uint8 [H,W,3] with id = R + 256 G + 256^2 B."""
    ids = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids).astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 256**3):
        raise ValueError("panoptic segment ids must be in [0, 2^24)")
    return np.stack([ids % 256, ids // 256 % 256, ids // 256**2], axis=-1).astype(np.uint8)


def rgb_to_id(rgb: np.ndarray | torch.Tensor) -> np.ndarray:
    """uint8 [H,W,3] -> int64 [H,W] segment ids."""
    rgb = np.asarray(rgb.cpu() if isinstance(rgb, torch.Tensor) else rgb).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]


# --- semantic ----------------------------------------------------------------------------------
def semantic_to_dataset_ids(labels: torch.Tensor, meta: DatasetMeta) -> np.ndarray:
    """Contiguous labels [H,W] -> dataset ids; anything outside 0..K-1 becomes the ignore value.

    The result is uint8 with ignore = 255 when every dataset id fits in 0..254, otherwise uint16
    (ignore stays 255 unless 255 is itself a class id, then 65535).
    """
    ids = torch.as_tensor(meta.dataset_ids, dtype=torch.int64)
    wide = bool(ids.max() >= SEMANTIC_IGNORE)
    if bool(ids.min() < 0) or bool(ids.max() >= 65535):
        raise ValueError("semantic PNGs hold dataset ids in 0..65534")
    ignore = 65535 if SEMANTIC_IGNORE in meta.dataset_ids else SEMANTIC_IGNORE
    labels = labels.detach().cpu().long()
    valid = (labels >= 0) & (labels < meta.num_classes)
    out = torch.full_like(labels, ignore)
    out[valid] = ids[labels[valid]]
    return out.numpy().astype(np.uint16 if wide else np.uint8)


def write_semantic_png(path: str | os.PathLike, labels: torch.Tensor, meta: DatasetMeta) -> Path:
    """Label PNG of dataset ids (what the dataset's own annotation PNGs contain)."""
    if labels.ndim != 2:
        raise ValueError(f"labels must be [H,W], got shape {tuple(labels.shape)}")
    return _save_png(path, semantic_to_dataset_ids(labels, meta))


# --- panoptic ----------------------------------------------------------------------------------
def panoptic_segments(segment_map: torch.Tensor, segments_info: Sequence[dict], meta: DatasetMeta) -> list[dict]:
    """COCO `segments_info` (dataset category ids, area, XYWH bbox) for segments present in the map."""
    flat = segment_map.detach().cpu().long()
    height, width = flat.shape
    ids, inverse, counts = torch.unique(flat.reshape(-1), return_inverse=True, return_counts=True)
    ys = torch.arange(height).repeat_interleave(width)
    xs = torch.arange(width).repeat(height)
    n = len(ids)

    def reduce(values: torch.Tensor, how: str, init: int) -> torch.Tensor:
        return torch.full((n,), init, dtype=torch.int64).scatter_reduce(0, inverse, values, how)

    x0, x1 = reduce(xs, "amin", width), reduce(xs, "amax", -1)
    y0, y1 = reduce(ys, "amin", height), reduce(ys, "amax", -1)
    position = {int(segment_id): i for i, segment_id in enumerate(ids.tolist())}
    segments = []
    for info in segments_info:
        i = position.get(int(info["id"]))
        if i is None or int(info["id"]) == 0:
            continue  # not in the map: panopticapi rejects segments without pixels
        segment = {
            "id": int(info["id"]),
            "category_id": meta.to_dataset_id(int(info["category"])),
            "area": int(counts[i]),
            "bbox": [int(x0[i]), int(y0[i]), int(x1[i] - x0[i] + 1), int(y1[i] - y0[i] + 1)],
            "iscrowd": int(bool(info.get("iscrowd", False))),
        }
        if "score" in info:
            segment["score"] = float(info["score"])
        segments.append(segment)
    return segments


def panoptic_png_array(segment_map: torch.Tensor, segments_info: Sequence[dict],
                       meta: DatasetMeta) -> tuple[np.ndarray, list[dict]]:
    """(the COCO panoptic PNG's uint8 [H,W,3] id colours, its COCO `segments_info`). Pixels whose id has
    no entry in `segments_info` become 0 (void), so the PNG and the JSON always agree."""
    if segment_map.ndim != 2:
        raise ValueError(f"segment_map must be [H,W], got shape {tuple(segment_map.shape)}")
    segments = panoptic_segments(segment_map, segments_info, meta)
    ids = segment_map.detach().cpu().long()
    described = torch.tensor([s["id"] for s in segments], dtype=torch.int64)
    ids = torch.where(torch.isin(ids, described), ids, torch.zeros_like(ids))
    return id_to_rgb(ids), segments


def write_panoptic(
    png_path: str | os.PathLike,
    segment_map: torch.Tensor,
    segments_info: Sequence[dict],
    meta: DatasetMeta,
    image_id: Any = None,
) -> dict:
    """Write the COCO panoptic PNG and return its annotation record (file_name, segments_info).

    Pixels whose id has no entry in `segments_info` are written as 0 (void), so the PNG and the
    JSON always agree, as panopticapi requires.
    """
    rgb, segments = panoptic_png_array(segment_map, segments_info, meta)
    _save_png(png_path, rgb)
    annotation = {"file_name": Path(png_path).name, "segments_info": segments}
    if image_id is not None:
        annotation["image_id"] = image_id
    return annotation


def coco_categories(meta: DatasetMeta) -> list[dict]:
    return [
        {
            "id": meta.to_dataset_id(i),
            "name": name,
            "isthing": int(bool(meta.isthing[i])),
            "color": list(meta.colors[i]),
        }
        for i, name in enumerate(meta.classes)
    ]


class PanopticJsonWriter:
    """Writes one PNG per image into `png_dir` and, on `close()`, the COCO panoptic JSON.

    >>> with PanopticJsonWriter("out/panoptic.json", "out/panoptic", meta) as writer:
    ...     writer.add(image_id, "img.jpg", height, width, segment_map, segments_info)
    """

    def __init__(self, json_path: str | os.PathLike, png_dir: str | os.PathLike, meta: DatasetMeta):
        self.json_path = Path(json_path)
        self.png_dir = Path(png_dir)
        self.meta = meta
        self.images: list[dict] = []
        self.annotations: list[dict] = []

    def add(
        self,
        image_id: Any,
        file_name: str,
        height: int,
        width: int,
        segment_map: torch.Tensor,
        segments_info: Sequence[dict],
    ) -> dict:
        png_path = self.png_dir / (Path(file_name).stem + ".png")
        annotation = write_panoptic(png_path, segment_map, segments_info, self.meta, image_id=image_id)
        image = {"id": image_id, "file_name": Path(file_name).name, "height": int(height), "width": int(width)}
        self.images.append(image)
        self.annotations.append(annotation)
        return annotation

    def close(self) -> Path:
        return write_panoptic_json(self.json_path, self.images, self.annotations, self.meta)

    def __enter__(self) -> "PanopticJsonWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


def write_panoptic_json(
    json_path: str | os.PathLike, images: list[dict], annotations: list[dict], meta: DatasetMeta
) -> Path:
    """COCO panoptic JSON: images, annotations (one per PNG), categories with dataset ids."""
    return write_json(
        json_path, {"images": images, "annotations": annotations, "categories": coco_categories(meta)}
    )


# --- instances ---------------------------------------------------------------------------------
def instances_to_coco_json(image_id: Any, instances: dict, meta: DatasetMeta) -> list[dict]:
    """One image's instances -> COCO result records {image_id, category_id, segmentation RLE, score, bbox}.

    Collect the records of all images and save them with `write_json` (or use `InstanceJsonWriter`);
    the file loads with `COCO.loadRes` for COCOeval(iouType="segm").
    """
    return to_coco_results(image_id, instances, meta)


def write_coco_instances_json(
    json_path: str | os.PathLike, predictions: Iterable[tuple[Any, dict]], meta: DatasetMeta
) -> Path:
    """COCO results JSON for `(image_id, {"masks","labels","scores"})` pairs."""
    results: list[dict] = []
    for image_id, instances in predictions:
        results.extend(instances_to_coco_json(image_id, instances, meta))
    return write_json(json_path, results)


class InstanceJsonWriter:
    """Accumulates COCO result records image by image; `close()` writes the JSON list."""

    def __init__(self, json_path: str | os.PathLike, meta: DatasetMeta):
        self.json_path = Path(json_path)
        self.meta = meta
        self.results: list[dict] = []

    def add(self, image_id: Any, instances: dict) -> list[dict]:
        records = instances_to_coco_json(image_id, instances, self.meta)
        self.results.extend(records)
        return records

    def close(self) -> Path:
        return write_json(self.json_path, self.results)

    def __enter__(self) -> "InstanceJsonWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


# --- polygon formats (for correcting predictions in annotation tools) ------------------------------
def yolo_seg_text(instances: dict, width: int, height: int, *, scores: bool = False) -> str:
    """One image's instances as a YOLO-seg label file: "class x1 y1 ... xn yn [score]" per object, coordinates
    normalised; an object in several parts is one polygon joined by zero-area bridges (YOLO-seg holds one
    polygon per object). Class indices are the contiguous ids, i.e. the order of the data YAML's names."""
    from omniseg.data.formats.polygons import bridge

    lines = []
    for rings, label, score in zip(_instance_rings(instances), instances["labels"].tolist(),
                                   instances["scores"].tolist()):
        if not rings:
            continue
        xy = (bridge(rings) + 0.5) / np.array([width, height], dtype=np.float64)  # corner units, normalised
        line = f"{int(label)} " + " ".join(f"{v:.6f}" for v in xy.flatten())
        lines.append(line + (f" {float(score):.6f}" if scores else ""))
    return "".join(f"{line}\n" for line in lines)


def _instance_rings(instances: dict):
    """Each instance's outer boundaries (`polygons.trace`) in image coordinates, traced on its tight crop
    (dense masks and the CroppedMasks of tiled inference alike)."""
    from omniseg.data.formats.polygons import trace
    from omniseg.masks import mask_crops

    for crop, y, x in mask_crops(instances["masks"]):
        yield [ring + np.array([x, y], dtype=np.float64) for ring in trace(crop)]


def labelme_json(instances: dict, meta: DatasetMeta, image_name: str, width: int, height: int) -> dict:
    """One image's instances as a LabelMe file: a polygon per part of each object, the parts of one object
    sharing its group_id, the score in the description."""
    shapes = []
    for i, (rings, label, score) in enumerate(zip(_instance_rings(instances), instances["labels"].tolist(),
                                                  instances["scores"].tolist()), start=1):
        for ring in rings:
            shapes.append({"label": meta.classes[int(label)], "points": [[round(float(x), 3), round(float(y), 3)]
                                                                          for x, y in ring],
                           "group_id": i, "description": f"score {float(score):.4f}", "shape_type": "polygon",
                           "flags": {}})
    return {"version": "5.5.0", "flags": {}, "shapes": shapes, "imagePath": image_name, "imageData": None,
            "imageHeight": int(height), "imageWidth": int(width)}
