"""A classification set cut from an instance-annotated dataset: one square crop per thing instance.

PSSL needs a classification dataset (ImageNet in the paper). Here we can build one from any COCO
instance / panoptic dataset, including the built-in synthetic one, so the whole pipeline runs offline.
Crops keep some context around the object because saliency is only informative when the classifier
had to find the object inside a larger picture.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from omniseg.data.errors import DataError

CROPS_MARKER = ".omniseg_pssl_crops"
INSTANCE_FORMATS = ("synthetic", "coco_panoptic", "coco_instance")


@dataclass
class CropReport:
    out_dir: Path
    written: int = 0
    skipped_small: int = 0
    skipped_crowd: int = 0
    per_class: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        classes = ", ".join(f"{k}: {v}" for k, v in sorted(self.per_class.items()))
        return (f"{self.written} crops in {len(self.per_class)} class folders ({classes}) in {self.out_dir}; "
                f"skipped {self.skipped_small} instance(s) below the minimum area and {self.skipped_crowd} crowd region(s)")


def dataset_cfg_from_root(root: str | os.PathLike, fmt: str = "auto", split: str = "train") -> dict:
    """A build_dataset config for a dataset folder; `auto` recognises the synthetic set and the
    standard COCO layouts. Never generates data: a missing dataset is an error, not a download."""
    from omniseg.data.synthetic import existing_manifest

    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "dataset root does not exist or is not a directory")
    if fmt not in ("auto",) + INSTANCE_FORMATS:
        raise ValueError(f"format must be auto or one of {INSTANCE_FORMATS}, got {fmt!r}")
    manifest = existing_manifest(root) if fmt in ("auto", "synthetic") else None
    if manifest is not None:
        keys = ("num_train", "num_val", "image_size", "seed")
        return {"format": "synthetic", "root": str(root), **{k: manifest[k] for k in keys}}
    if fmt == "synthetic":
        raise DataError(root, "is not a finished synthetic dataset (write one with `omniseg data synth`)")
    if fmt == "auto":
        if (root / f"annotations/panoptic_{split}2017.json").is_file():
            fmt = "coco_panoptic"
        elif (root / f"annotations/instances_{split}2017.json").is_file():
            fmt = "coco_instance"
        else:
            raise DataError(root, f"cannot tell the dataset format: no synthetic manifest.json, no "
                                  f"annotations/panoptic_{split}2017.json, no annotations/instances_{split}2017.json "
                                  f"(pass the format explicitly, or a full data config)")
    return {"format": fmt, "root": str(root)}


def square_window(box: tuple[int, int, int, int], margin: float, height: int, width: int) -> tuple[int, int, int]:
    """(top, left, side) of the square crop around an inclusive (x0, y0, x1, y1) box.

    side = longer box side * (1 + margin), at most the longer image side; the window is shifted to lie
    inside the image where it fits (real context rather than padding), centred on the box otherwise.
    """
    x0, y0, x1, y1 = box
    w, h = x1 - x0 + 1, y1 - y0 + 1
    side = min(max(1, math.ceil(max(w, h) * (1.0 + margin))), max(height, width))

    def place(lo: int, hi: int, size: int) -> int:
        start = round((lo + hi + 1) / 2 - side / 2)
        if side <= size:
            return min(max(start, 0), size - side)
        return (size - side) // 2  # larger than the image: centred, the rest is padded

    return place(y0, y1, height), place(x0, x1, width), side


def crop_resize(image: torch.Tensor, top: int, left: int, side: int, size: int) -> torch.Tensor:
    """uint8 [3,H,W] -> uint8 [3,size,size]; outside the image is edge-replicated (no black frames
    a classifier could learn), then an antialiased bilinear resize."""
    _, h, w = image.shape
    pad = (max(0, -left), max(0, left + side - w), max(0, -top), max(0, top + side - h))
    x = image.float()
    if any(pad):
        x = F.pad(x[None], pad, mode="replicate")[0]
        top, left = top + pad[2], left + pad[0]
    x = x[:, top:top + side, left:left + side]
    if side != size:
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    return x.round().clamp(0, 255).to(torch.uint8)


def prepare_out_dir(out_dir: Path, marker: str, overwrite: bool, what: str) -> None:
    """Refuse to mix outputs with existing files; `overwrite` only ever deletes a folder we wrote."""
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise DataError(out_dir, f"output folder is not empty (overwrite=True / --overwrite replaces "
                                     f"earlier {what})")
        if not (out_dir / marker).exists():
            raise DataError(out_dir, f"output folder is not empty and was not written by omniseg pssl ({what}); "
                                     f"refusing to delete it")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / marker).write_text(f"written by omniseg.pssl ({what})\n")


def _safe(name: object) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(name))


def make_crops(dataset_cfg_or_root, out_dir: str | os.PathLike, *, split: str = "train", fmt: str = "auto",
               size: int = 64, margin: float = 0.5, min_area: int = 32, overwrite: bool = False,
               progress=None) -> CropReport:
    """Write a square `size` px PNG crop of every non-crowd thing instance to out_dir/<class_name>/.

    `dataset_cfg_or_root`: a build_dataset config dict (coco_panoptic / coco_instance / synthetic) or a
    dataset folder (format from `fmt`). Instances whose visible mask has fewer than `min_area` pixels
    are skipped and counted. Files are named <split>_<image id>_<instance index>.png; the output depends
    only on the dataset and the arguments.
    """
    from omniseg.data.build import build_dataset
    from omniseg.data.formats import CocoPanopticDataset

    if size < 8:
        raise ValueError(f"crop size must be at least 8 px, got {size}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if isinstance(dataset_cfg_or_root, (str, os.PathLike)):
        cfg = dataset_cfg_from_root(dataset_cfg_or_root, fmt, split)
    else:
        from omniseg.data.build import as_plain_dict

        cfg = as_plain_dict(dataset_cfg_or_root)
    if cfg.get("format") not in INSTANCE_FORMATS:
        raise ValueError(f"crops need instance annotations: format must be one of {INSTANCE_FORMATS}, "
                         f"got {cfg.get('format')!r}")
    dataset = build_dataset(cfg, split)
    if isinstance(dataset, CocoPanopticDataset):
        dataset.derive = ("instances",)  # the semantic map is not needed here
    classes = dataset.meta.classes
    out = Path(out_dir)
    prepare_out_dir(out, CROPS_MARKER, overwrite, "crops")
    report = CropReport(out_dir=out)
    indices = range(len(dataset))
    if progress is not None:
        indices = progress(indices)
    for i in indices:
        sample = dataset[i]
        inst = sample["instances"]
        image = sample["image"]
        _, h, w = image.shape
        for k in range(len(inst["labels"])):
            if bool(inst["iscrowd"][k]):
                report.skipped_crowd += 1
                continue
            mask = inst["masks"][k]
            if mask.shape != (h, w):
                raise DataError(sample["file_name"], f"instance mask is {tuple(mask.shape)}, image is {(h, w)}")
            area = int(mask.sum())
            if area < max(1, min_area):
                report.skipped_small += 1
                continue
            ys, xs = torch.nonzero(mask, as_tuple=True)
            box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
            top, left, side = square_window(box, margin, h, w)
            crop = crop_resize(image, top, left, side, size)
            name = classes[int(inst["labels"][k])].replace("/", "_").replace(os.sep, "_")  # one folder level
            class_dir = out / name
            class_dir.mkdir(exist_ok=True)
            file = class_dir / f"{_safe(split)}_{_safe(sample['image_id'])}_{k:03d}.png"
            Image.fromarray(np.ascontiguousarray(crop.permute(1, 2, 0).numpy())).save(file, compress_level=1)
            report.written += 1
            report.per_class[name] = report.per_class.get(name, 0) + 1
    return report
