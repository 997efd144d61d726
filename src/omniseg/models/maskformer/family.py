"""The mask-classification family's settings (MaskFormer, Mask2Former, and MP-Former's training) and its
registration. Defaults are Mask2Former's official COCO R-50 values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from omniseg.models.mp_former.settings import PilotSettings
from omniseg.models.registry import Family
from omniseg.models.settings import ModelSettings
from omniseg.schema import choice


@dataclass
class MaskFormerLoss:
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    class_weights: Optional[List[float]] = None  # per-class weights of the classification CE (K entries)
    mask_loss: str = choice("bce", ("bce", "focal"))  # bce: Mask2Former; focal: MaskFormer
    train_num_points: int = 12544      # points each mask loss is computed on (Mask2Former; 0: whole masks)
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    deep_supervision: bool = True      # losses after every decoder layer


@dataclass
class MaskFormerTest:
    object_mask_threshold: float = 0.8
    overlap_threshold: float = 0.8
    topk: int = 100                    # instance predictions per image
    postprocess: str = choice("official", ("official", "fast"))  # fast: same decisions, no full-size mask stacks


@dataclass
class MaskFormerSettings(ModelSettings):
    arch: str = choice("mask2former", ("mask2former", "maskformer"))
    hidden_dim: int = 256
    num_queries: int = 100
    nheads: int = 8
    dim_feedforward: int = 2048
    dec_layers: int = 9                # decoder layers built (MaskFormer's DETR decoder: 6)
    dropout: float = 0.0
    pre_norm: bool = False
    enforce_input_project: bool = False
    enc_layers: int = 6                # MSDeformAttn encoder layers (Mask2Former) / res5 encoder (MaskFormer)
    enc_dim_feedforward: int = 1024
    enc_num_points: int = 4
    common_stride: int = 4
    conv_dim: int = 256
    mask_dim: int = 256
    loss: MaskFormerLoss = field(default_factory=MaskFormerLoss)
    mp: PilotSettings = field(default_factory=PilotSettings)  # MP-Former (arch mask2former; training only)
    test: MaskFormerTest = field(default_factory=MaskFormerTest)


def describe(s: MaskFormerSettings) -> tuple[str, str]:
    arch = "mp_former" if s.mp.enabled else s.arch
    return arch, f"{s.num_queries} queries, {s.dec_layers} decoder layers"


FAMILY = Family(name="maskformer", archs=("mask2former", "maskformer"), settings=MaskFormerSettings,
                model="omniseg.models.maskformer.model:MaskFormer", describe=describe)
