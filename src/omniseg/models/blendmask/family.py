"""BlendMask's settings (FCOS + bottom module + blender; standard, RT and panoptic variants) and its
registration. Defaults are AdelaiDet's configs/BlendMask/R_50_1x values; a structural key left null takes
the variant's value (VARIANTS), so `variant: rt` alone gives BlendMask-RT."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import List, Optional

from omniseg.models.registry import Family
from omniseg.models.settings import ModelSettings
from omniseg.schema import choice

# The structural values each variant implies (AdelaiDet configs/BlendMask/{R_50_1x, Base-550 with a BN head,
# Panoptic/R_50_3x}); rt's P3-P6 and M = 7 are the paper's RT model, AdelaiDet's released RT configs
# (RT_R_50_4x_*_shtw on Base-RT) read P3-P5 with ATTN_SIZE 14, which the blendmask_rt_r50 preset sets.
VARIANTS = {
    "standard": dict(num_levels=5, attn_size=14, num_cls_convs=4, num_box_convs=4, num_share_convs=0,
                     tower_norm="gn", basis_num_convs=3, sizes_of_interest=[64, 128, 256, 512]),
    "rt": dict(num_levels=4, attn_size=7, num_cls_convs=0, num_box_convs=0, num_share_convs=3,
               tower_norm="bn", basis_num_convs=2, sizes_of_interest=[64, 128, 256]),
}
VARIANTS["panoptic"] = dict(VARIANTS["standard"])


@dataclass
class BlendMaskTest:
    score_threshold: float = 0.05      # cls * ctr before NMS (THRESH_WITH_CTR); score = sqrt(cls * ctr)
    pre_nms_topk: int = 1000           # per level
    nms_threshold: float = 0.6         # class-wise
    detections_per_image: int = 100    # D: top detections blended and pasted
    mask_threshold: float = 0.5        # on the pasted mask probabilities
    instance_score_threshold: float = 0.5  # panoptic merge (detectron2 0.5 / 0.5 / 4096; AdelaiDet's
    overlap_threshold: float = 0.5         # Base-Panoptic 0.45 / 0.4 / 4096, see blendmask_panoptic_r50)
    stuff_area_threshold: int = 4096       # stuff segments smaller than this (output pixels) become void


@dataclass
class BlendMaskOptions:
    num_levels: Optional[int] = choice(None, (None, 3, 4, 5))  # FCOS levels read: 5 = P3-P7 (rt: 4 = P3-P6); 3 = P3-P5
    sizes_of_interest: Optional[List[float]] = None  # max(l,t,r,b) split points between levels
    center_sample_radius: float = 1.5  # positives within 1.5 strides of the box centre (clipped to the box)
    num_cls_convs: Optional[int] = None  # cls tower depth: 4 (rt: 0)
    num_box_convs: Optional[int] = None  # box tower depth: 4 (rt: 0)
    num_share_convs: Optional[int] = None  # tower shared by cls and box before them: 0 (rt: 3)
    tower_norm: Optional[str] = choice(None, (None, "gn", "bn"))  # gn: GroupNorm shared over levels; bn: one per level
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    num_bases: int = 4                 # K
    attn_size: Optional[int] = None    # M: top-level attentions K x M x M per location: 14 (rt: 7)
    bottom_resolution: int = 56        # R: RoIAlign of the bases (stride 4) and the mask size
    basis_channels: int = 128          # bottom module width
    basis_num_convs: Optional[int] = None  # convs after the level fusion: 3 (rt: 2)
    aux_semantic_weight: float = 0.3   # auxiliary thing-semantic CE on P3 (training only); 0 removes the head
    stuff_weight: float = 0.5          # panoptic: weight of the stuff branch's CE (SEM_SEG_HEAD.LOSS_WEIGHT)
    # panoptic stuff branch: "basis" = 1 conv block + 1x1 on the bottom module's stride-4 features; "panoptic_fpn" =
    # detectron2's Panoptic-FPN semantic head on P2-P5 (the FPN then also builds P2), AdelaiDet's released model
    stuff_head: str = choice("basis", ("basis", "panoptic_fpn"))
    stuff_channels: int = 128          # panoptic_fpn: width of its conv blocks (SEM_SEG_HEAD.CONVS_DIM)
    class_weights: Optional[List[float]] = None  # per-class weights (K entries): FCOS focal loss, stuff CE
    test: BlendMaskTest = field(default_factory=BlendMaskTest)

    def for_variant(self, variant: str) -> "BlendMaskOptions":
        """These options with every null structural key replaced by `variant`'s value."""
        implied = VARIANTS[variant]
        return replace(self, **{f.name: implied[f.name] for f in fields(self)
                                if f.name in implied and getattr(self, f.name) is None})


@dataclass
class BlendMaskSettings(ModelSettings):
    arch: str = choice("blendmask", ("blendmask",))
    variant: str = choice("standard", tuple(VARIANTS))  # rt: BlendMask-RT; panoptic: + stuff branch, Panoptic-FPN merge
    backbone_freeze_at: int = 2
    fpn_channels: int = 256            # FPN P3-P7 width; FCOS towers and top layer use it too
    blendmask: BlendMaskOptions = field(default_factory=BlendMaskOptions)


def describe(s: BlendMaskSettings) -> tuple[str, str]:
    return s.arch, f"FCOS + blender, variant {s.variant}"


FAMILY = Family(name="blendmask", archs=("blendmask",), settings=BlendMaskSettings,
                model="omniseg.models.blendmask.model:BlendMask", describe=describe)
