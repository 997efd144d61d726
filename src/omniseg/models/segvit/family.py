"""SegViT / SegViT v2 settings (plain ViT, Shrunk / Shrunk++, ATM decoders, continual learning) and its
registration. Defaults are the official ViT-B/16 ADE20K recipe: taps of blocks 6, 8, 12 read deepest
first, 3 ATM layers per stage, width C/2, CE + 20 focal + 1 dice with deep supervision."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from omniseg.models.registry import Family
from omniseg.models.settings import ModelSettings
from omniseg.schema import choice


@dataclass
class ContinualSettings:
    steps: Optional[List[int]] = None  # class counts per learning step, e.g. [6, 5]; null: one step
    step: Optional[int] = None         # current step (null: the last)
    freeze: bool = True                # SegViT's recipe; false: plain fine-tuning (the forgetting baseline)
    step_iters: Any = None             # `omniseg train-continual`: iterations of steps 1.. (int, list, null: max_iters)


@dataclass
class SegViTLoss:
    class_weight: float = 1.0
    focal_weight: float = 20.0
    dice_weight: float = 1.0
    eos_coef: float = 0.1
    class_weights: Optional[List[float]] = None  # per-class weights of the class-token CE (K entries, all steps)
    edge_weight: float = 1.0           # Shrunk++ edge head CE


@dataclass
class SegViTSettings(ModelSettings):
    arch: str = choice("segvit", ("segvit",))
    backbone: str = "vit_b"            # vit_t | vit_s | vit_b | vit_l, or any timm ViT name (patch 16)
    vit_out_indices: List[int] = field(default_factory=lambda: [5, 7, 11])
    shrink: Optional[str] = choice(None, (None, "shrunk", "shrunkpp"))  # shrunk: QD + QU; shrunkpp: edge-aware QD
    qd_index: int = 4                  # the (E)QD block
    edge_tau: float = 0.7              # Shrunk++: patches with p(edge) > tau keep full resolution
    qu_layers: int = 2                 # QU decoder layers (per stage with qu_mode: grid)
    qu_mode: str = choice("tokens", ("tokens", "grid"))  # tokens: the stride-16 tokens entering QD are the
    # queries; grid: a learned qu_grid x qu_grid query set reads the QD-entry then the deep tokens (official TPN head)
    qu_grid: int = 32                  # qu_mode grid: query grid side (training crop / 16)
    qu_grid_pad: bool = True           # qu_mode grid: inputs smaller than the query grid (sliding windows over a
    # smaller image, small training crops) are padded to it as crops are, masks cropped back; false: refused.
    # Inputs larger than the grid are always refused (evaluate them with inference.mode: slide)
    upsample_mask_logits: bool = False  # true: mask logits are resized to the input before sigmoid and class
    # weighting (official heads); false: per-class scores are computed at the token grid, then resized
    hidden_dim: Optional[int] = None   # ATM width; null: half the encoder width (ViT-B: 384)
    nheads: Optional[int] = None       # null: hidden_dim / 64
    dec_layers: int = 3                # ATM layers per stage
    dropout: float = 0.1
    drop_path_rate: float = 0.1
    pixel_mean: List[float] = field(default_factory=lambda: [127.5, 127.5, 127.5])
    pixel_std: List[float] = field(default_factory=lambda: [127.5, 127.5, 127.5])
    continual: ContinualSettings = field(default_factory=ContinualSettings)
    loss: SegViTLoss = field(default_factory=SegViTLoss)


def describe(s: SegViTSettings) -> tuple[str, str]:
    return s.arch, {None: "plain ViT", "shrunk": "Shrunk ViT", "shrunkpp": "Shrunk++ ViT"}[s.shrink] + " + ATM"


FAMILY = Family(name="segvit", archs=("segvit",), settings=SegViTSettings,
                model="omniseg.models.segvit.model:SegViT", describe=describe)
