"""Per-pixel classification family: FCN, PSPNet, DANet, DeepLabV3, Gated-SCNN; FastFCN's JPU neck."""

from omniseg.models.base import label_map_from_targets
from omniseg.models.per_pixel.family import ARCHS, PerPixelSettings
from omniseg.models.per_pixel.model import PerPixelSegmenter

__all__ = ["ARCHS", "PerPixelSegmenter", "PerPixelSettings", "label_map_from_targets"]
