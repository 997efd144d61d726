"""Ultralytics YOLO-seg: images + one .txt per image ("class x1 y1 x2 y2 ... [confidence]", coordinates
normalised to the image size, a polygon per object) + the data YAML naming the classes and the splits.

Layout (Ultralytics'): `<path>/images/<split>/*.jpg` with labels at the same place under `labels/`; the
data YAML's `train` / `val` / `test` entries give the image folders relative to its `path`. An image
without a label file has no objects. Classes listed in `stuff_classes` become stuff: the sample then
also carries a panoptic map (see polygons.panoptic_sample), for panoptic and semantic training.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from torch.utils.data import Dataset

from omniseg.data.errors import DataError
from omniseg.data.formats.files import IMAGE_EXTENSIONS, load_rgb_image, require_path
from omniseg.data.formats.polygons import rasterize, region_annotations
from omniseg.data.meta import DatasetMeta


def read_data_yaml(path: str | os.PathLike) -> dict:
    """The data YAML: {"root": Path, "splits": {name: image folder}, "names": [class names]}."""
    from omegaconf import OmegaConf

    p = require_path(path, "YOLO data YAML", is_dir=False)
    try:
        data = OmegaConf.to_container(OmegaConf.load(p))
    except Exception as e:
        raise DataError(p, f"is not a readable YAML file ({e})") from None
    if not isinstance(data, dict) or "names" not in data:
        raise DataError(p, "a YOLO data YAML needs 'names' (the classes)")
    names = data["names"]
    if isinstance(names, dict):
        keys = sorted(int(k) for k in names)
        if keys != list(range(len(keys))):
            raise DataError(p, f"'names' keys must be 0..{len(keys) - 1}, got {keys[:10]}")
        names = [str(names[k]) for k in keys]
    root = Path(str(data.get("path") or "."))
    root = root if root.is_absolute() else p.parent / root
    splits = {k: root / str(data[k]) for k in ("train", "val", "test") if data.get(k)}
    return {"root": root, "splits": splits, "names": [str(n) for n in names]}


def label_path_for(image: Path, image_dir: Path, label_dir: Path) -> Path:
    return label_dir / image.relative_to(image_dir).with_suffix(".txt")


def read_yolo_label(path: Path, width: int, height: int, num_classes: int) -> tuple[list[int], list[list[float]], list[float]]:
    """(classes, polygons in corner pixel coordinates, confidences: 1.0 where the line has none)."""
    classes, polygons, scores = [], [], []
    if not path.is_file():
        return classes, polygons, scores
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        try:
            values = [float(v) for v in parts]
        except ValueError:
            raise DataError(path, f"line {number}: not numbers: {line[:60]!r}") from None
        cls, coords = values[0], values[1:]
        score = 1.0
        if len(coords) % 2:  # a trailing confidence (Ultralytics' save_conf)
            coords, score = coords[:-1], coords[-1]
        if cls != int(cls) or not 0 <= int(cls) < num_classes:
            raise DataError(path, f"line {number}: class {parts[0]} is not one of the {num_classes} classes")
        if len(coords) < 6:
            raise DataError(path, f"line {number}: a polygon needs at least 3 points, got {len(coords) // 2}")
        xy = np.asarray(coords).reshape(-1, 2)
        if xy.min() < 0 or xy.max() > 1:
            raise DataError(path, f"line {number}: coordinates must be normalised to 0..1")
        polygons.append((xy * [width, height]).flatten().tolist())
        classes.append(int(cls))
        scores.append(float(score))
    return classes, polygons, scores


class YoloSegDataset(Dataset):
    """YOLO-seg images and polygon labels (see the module docstring)."""

    def __init__(self, image_dir: str | os.PathLike, label_dir: str | os.PathLike | None, classes: Sequence[str], *,
                 stuff_classes: Sequence[str] = (), name: str | None = None):
        self.image_dir = require_path(image_dir, "image directory", is_dir=True)
        self.label_dir = Path(label_dir) if label_dir else _labels_beside(self.image_dir)
        unknown = sorted(set(stuff_classes) - set(classes))
        if unknown:
            raise DataError(self.image_dir, f"stuff_classes {unknown} are not among the classes {list(classes)}")
        self.meta = DatasetMeta(list(classes), isthing=[c not in set(stuff_classes) for c in classes],
                                name=name or self.image_dir.name)
        self.panoptic = bool(stuff_classes)
        self.images = sorted(p for p in self.image_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.images:
            raise DataError(self.image_dir, "no images found")

    def __len__(self) -> int:
        return len(self.images)

    def image_categories(self, index: int) -> set[int]:
        """The classes in image `index`'s label file (the image is not decoded)."""
        label = label_path_for(self.images[index], self.image_dir, self.label_dir)
        if not label.is_file():
            return set()
        return {int(float(line.split()[0])) for line in label.read_text().splitlines() if line.split()}

    def __getitem__(self, index: int) -> dict:
        image_path = self.images[index]
        image = load_rgb_image(image_path)
        h, w = int(image.shape[1]), int(image.shape[2])
        label = label_path_for(image_path, self.image_dir, self.label_dir)
        classes, polygons, _ = read_yolo_label(label, w, h, self.meta.num_classes)
        masks = [rasterize([p], h, w, centres=False) for p in polygons]
        sample = {"image": image, "file_name": str(image_path), "image_id": image_path.stem, "height": h, "width": w}
        sample.update(region_annotations(masks, classes, self.meta, h, w, self.panoptic))
        return sample


def _labels_beside(image_dir: Path) -> Path:
    """Ultralytics' rule: the labels of .../images/<split> are in .../labels/<split>."""
    parts = list(image_dir.parts)
    if "images" not in parts:
        raise DataError(image_dir, "give data.<split>.label_dir: the image folder has no 'images' component to "
                                   "replace by 'labels'")
    i = len(parts) - 1 - parts[::-1].index("images")
    return Path(*parts[:i], "labels", *parts[i + 1:])
