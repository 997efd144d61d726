"""Per-pixel classification family: FCN, PSPNet, DANet, DeepLabV3, Gated-SCNN; FastFCN's JPU neck."""

from omniseg.models.per_pixel.model import ARCHS, PerPixelSegmenter, label_map_from_targets

__all__ = ["ARCHS", "PerPixelSegmenter", "label_map_from_targets"]
