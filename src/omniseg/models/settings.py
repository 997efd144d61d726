"""The model settings every family shares: the backbone, its initialisation and freezing, and the pixel
statistics the model normalises with. Each family's dataclass (models/<family>/family.py) extends
`ModelSettings` with its own keys and restates a shared default only where its papers differ."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, TypeVar

from omniseg.schema import choice, instantiate

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

S = TypeVar("S", bound="ModelSettings")


@dataclass
class ModelSettings:
    arch: str = ""                     # which family builds the model (models/registry.py)
    backbone: str = "resnet50"         # resnet18..101 | swin_t/s/b/l | vit_t/s/b/l, or any timm name
    backbone_norm: str = choice("frozen_bn", ("frozen_bn", "bn"))  # frozen_bn: ImageNet init; bn: from scratch
    backbone_weights: Optional[str] = None  # local timm / torchvision / HF file for the backbone
    backbone_kwargs: Dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model
    backbone_freeze_at: int = 0        # detectron2 FREEZE_AT (ResNets): 1 freezes the stem, 2 also res2, ...
    drop_path_rate: float = 0.0
    pixel_mean: List[float] = field(default_factory=lambda: list(IMAGENET_MEAN))  # 0-255 RGB
    pixel_std: List[float] = field(default_factory=lambda: list(IMAGENET_STD))
    activation_checkpointing: bool = False  # recompute activations in backward: less memory, ~1 more forward

    @classmethod
    def coerce(cls: type[S], settings: Any, source: str = "model settings") -> S:
        """`settings` as an instance of this class: an instance passes through; a (partial) mapping is
        checked key by key (unknown keys, types, choices) and completed with the declared defaults."""
        if isinstance(settings, cls):
            return settings
        if isinstance(settings, ModelSettings):
            raise TypeError(f"{cls.__name__} expected, got {type(settings).__name__}")
        if settings is not None and not isinstance(settings, Mapping):
            raise TypeError(f"model settings must be a {cls.__name__} or a mapping, got {type(settings).__name__}")
        return instantiate(cls, settings, prefix="model.", source=source)

    def backbone_options(self) -> dict:
        """The keyword arguments of `models.backbones.build_backbone` these settings give."""
        return dict(norm=self.backbone_norm, weights=self.backbone_weights, drop_path_rate=self.drop_path_rate,
                    freeze_at=self.backbone_freeze_at, **dict(self.backbone_kwargs or {}))
