"""Readers for on-disk segmentation formats. Each dataset returns raw samples (see docs/design.md).

The file readers below are shared by every format so that a corrupt or missing file always surfaces
as a DataError naming that file, whatever format it belongs to.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from omniseg.data.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def require_path(path: str | os.PathLike, what: str, *, is_dir: bool | None = None) -> Path:
    """Fail early with the path in the message instead of a bare FileNotFoundError later."""
    p = Path(path)
    if not p.exists():
        raise DataError(p, f"{what} does not exist")
    if is_dir is True and not p.is_dir():
        raise DataError(p, f"{what} must be a directory")
    if is_dir is False and not p.is_file():
        raise DataError(p, f"{what} must be a file")
    return p


def load_json(path: str | os.PathLike, what: str = "annotation file") -> dict:
    p = require_path(path, what, is_dir=False)
    try:
        with open(p, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(p, f"{what} is not valid JSON ({e})") from None


def load_rgb_image(path: str | os.PathLike) -> torch.Tensor:
    """uint8 [3,H,W] RGB, EXIF orientation applied (phone photos are often stored rotated)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(p, "image file does not exist")
    try:
        with Image.open(p) as im:
            im = ImageOps.exif_transpose(im)
            arr = np.array(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(p, f"cannot read image (corrupt or not an image): {e}") from None
    # numpy transposes small images far faster than a multi-threaded torch copy.
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def load_png_array(path: str | os.PathLike, what: str = "label PNG") -> np.ndarray:
    """Raw pixel values of a label/panoptic PNG (no colour conversion, no EXIF rotation)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(p, f"{what} does not exist")
    try:
        with Image.open(p) as im:
            im.load()
            arr = np.array(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(p, f"cannot read {what} (corrupt or not an image): {e}") from None
    return arr


def check_same_size(label_path: str | os.PathLike, label_hw: tuple[int, int], image_path, image_hw) -> None:
    if tuple(label_hw) != tuple(image_hw):
        raise DataError(
            label_path,
            f"size {label_hw[1]}x{label_hw[0]} (WxH) differs from its image {Path(image_path).name} "
            f"({image_hw[1]}x{image_hw[0]})",
        )


from omniseg.data.formats.coco_instance import CocoInstanceDataset  # noqa: E402
from omniseg.data.formats.coco_panoptic import CocoPanopticDataset  # noqa: E402
from omniseg.data.formats.semantic_folder import PRESETS, SemanticFolderDataset  # noqa: E402

__all__ = [
    "CocoPanopticDataset",
    "CocoInstanceDataset",
    "SemanticFolderDataset",
    "PRESETS",
    "load_rgb_image",
    "load_png_array",
    "load_json",
    "require_path",
]
