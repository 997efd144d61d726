"""The per-pixel classification family's settings (FCN, PSPNet, DANet, EncNet, DeepLabV3, Gated-SCNN, UPerNet;
FastFCN's JPU neck) and its registration. Defaults are the papers' ResNet-50 values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from omniseg.models.registry import Family
from omniseg.models.settings import ModelSettings
from omniseg.schema import choice

ARCHS = ("fcn", "pspnet", "danet", "deeplabv3", "gscnn", "upernet", "encnet")


@dataclass
class PerPixelLoss:
    class_weights: Optional[List[float]] = None  # per-class CE weights (PSSL pre-training: 1.0 objects, 0.1 background)
    aux_weight: Optional[float] = None  # FCN head on res4; null: 0.4 for fcn/pspnet/deeplabv3/upernet/encnet, else 0
    se_weight: float = 0.2             # EncNet: BCE of the SE-loss classifier against the classes present (0: none)
    branch_weight: float = 1.0         # DANet: CE on each attention branch's own classifier
    edge_weight: float = 20.0          # Gated-SCNN: balanced boundary BCE
    edge_attention_weight: float = 1.0  # Gated-SCNN: CE where the predicted boundary > 0.8
    dual_task_weight: float = 1.0      # Gated-SCNN: segmentation-boundary consistency
    edge_radius: int = 2               # Gated-SCNN: boundary ground truth within this many px of another class
    # Gated-SCNN: the segmentation and edge-attention CE weight each image's classes by 1 + bound x (1 - their
    # share of its labelled pixels) (the official JointEdgeSegLoss); per-image CEs averaged over the batch
    image_weighted_ce: bool = False
    image_weight_upper_bound: float = 1.0  # the bound above (GSCNN's --wt_bound, default 1.0)


@dataclass
class PerPixelSettings(ModelSettings):
    arch: str = choice("pspnet", ARCHS)
    backbone_norm: str = choice("bn", ("frozen_bn", "bn"))
    output_stride: int = choice(8, (8, 16, 32))  # dilated backbone (neck: jpu always reads a stride-32 one)
    neck: Optional[str] = choice(None, (None, "jpu"))  # jpu: FastFCN's Joint Pyramid Upsampling, no dilation
    jpu_width: int = 512               # JPU output = 4 x jpu_width channels
    jpu_align_corners: bool = True     # JPU upsampling: True as FastFCN's code, False as MMSeg's JPU
    head_width: int = 512
    psp_bins: List[int] = field(default_factory=lambda: [1, 2, 3, 6])  # PSPNet / UPerNet pyramid pooling
    psp_branch_width: Optional[int] = None  # PSPNet pooling branch width; null: input / len(bins) (MMSeg: head_width)
    pam_channels: Optional[int] = None  # DANet position-attention query/key width; null: head_width / 8
    num_codes: int = 32                # EncNet: codewords of the context encoding module
    enc_lateral: bool = False          # EncNet: fuse 1x1 laterals of res3 and res4 with the bottleneck (MMSeg's
                                       # add_lateral; FastFCN's `--lateral`)
    aux_width: Optional[int] = None    # auxiliary FCN head width; null: its input's channels / 4
    aux_level: str = choice("res4", ("res2", "res3", "res4", "res5"))  # what the auxiliary head reads (MMSeg's
                                       # UPerNet-ViT: the last level)
    aspp_rates: List[int] = field(default_factory=lambda: [12, 24, 36])  # DeepLabV3 / Gated-SCNN at stride 8
    aspp_project: bool = True          # DeepLabV3 head: 1x1 projection before its 3x3 conv (false: MMSeg's ASPPHead,
                                       # whose 3x3 bottleneck reads the branch concatenation)
    # Per-stage dilation of a ResNet's 3x3 convs, strides unchanged, the first block of a dilated stage at half
    # (MMSeg's ResNetV1c with contract_dilation: [1, 1, 2, 4] at output stride 8, and on the stride-32 backbone
    # under FastFCN's JPU); BasicBlocks dilate only their first 3x3. null: timm's dilation for output_stride.
    stage_dilations: Optional[List[int]] = None
    # Multi-grid in res5 (DeepLabV3's; the released DANet-101 Cityscapes model: [1, 2, 4], dilations 4, 8, 16 at
    # output stride 8): block i's 3x3 convs dilated res5's dilation x multi_grid[i % len], the first block too.
    # null: res5's dilation in every block.
    multi_grid: Optional[List[int]] = None
    shape_width: int = 64              # Gated-SCNN shape stream width at res2 (halved after each gate)
    canny_thresholds: List[float] = field(default_factory=lambda: [10.0, 100.0])
    # Gated-SCNN's layout on other trunks. The released model (WideResNet-38, `backbone: wider_resnet38`) runs the
    # shape stream on the stride-1 map res0 without a stem conv (its width is res0's), gates it with res2/res3/res5,
    # reads res1 in the decoder through a bare 1x1 conv and classifies with a bias-free 1x1 conv.
    shape_level: str = choice("res2", ("res0", "res1", "res2"))  # the map the shape stream starts from
    shape_stem: bool = True            # 1x1 conv from shape_level's channels to shape_width (false: they are equal)
    shape_gate_levels: List[str] = field(default_factory=lambda: ["res3", "res4", "res5"])  # one per gate
    gscnn_fine_level: str = choice("res2", ("res1", "res2"))  # the decoder's fine-resolution input
    gscnn_fine_norm: bool = True       # BN + ReLU after the fine input's 48-channel 1x1 conv
    gscnn_classifier_bias: bool = True
    canny_input: str = choice("image", ("image", "normalized_uint8"))  # what Canny sees: the uint8 image, or
                                       # (the official code) the normalised image cast to uint8 as NumPy does
    dropout: float = 0.1
    loss: PerPixelLoss = field(default_factory=PerPixelLoss)


def describe(s: PerPixelSettings) -> tuple[str, str]:
    if s.arch == "upernet":
        return s.arch, "UPerNet on a ViT feature pyramid" if str(s.backbone).startswith("vit") else "UPerNet"
    return s.arch, "JPU neck" if s.neck == "jpu" else f"dilated, output stride {s.output_stride}"


FAMILY = Family(name="per_pixel", archs=ARCHS, settings=PerPixelSettings,
                model="omniseg.models.per_pixel.model:PerPixelSegmenter", describe=describe)
