"""Readers for on-disk segmentation formats. Each dataset returns raw samples (see docs/design.md); the
file readers they share are in `files`."""

from omniseg.data.formats.coco_instance import CocoInstanceDataset
from omniseg.data.formats.coco_panoptic import CocoPanopticDataset
from omniseg.data.formats.files import (
    IMAGE_EXTENSIONS, MAX_IMAGE_PIXELS, MAX_JSON_BYTES, check_pixel_count, decode_rgb_image, load_json, load_png_array,
    load_rgb_image, malformed_entries, require_path,
)
from omniseg.data.formats.semantic_folder import PRESETS, SemanticFolderDataset

__all__ = [
    "CocoPanopticDataset",
    "CocoInstanceDataset",
    "SemanticFolderDataset",
    "PRESETS",
    "IMAGE_EXTENSIONS",
    "load_rgb_image",
    "decode_rgb_image",
    "load_png_array",
    "load_json",
    "require_path",
    "check_pixel_count",
    "malformed_entries",
    "MAX_IMAGE_PIXELS",
    "MAX_JSON_BYTES",
]
