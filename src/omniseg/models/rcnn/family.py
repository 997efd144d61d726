"""The two-stage instance family's settings (Mask R-CNN and PANet on torchvision's detection stack) and its
registration. Defaults are detectron2's / torchvision's R-50-FPN values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from omniseg.models.registry import Family
from omniseg.models.settings import ModelSettings
from omniseg.schema import choice


@dataclass
class RPNSettings:
    anchor_sizes: List[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])  # P2..P5 and the pooled P6
    aspect_ratios: List[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    # torchvision: cell anchors rounded to whole pixels, level strides derived from the padded size; detectron2:
    # unrounded cell anchors and each level's own stride (what detectron2 checkpoints were trained with);
    # detectron_legacy: Detectron's generate_anchors (inclusive-pixel windows, widths rounded per aspect ratio)
    # at each level's own stride, as the Detectron / Detectron.pytorch (PANet) checkpoints were trained with
    anchors: str = choice("torchvision", ("torchvision", "detectron2", "detectron_legacy"))
    pre_nms_topk_train: int = 2000     # per level (detectron2 FPN)
    pre_nms_topk_test: int = 1000
    post_nms_topk_train: int = 1000    # per image
    post_nms_topk_test: int = 1000
    nms_thresh: float = 0.7
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    batch_size_per_image: int = 256    # sampled anchors per image
    positive_fraction: float = 0.5


@dataclass
class RoISettings:
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.5
    batch_size_per_image: int = 512    # sampled RoIs per image
    positive_fraction: float = 0.25
    bbox_reg_weights: List[float] = field(default_factory=lambda: [10.0, 10.0, 5.0, 5.0])
    box_resolution: int = 7            # RoIAlign output of the box head
    mask_resolution: int = 14          # RoIAlign output of the mask head (masks predicted at 2x)
    sampling_ratio: int = 2
    aligned: bool = True               # detectron2's ROIAlignV2; false: Detectron's legacy RoIAlign (also PANet's pooling)
    # box geometry: continuous (x2 - x1 widths, clipping to [0, W]) or Detectron's legacy pixel-inclusive one
    # (x2 - x1 + 1 widths in box encoding/decoding, clipping to [0, W - 1]), as Detectron-trained checkpoints
    box_geometry: str = choice("continuous", ("continuous", "legacy"))
    box_head: str = choice("2fc", ("2fc", "conv_fc"))  # conv_fc: (per-level) conv, box_head_convs - 1 convs, one fc
    box_head_convs: int = 4            # conv_fc: convs including the first (per-level under adaptive pooling)
    box_conv_dim: int = 256            # conv_fc: conv width
    head_norm: str = choice("none", ("none", "gn"))  # GroupNorm (32 groups) in the conv box head and mask head
    box_head_dim: int = 1024           # 2fc box head width (conv_fc: its fc width)
    mask_head_dim: int = 256           # mask head conv width (PANet's fc-fusion branch halves it before its fc)
    mask_convs: int = 4                # Mask R-CNN FCN mask head depth (PANet's head is fixed at 4)


@dataclass
class PANetSettings:
    """arch panet only; each switch turns one PANet component off, for ablations."""

    bottom_up: bool = True             # bottom-up path augmentation N2..N5 (RPN and heads read N instead of P)
    adaptive_pooling: bool = True      # pool every RoI from every level, per-level first layer, element-wise max
    fc_fusion: bool = True             # fully-connected fusion branch added to the FCN mask logits
    fusion_relu: bool = True           # ReLU on the fc-fusion output, as the PANet repository (the paper is silent)


@dataclass
class RCNNLoss:
    class_weights: Optional[List[float]] = None  # per-class weights of the box classifier's CE (K entries)


@dataclass
class RCNNTest:
    score_thresh: float = 0.05         # box score threshold before NMS
    nms_thresh: float = 0.5            # per-class NMS
    detections_per_img: int = 100
    mask_threshold: float = 0.5        # on the pasted mask probabilities


@dataclass
class RCNNSettings(ModelSettings):
    arch: str = choice("maskrcnn", ("maskrcnn", "panet"))
    backbone_freeze_at: int = 2
    fpn_dim: int = 256                 # FPN (and PANet bottom-up path) width
    fpn_norm: str = choice("none", ("none", "gn"))  # GroupNorm (32 groups) after FPN and bottom-up-path convs
    rpn: RPNSettings = field(default_factory=RPNSettings)
    roi: RoISettings = field(default_factory=RoISettings)
    panet: PANetSettings = field(default_factory=PANetSettings)
    loss: RCNNLoss = field(default_factory=RCNNLoss)
    test: RCNNTest = field(default_factory=RCNNTest)


def describe(s: RCNNSettings) -> tuple[str, str]:
    extra = ", bottom-up path, adaptive pooling, fc fusion" if s.arch == "panet" else ""
    if s.fpn_norm == "gn":
        extra += ", GN FPN"
    if s.roi.box_head == "conv_fc":
        extra += f", {s.roi.box_head_convs}conv1fc box head"
    if s.roi.head_norm == "gn":
        extra += ", GN heads"
    return s.arch, f"FPN {s.fpn_dim}{extra}"


FAMILY = Family(name="rcnn", archs=("maskrcnn", "panet"), settings=RCNNSettings,
                model="omniseg.models.rcnn.model:RCNNSegmenter", describe=describe)
