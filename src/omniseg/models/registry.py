"""Model construction from a config, and the table of named presets shown by `omniseg models`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

# arch name -> builder(model_cfg, num_classes, thing_ids). Families register themselves here.
_BUILDERS = {}


def register_arch(*names: str):
    def deco(fn):
        for n in names:
            _BUILDERS[n] = fn
        return fn

    return deco


@register_arch("mask2former", "maskformer")
def _build_maskformer(cfg: Mapping, num_classes: int, thing_ids: Sequence[int]) -> nn.Module:
    from omniseg.models.maskformer.model import MaskFormer

    return MaskFormer(cfg, num_classes=num_classes, thing_ids=thing_ids)


@register_arch("oneformer")
def _build_oneformer(cfg: Mapping, num_classes: int, thing_ids: Sequence[int]) -> nn.Module:
    from omniseg.models.oneformer.model import OneFormer

    return OneFormer(cfg, num_classes=num_classes, thing_ids=thing_ids)


@register_arch("fcn", "pspnet", "danet", "deeplabv3", "gscnn", "upernet")
def _build_per_pixel(cfg: Mapping, num_classes: int, thing_ids: Sequence[int]) -> nn.Module:
    from omniseg.models.per_pixel import PerPixelSegmenter

    return PerPixelSegmenter(cfg, num_classes=num_classes, thing_ids=thing_ids)


@register_arch("segvit")
def _build_segvit(cfg: Mapping, num_classes: int, thing_ids: Sequence[int]) -> nn.Module:
    from omniseg.models.segvit.model import SegViT

    return SegViT(cfg, num_classes=num_classes, thing_ids=thing_ids)


@register_arch("maskrcnn", "panet")
def _build_rcnn(cfg: Mapping, num_classes: int, thing_ids: Sequence[int]) -> nn.Module:
    from omniseg.models.rcnn.model import RCNNSegmenter

    return RCNNSegmenter(cfg, num_classes=num_classes, thing_ids=thing_ids)


@register_arch("blendmask")
def _build_blendmask(cfg: Mapping, num_classes: int, thing_ids: Sequence[int]) -> nn.Module:
    from omniseg.models.blendmask.model import BlendMask

    return BlendMask(cfg, num_classes=num_classes, thing_ids=thing_ids)


def build_model(model_cfg: Mapping, num_classes: int, thing_ids: Sequence[int] = ()) -> nn.Module:
    arch = model_cfg.get("arch", "mask2former")
    if arch not in _BUILDERS:
        raise ValueError(f"unknown model arch {arch!r}; known: {sorted(_BUILDERS)}")
    return _BUILDERS[arch](model_cfg, num_classes, thing_ids)


def available_archs() -> list[str]:
    return sorted(_BUILDERS)
