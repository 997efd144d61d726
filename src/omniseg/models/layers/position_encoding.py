"""Sine position encoding of DETR / Mask2Former ("normalize=True" variant)."""

from __future__ import annotations

import math

import torch
from torch import nn

from omniseg.models.layers.eager import eager_cached


class PositionEmbeddingSine(nn.Module):
    """2-D sine/cosine encoding: `num_pos_feats` channels per axis, concatenated as (y, x).

    Computed from the feature map's shape only (no padding mask), as Mask2Former does; hence cached
    per (h, w, device) in eager mode (recomputing the sines cost a few ms per level and forward on a CPU).
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, normalize: bool = True,
                 scale: float | None = None):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self._cache: dict[tuple, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> [B, 2 * num_pos_feats, h, w] in x's dtype."""
        b, _, h, w = x.shape
        pos = eager_cached(self._cache, lambda: (h, w, str(x.device)), x, lambda: self.encode(h, w, x.device), limit=16)
        return pos.expand(b, -1, -1, -1).to(x.dtype)

    def encode(self, h: int, w: int, device) -> torch.Tensor:
        """The float32 encoding of an (h, w) map, [1, 2 * num_pos_feats, h, w], channels-last."""
        y_embed = torch.arange(1, h + 1, device=device, dtype=torch.float32).view(1, h, 1).expand(1, h, w)
        x_embed = torch.arange(1, w + 1, device=device, dtype=torch.float32).view(1, 1, w).expand(1, h, w)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, device=device, dtype=torch.int64)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        # channels-last memory: the transformers read it flattened as [B, h*w, C], which is then a plain view
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
