"""BlendMask (FCOS + blender) instance / panoptic segmentation; see model.py."""

from omniseg.models.blendmask.model import BlendMask

__all__ = ["BlendMask"]
