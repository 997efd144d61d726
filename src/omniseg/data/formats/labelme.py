"""LabelMe: one JSON per image ({"imagePath", "imageHeight", "imageWidth", "shapes": [{"label", "points",
"shape_type", "group_id"}]}), usually beside the image.

Region shapes are read: polygon, rectangle, circle and mask (LabelMe 5's bitmap shape). Shapes that share
a label and a non-null group_id are one object. Points are pixel-centre coordinates; a pixel belongs to a
polygon when its centre is inside (polygons.py), so LabelMe's own drawing, which adds the outline, can
differ by a pixel at borders; a rectangle includes its corner pixels, as LabelMe draws it. Lines and points mark no region and are refused, naming the file. Classes
are the given list, or every label found, sorted. `stuff_classes` make the sample panoptic (as yolo.py).
"""

from __future__ import annotations

import base64
import io
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from omniseg.data.errors import DataError
from omniseg.data.formats.files import load_json, load_rgb_image, malformed_entries, require_path
from omniseg.data.formats.polygons import rasterize, region_annotations
from omniseg.data.meta import DatasetMeta

REGION_SHAPES = ("polygon", "rectangle", "circle", "mask")


def shape_mask(shape: dict, height: int, width: int, path: Path) -> np.ndarray:
    """One LabelMe shape -> bool [H, W]."""
    kind = shape.get("shape_type") or "polygon"
    points = np.asarray(shape.get("points") or [], dtype=np.float64).reshape(-1, 2)
    if kind == "polygon":
        if len(points) < 3:
            raise DataError(path, f"shape '{shape.get('label')}': a polygon needs at least 3 points")
        return rasterize([points.flatten().tolist()], height, width)
    if kind == "rectangle":  # corner pixels included, as LabelMe draws it
        (x0, y0), (x1, y1) = points.min(0) - 0.5, points.max(0) + 0.5
        return rasterize([[x0, y0, x1, y0, x1, y1, x0, y1]], height, width)
    if kind == "circle":
        (cx, cy), (px, py) = points[:2]
        r = math.hypot(px - cx, py - cy)
        angles = np.linspace(0, 2 * math.pi, 64, endpoint=False)
        return rasterize([np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], 1).flatten().tolist()],
                         height, width)
    if kind == "mask":  # a bitmap of the box points[0] .. points[1]
        try:
            bitmap = np.array(Image.open(io.BytesIO(base64.b64decode(shape["mask"])))).astype(bool)
        except Exception as e:  # base64 or PNG errors
            raise DataError(path, f"shape '{shape.get('label')}': unreadable mask ({e})") from None
        x0, y0 = (int(round(v)) for v in points.min(0))
        out = np.zeros((height, width), dtype=bool)
        h, w = bitmap.shape[:2]
        out[y0:y0 + h, x0:x0 + w] = bitmap[: max(0, height - y0), : max(0, width - x0)]
        return out
    raise DataError(path, f"shape '{shape.get('label')}' is a {kind}, which marks no region (readable: "
                          f"{', '.join(REGION_SHAPES)})")


class LabelMeDataset(Dataset):
    """LabelMe JSONs in `label_dir` (default: the image folder) for the images in `image_dir`."""

    def __init__(self, image_dir: str | os.PathLike, label_dir: str | os.PathLike | None = None,
                 classes: Sequence[str] | None = None, *, stuff_classes: Sequence[str] = (), name: str | None = None):
        self.image_dir = require_path(image_dir, "image directory", is_dir=True)
        self.label_dir = require_path(label_dir or image_dir, "LabelMe JSON folder", is_dir=True)
        self.files = sorted(self.label_dir.rglob("*.json"))
        if not self.files:
            raise DataError(self.label_dir, "no LabelMe JSON files")
        self.records = []
        found = set()
        for f in self.files:
            data = load_json(f, "LabelMe JSON")
            with malformed_entries(f, "LabelMe JSON"):
                shapes = list(data["shapes"])
                image = self.image_dir / Path(data["imagePath"]).name if data.get("imagePath") else None
                found |= {str(s["label"]) for s in shapes}
            if image is None or not image.is_file():
                raise DataError(f, f"its image {data.get('imagePath')!r} is not in {self.image_dir}")
            self.records.append((f, image, data))
        names = list(classes) if classes else sorted(found)
        unknown = sorted(found - set(names))
        if unknown:
            where = next(f for f, _, d in self.records if {str(s["label"]) for s in d["shapes"]} & set(unknown))
            raise DataError(where, f"labels {unknown[:5]} are not among the classes {names}")
        bad_stuff = sorted(set(stuff_classes) - set(names))
        if bad_stuff:
            raise DataError(self.label_dir, f"stuff_classes {bad_stuff} are not among the classes {names}")
        self.meta = DatasetMeta(names, isthing=[c not in set(stuff_classes) for c in names],
                                name=name or self.image_dir.name)
        self.panoptic = bool(stuff_classes)

    def __len__(self) -> int:
        return len(self.records)

    def image_categories(self, index: int) -> set[int]:
        """The classes of image `index`'s shapes (the image is not decoded)."""
        return {self.meta.classes.index(str(shape["label"])) for shape in self.records[index][2]["shapes"]}

    def __getitem__(self, index: int) -> dict:
        path, image_path, data = self.records[index]
        image = load_rgb_image(image_path)
        h, w = int(image.shape[1]), int(image.shape[2])
        with malformed_entries(path, "LabelMe JSON"):
            if (int(data.get("imageHeight", h)), int(data.get("imageWidth", w))) != (h, w):
                raise DataError(path, f"records {data.get('imageWidth')}x{data.get('imageHeight')} (WxH) but "
                                      f"{image_path.name} is {w}x{h}")
            groups: dict = {}
            for n, shape in enumerate(data["shapes"]):
                key = (str(shape["label"]), shape.get("group_id")) if shape.get("group_id") is not None else n
                mask = shape_mask(shape, h, w, path)
                if key in groups:
                    groups[key][1] |= mask
                else:
                    groups[key] = [self.meta.classes.index(str(shape["label"])), mask]
        classes = [c for c, _ in groups.values()]
        masks = [m for _, m in groups.values()]
        sample = {"image": image, "file_name": str(image_path), "image_id": image_path.stem, "height": h, "width": w}
        sample.update(region_annotations(masks, classes, self.meta, h, w, self.panoptic))
        return sample
