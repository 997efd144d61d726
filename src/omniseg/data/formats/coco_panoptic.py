"""COCO panoptic format: a JSON of segments_info per image plus PNGs with id = R + 256*G + 256^2*B."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from omniseg.data.errors import DataError
from omniseg.data.formats.files import (check_same_size, load_json, load_png_array, load_rgb_image, malformed_entries,
                                   require_path)
from omniseg.data.meta import DatasetMeta
from omniseg.data.targets import instances_from_panoptic, semantic_from_panoptic


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """Panoptic PNG colour -> segment id (panopticapi convention)."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    return np.stack([ids % 256, (ids // 256) % 256, (ids // 65536) % 256], axis=-1).astype(np.uint8)


def meta_from_coco_categories(categories: list[dict], name: str, force_thing: bool = False) -> DatasetMeta:
    """Categories in JSON order become contiguous ids 0..K-1 (detectron2 does the same)."""
    colors = None
    if categories and all("color" in c for c in categories):
        colors = [tuple(c["color"]) for c in categories]
    return DatasetMeta(
        classes=[str(c["name"]) for c in categories],
        isthing=[True if force_thing else bool(c.get("isthing", 1)) for c in categories],
        dataset_ids=[int(c["id"]) for c in categories],
        colors=colors,
        name=name,
    )


class CocoPanopticDataset(Dataset):
    """COCO panoptic images; samples carry pan_seg + segments_info and the derived sem_seg / instances.

    `derive` picks which derived annotations are added (they cost one pass over the map each).
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        panoptic_json: str | os.PathLike,
        panoptic_png_dir: str | os.PathLike,
        *,
        derive: Sequence[str] = ("sem_seg", "instances"),
        name: str | None = None,
    ):
        self.image_dir = require_path(image_dir, "image directory", is_dir=True)
        self.panoptic_json = require_path(panoptic_json, "panoptic JSON", is_dir=False)
        self.panoptic_png_dir = require_path(panoptic_png_dir, "panoptic PNG directory", is_dir=True)
        self.derive = tuple(derive)
        data = load_json(self.panoptic_json, "panoptic JSON")
        for key in ("annotations", "categories"):
            if key not in data:
                raise DataError(self.panoptic_json, f"missing top-level key '{key}' (not a COCO panoptic JSON)")
        with malformed_entries(self.panoptic_json, "panoptic JSON"):
            self.meta = meta_from_coco_categories(data["categories"], name or Path(self.panoptic_json).stem)
            images = {img["id"]: img for img in data.get("images", [])}
            self.records: list[dict] = []
            for ann in data["annotations"]:
                img = images.get(ann["image_id"], {})
                segments = []
                for s in ann.get("segments_info", []):
                    cid = s.get("category_id")
                    if not self.meta.has_dataset_id(cid):
                        raise DataError(
                            self.panoptic_json,
                            f"image {ann['image_id']}: segment {s.get('id')} has category_id {cid} "
                            f"which is not among the JSON categories",
                        )
                    contiguous = self.meta.to_contiguous(cid)
                    segments.append({
                        "id": int(s["id"]),
                        "category": contiguous,
                        "isthing": bool(self.meta.isthing[contiguous]),
                        "iscrowd": bool(s.get("iscrowd", 0)),
                    })
                image_name = img.get("file_name") or Path(ann["file_name"]).with_suffix(".jpg").name
                self.records.append({
                    "image_id": ann["image_id"],
                    "image_file": image_name,
                    "png_file": ann["file_name"],
                    "segments_info": segments,
                })

    def __len__(self) -> int:
        return len(self.records)

    def class_counts(self) -> list[int]:
        """Segments per contiguous class, straight from the JSON."""
        counts = [0] * self.meta.num_classes
        for r in self.records:
            for s in r["segments_info"]:
                counts[s["category"]] += 1
        return counts

    def image_categories(self, index: int) -> set[int]:
        """The contiguous classes present in image `index`, from the JSON (for repeat-factor sampling)."""
        return {s["category"] for s in self.records[index]["segments_info"]}

    def load_panoptic(self, index: int) -> tuple[torch.Tensor, list[dict], Path]:
        """pan_seg int64 [H,W] and its segments_info, checked against each other."""
        rec = self.records[index]
        png_path = self.panoptic_png_dir / rec["png_file"]
        arr = load_png_array(png_path, "panoptic PNG")
        if arr.ndim != 3 or arr.shape[2] < 3:
            raise DataError(png_path, f"panoptic PNG must be RGB (id = R + 256*G + 256^2*B), got shape {arr.shape}")
        ids = rgb_to_id(arr[..., :3])
        present = set(np.unique(ids).tolist()) - {0}
        listed = {s["id"] for s in rec["segments_info"]}
        if present - listed:
            raise DataError(png_path, f"segment ids {sorted(present - listed)} appear in the PNG but have no "
                                      f"segments_info entry in {self.panoptic_json.name}")
        if listed - present:
            raise DataError(png_path, f"segments_info ids {sorted(listed - present)} in {self.panoptic_json.name} "
                                      f"do not appear in the PNG")
        return torch.from_numpy(ids), [dict(s) for s in rec["segments_info"]], png_path

    def __getitem__(self, index: int) -> dict:
        rec = self.records[index]
        image_path = self.image_dir / rec["image_file"]
        image = load_rgb_image(image_path)
        pan_seg, segments_info, png_path = self.load_panoptic(index)
        check_same_size(png_path, tuple(pan_seg.shape), image_path, tuple(image.shape[-2:]))
        sample = {
            "image": image,
            "file_name": str(image_path),
            "image_id": rec["image_id"],
            "height": int(image.shape[1]),
            "width": int(image.shape[2]),
            "pan_seg": pan_seg,
            "segments_info": segments_info,
        }
        if "sem_seg" in self.derive:
            sample["sem_seg"] = semantic_from_panoptic(pan_seg, segments_info, self.meta.ignore_index)
        if "instances" in self.derive:
            sample["instances"] = instances_from_panoptic(pan_seg, segments_info)
        return sample
