"""Query mask logits: mask embeddings [B, Q, C] x per-pixel embeddings [B, C, H, W] -> [B, Q, H, W]."""

from __future__ import annotations

import torch
from torch.nn import functional as F


class PixelEmbeddings:
    """The per-pixel embeddings prepared once for the decoder's many mask predictions (one per layer).

    Flattened to [B, C, H*W] and already in the autocast dtype, so every prediction is one `bmm`;
    `einsum` would cast and copy the whole 1/4-resolution map again for each of the 10 predictions,
    which under bf16 autocast on a CPU dominated the Mask2Former predictor's profile. Channels-last maps
    (what convolutions on Swin's features give) flatten to a transposed matrix, which `bmm` reads as it
    is: a copy to [B, C, H*W] order cost more than the product itself.
    """

    def __init__(self, mask_features: torch.Tensor):
        self.features = mask_features
        self.shape = tuple(mask_features.shape)
        self._resized: dict[tuple[str, str], torch.Tensor] = {}
        flat = mask_features.flatten(2)
        device = mask_features.device.type
        if torch.is_autocast_enabled(device):
            flat = flat.to(torch.get_autocast_dtype(device))
        self.flat = _matrix_operand(flat)

    def logits(self, mask_embed: torch.Tensor) -> torch.Tensor:
        """mask_embed [B, Q, C] -> mask logits [B, Q, H, W]."""
        b, _, h, w = self.shape
        return torch.bmm(mask_embed.to(self.flat.dtype), self.flat).view(b, -1, h, w)

    def logits_at(self, mask_embed: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """mask_embed [B, Q, C] -> the mask logits bilinearly resized to `size`, [B, Q, h*w].

        Bilinear resizing is linear, so resizing the per-pixel embeddings once per size (cached) and
        predicting there equals predicting at full resolution and resizing each query's logits, up to
        float rounding, for a fraction of the work: what the masked-attention decoder's intermediate
        predictions need at inference, where only their attention masks are used.
        """
        key = tuple(str(s) for s in size)  # sizes are symbolic when exported with dynamic shapes (unhashable)
        flat = self._resized.get(key)
        if flat is None:
            resized = F.interpolate(self.features, size=tuple(size), mode="bilinear", align_corners=False)
            flat = self._resized[key] = _matrix_operand(resized.flatten(2).to(self.flat.dtype))
        return torch.bmm(mask_embed.to(flat.dtype), flat)


def _matrix_operand(x: torch.Tensor) -> torch.Tensor:
    """x [B, C, N] as `bmm` reads it without a copy: row-major or transposed (column-major) matrices."""
    return x if x.is_contiguous() or x.transpose(1, 2).is_contiguous() else x.contiguous()
