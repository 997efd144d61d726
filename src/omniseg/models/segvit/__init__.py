"""SegViT / SegViT v2: plain-ViT encoder (Shrunk / Shrunk++), ATM decoder, continual learning."""

from omniseg.models.segvit.atm import ATMDecoder, SimilarityCrossAttention, atm_losses, semantic_scores
from omniseg.models.segvit.model import SegViT, class_steps
from omniseg.models.segvit.vit import (
    EncoderOutput, PlainViT, QueryUpsample, ViTFeaturePyramid, edge_patch_targets, eqd_selection, grid_mask,
)

__all__ = ["SegViT", "class_steps", "ATMDecoder", "SimilarityCrossAttention", "atm_losses", "semantic_scores",
           "PlainViT", "ViTFeaturePyramid", "QueryUpsample", "EncoderOutput", "edge_patch_targets", "eqd_selection",
           "grid_mask"]
