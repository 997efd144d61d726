"""Query mask logits: mask embeddings [B, Q, C] x per-pixel embeddings [B, C, H, W] -> [B, Q, H, W]."""

from __future__ import annotations

import torch


class PixelEmbeddings:
    """The per-pixel embeddings prepared once for the decoder's many mask predictions (one per layer).

    Flattened to [B, C, H*W], contiguous and already in the autocast dtype, so every prediction is one
    `bmm`; `einsum` would cast and copy the whole 1/4-resolution map again for each of the 10 predictions,
    which under bf16 autocast on a CPU dominated the Mask2Former predictor's profile.
    """

    def __init__(self, mask_features: torch.Tensor):
        self.shape = tuple(mask_features.shape)
        flat = mask_features.flatten(2)
        device = mask_features.device.type
        if torch.is_autocast_enabled(device):
            flat = flat.to(torch.get_autocast_dtype(device))
        self.flat = flat.contiguous()

    def logits(self, mask_embed: torch.Tensor) -> torch.Tensor:
        """mask_embed [B, Q, C] -> mask logits [B, Q, H, W]."""
        b, _, h, w = self.shape
        return torch.bmm(mask_embed.to(self.flat.dtype), self.flat).view(b, -1, h, w)
