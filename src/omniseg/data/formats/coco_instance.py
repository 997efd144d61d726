"""COCO instance format (instances_*.json): polygons, compressed and uncompressed RLE, crowd flags."""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from omniseg.data.errors import DataError
from omniseg.data.formats.files import check_pixel_count, load_json, load_rgb_image, malformed_entries, require_path
from omniseg.data.formats.coco_panoptic import meta_from_coco_categories
from omniseg.data.targets import boxes_from_masks


def decode_segmentation(segm, height: int, width: int) -> np.ndarray:
    """COCO `segmentation` (polygon list, RLE dict with str/bytes or list counts) -> uint8 [H,W]."""
    if isinstance(segm, list):
        # COCO polygons need >= 3 points; a few real annotations carry degenerate ones, skip those.
        polys = [p for p in segm if len(p) >= 6 and len(p) % 2 == 0]
        if not polys:
            return np.zeros((height, width), dtype=np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    elif isinstance(segm, dict) and "counts" in segm:
        if isinstance(segm["counts"], list):  # uncompressed RLE (crowd regions)
            rle = mask_utils.frPyObjects(segm, height, width)
        else:
            counts = segm["counts"]
            rle = {"size": segm["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    else:
        raise ValueError(f"unsupported segmentation type {type(segm).__name__}")
    with warnings.catch_warnings():  # pycocotools' numpy-2 __array__ DeprecationWarning is noise for users
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle)


class CocoInstanceDataset(Dataset):
    """COCO instance annotations; images without annotations are kept (they are valid negatives)."""

    def __init__(self, image_dir: str | os.PathLike, instances_json: str | os.PathLike, *, name: str | None = None):
        self.image_dir = require_path(image_dir, "image directory", is_dir=True)
        self.instances_json = require_path(instances_json, "instances JSON", is_dir=False)
        data = load_json(self.instances_json, "instances JSON")
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise DataError(self.instances_json, f"missing top-level key '{key}' (not a COCO instance JSON)")
        with malformed_entries(self.instances_json, "instances JSON"):
            self.meta = meta_from_coco_categories(data["categories"], name or Path(self.instances_json).stem,
                                                  force_thing=True)
            self.images = list(data["images"])
            known_images = {img["id"] for img in self.images}
            self.annotations: dict = defaultdict(list)
            for ann in data["annotations"]:
                if not self.meta.has_dataset_id(ann.get("category_id")):
                    raise DataError(self.instances_json, f"annotation {ann.get('id')} has category_id "
                                                         f"{ann.get('category_id')} which is not among the JSON categories")
                if ann.get("image_id") not in known_images:
                    raise DataError(self.instances_json, f"annotation {ann.get('id')} refers to image_id "
                                                         f"{ann.get('image_id')} which is not among the JSON images")
                if "segmentation" not in ann:
                    raise DataError(self.instances_json, f"annotation {ann.get('id')} has no 'segmentation'")
                self.annotations[ann["image_id"]].append(ann)

    def __len__(self) -> int:
        return len(self.images)

    def class_counts(self) -> list[int]:
        counts = [0] * self.meta.num_classes
        for anns in self.annotations.values():
            for a in anns:
                counts[self.meta.to_contiguous(a["category_id"])] += 1
        return counts

    def image_categories(self, index: int) -> set[int]:
        """The contiguous classes present in image `index`, from the JSON (for repeat-factor sampling)."""
        return {self.meta.to_contiguous(a["category_id"]) for a in self.annotations.get(self.images[index]["id"], [])}

    def load_instances(self, index: int) -> dict:
        """Decoded instances of one image, at the size recorded in the JSON."""
        img = self.images[index]
        with malformed_entries(self.instances_json, "instances JSON"):
            h, w = int(img["height"]), int(img["width"])
        check_pixel_count(self.instances_json, w, h, f"image {img.get('id')} (JSON height/width)")
        anns = self.annotations.get(img["id"], [])
        masks = np.zeros((len(anns), h, w), dtype=bool)
        for k, ann in enumerate(anns):
            try:
                masks[k] = decode_segmentation(ann["segmentation"], h, w).astype(bool)
            except Exception as e:  # pycocotools raises bare Exceptions on malformed RLE/size
                raise DataError(self.instances_json, f"annotation {ann.get('id')} (image {img['id']}): "
                                                     f"cannot decode segmentation: {e}") from None
        masks_t = torch.from_numpy(masks)
        # The annotated box when present (it is what COCO box metrics use), else the mask's box.
        if all(len(a.get("bbox") or []) == 4 for a in anns):
            xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
            boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        else:
            boxes = boxes_from_masks(masks_t)
        return {
            "masks": masks_t,
            "labels": torch.tensor([self.meta.to_contiguous(a["category_id"]) for a in anns], dtype=torch.int64),
            "boxes": boxes,
            "iscrowd": torch.tensor([bool(a.get("iscrowd", 0)) for a in anns], dtype=torch.bool),
        }

    def __getitem__(self, index: int) -> dict:
        img = self.images[index]
        image_path = self.image_dir / img["file_name"]
        image = load_rgb_image(image_path)
        h, w = int(image.shape[1]), int(image.shape[2])
        if (int(img.get("height", h)), int(img.get("width", w))) != (h, w):
            raise DataError(image_path, f"image is {w}x{h} (WxH) but {self.instances_json.name} records "
                                        f"{img.get('width')}x{img.get('height')}")
        return {
            "image": image,
            "file_name": str(image_path),
            "image_id": img["id"],
            "height": h,
            "width": w,
            "instances": self.load_instances(index),
        }
