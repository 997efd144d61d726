"""MaskFormer's transformer predictor: a DETR transformer over res5 plus class and mask-embedding heads.

Queries start as zeros and carry a learnable positional embedding (`query_embed`), exactly as in
DETR; every decoder layer's output goes through one shared LayerNorm before the heads, which is what
lets all layers be supervised (deep supervision) with the same heads.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from omniseg.models.layers.mask_logits import PixelEmbeddings
from omniseg.models.layers.mlp import MLP
from omniseg.models.layers.position_encoding import PositionEmbeddingSine
from omniseg.models.maskformer.fpn_pixel_decoder import c2_xavier_fill

__all__ = ["DetrTransformerPredictor", "DetrEncoderLayer", "DetrDecoderLayer"]


def _with_pos(x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    return x if pos is None else x + pos


class DetrEncoderLayer(nn.Module):
    """Self-attention (position added to q and k only) + FFN, post-norm by default."""

    def __init__(self, d_model: int, nheads: int, dim_feedforward: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nheads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))

    def forward(self, src: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        if self.pre_norm:
            x = self.norm1(src)
            q = _with_pos(x, pos)
            src = src + self.dropout(self.self_attn(q, q, x, need_weights=False)[0])
            return src + self.dropout(self._ffn(self.norm2(src)))
        q = _with_pos(src, pos)
        src = self.norm1(src + self.dropout(self.self_attn(q, q, src, need_weights=False)[0]))
        return self.norm2(src + self.dropout(self._ffn(src)))


class DetrDecoderLayer(DetrEncoderLayer):
    """Self-attention over queries -> cross-attention to the memory -> FFN (DETR order), post-norm by default.

    Query positions are added to q and k of the self-attention and to q of the cross-attention;
    memory positions to k of the cross-attention; values never get positions.
    """

    def __init__(self, d_model: int, nheads: int, dim_feedforward: int, dropout: float, pre_norm: bool):
        super().__init__(d_model, nheads, dim_feedforward, dropout, pre_norm)
        self.cross_attn = nn.MultiheadAttention(d_model, nheads, dropout=dropout, batch_first=True)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, memory_pos: torch.Tensor | None,
                query_pos: torch.Tensor | None) -> torch.Tensor:
        if self.pre_norm:
            x = self.norm1(tgt)
            q = _with_pos(x, query_pos)
            tgt = tgt + self.dropout(self.self_attn(q, q, x, need_weights=False)[0])
            x = self.norm2(tgt)
            tgt = tgt + self.dropout(self.cross_attn(_with_pos(x, query_pos), _with_pos(memory, memory_pos), memory,
                                                     need_weights=False)[0])
            return tgt + self.dropout(self._ffn(self.norm3(tgt)))
        q = _with_pos(tgt, query_pos)
        tgt = self.norm1(tgt + self.dropout(self.self_attn(q, q, tgt, need_weights=False)[0]))
        attended = self.cross_attn(_with_pos(tgt, query_pos), _with_pos(memory, memory_pos), memory,
                                   need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout(attended))
        return self.norm3(tgt + self.dropout(self._ffn(tgt)))


class DetrTransformerPredictor(nn.Module):
    """MaskFormer's "TransformerPredictor" (detectron2 naming of outputs).

    input_proj (1x1, identity when widths agree) on res5, sine positions, `enc_layers` DETR encoder
    layers (0 = none, as in MaskFormer's ADE20K models), `dec_layers` DETR decoder layers, a shared
    final LayerNorm, Linear(K+1) class head and a 3-layer MLP mask-embedding head whose output is
    dotted with the pixel decoder's mask features.
    """

    def __init__(self, in_channels: int, *, num_classes: int, hidden_dim: int = 256, num_queries: int = 100,
                 nheads: int = 8, dropout: float = 0.1, dim_feedforward: int = 2048, enc_layers: int = 0,
                 dec_layers: int = 6, pre_norm: bool = False, mask_dim: int = 256):
        super().__init__()
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.input_proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=1) if in_channels != hidden_dim else nn.Identity()
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        layer_args = (hidden_dim, nheads, dim_feedforward, dropout, pre_norm)
        self.encoder_layers = nn.ModuleList(DetrEncoderLayer(*layer_args) for _ in range(enc_layers))
        # DETR normalises the encoder output only in the pre-norm variant.
        self.encoder_norm = nn.LayerNorm(hidden_dim) if pre_norm and enc_layers else nn.Identity()
        self.decoder_layers = nn.ModuleList(DetrDecoderLayer(*layer_args) for _ in range(dec_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # DETR: Xavier on every matrix of the transformer; detectron2: c2 Xavier on input_proj.
        for layers in (self.encoder_layers, self.decoder_layers):
            for p in layers.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        if isinstance(self.input_proj, nn.Conv2d):
            c2_xavier_fill(self.input_proj)

    def forward(self, multi_scale_features: list[torch.Tensor], mask_features: torch.Tensor,
                aux_outputs: bool = True) -> dict:
        """-> {"pred_logits", "pred_masks", "aux_outputs"}; without `aux_outputs` only the last layer
        predicts (inference)."""
        x = multi_scale_features[0]
        pos = self.pe_layer(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        memory = self.input_proj(x).flatten(2).transpose(1, 2)
        for layer in self.encoder_layers:
            memory = layer(memory, pos)
        memory = self.encoder_norm(memory)

        batch = x.shape[0]
        query_pos = self.query_embed.weight.unsqueeze(0).expand(batch, -1, -1)
        tgt = torch.zeros_like(query_pos)
        predictions = []
        pixels = PixelEmbeddings(mask_features)
        for i, layer in enumerate(self.decoder_layers):
            tgt = layer(tgt, memory, pos, query_pos)
            if aux_outputs or i == len(self.decoder_layers) - 1:
                predictions.append(self._predict(self.decoder_norm(tgt), pixels))
        out = dict(predictions[-1])
        if aux_outputs:
            out["aux_outputs"] = predictions[:-1]
        return out

    def _predict(self, queries: torch.Tensor, pixels: PixelEmbeddings) -> dict[str, torch.Tensor]:
        return {"pred_logits": self.class_embed(queries), "pred_masks": pixels.logits(self.mask_embed(queries))}
