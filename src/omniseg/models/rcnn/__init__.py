"""Two-stage instance segmentation on torchvision's Mask R-CNN: the Mask R-CNN baseline and PANet."""

from omniseg.models.rcnn.model import RCNNSegmenter

__all__ = ["RCNNSegmenter"]
