"""Mask2Former's transformer decoder with masked attention.

Each layer: masked cross-attention to one feature level (1/32, 1/16, 1/8 in turn) -> self-attention
-> FFN, post-norm by default. Before every layer the queries' current masks, resized to that layer's
level, restrict where each query may look. Parameter names follow detectron2
(`transformer_cross_attention_layers.i.multihead_attn.in_proj_weight`, ...).

Tensors are batch-first [B, Q, C] throughout; attention runs through
`F.scaled_dot_product_attention` with a boolean mask broadcast over heads.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F

from omniseg.models.layers.checkpointing import run_block
from omniseg.models.layers.mask_logits import PixelEmbeddings
from omniseg.models.layers.mlp import MLP
from omniseg.models.layers.position_encoding import PositionEmbeddingSine


class SDPAttention(nn.Module):
    """Multi-head attention computed with `F.scaled_dot_product_attention`.

    Parameters are named and packed exactly like `nn.MultiheadAttention` (`in_proj_weight` [3C, C],
    `in_proj_bias`, `out_proj`) so official and HF checkpoints load unchanged.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, -1).transpose(1, 2)  # [B, heads, N, Dh]

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                blocked: torch.Tensor | None = None) -> torch.Tensor:
        """query [B,Lq,C], key/value [B,Lk,C]; `blocked` bool [B,Lq,Lk] or [B,heads,Lq,Lk] or [Lq,Lk],
        True = may NOT attend (detectron2 / nn.MultiheadAttention convention). -> [B,Lq,C]"""
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = self._heads(F.linear(query, w_q, b_q))
        k = self._heads(F.linear(key, w_k, b_k))
        v = self._heads(F.linear(value, w_v, b_v))
        allowed = None
        if blocked is not None:
            allowed = ~blocked
            if allowed.dim() == 3:
                allowed = allowed.unsqueeze(1)  # same mask for every head
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                             dropout_p=self.dropout if self.training else 0.0)
        b, _, lq, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, lq, self.embed_dim))


class _AttentionSublayer(nn.Module):
    """Residual attention + LayerNorm (post-norm unless `normalize_before`), xavier-initialised.

    The attention module's attribute name follows the official state dicts (`self_attn` /
    `multihead_attn`), so published checkpoints load by name.
    """

    attn_name = "self_attn"

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False):
        super().__init__()
        setattr(self, self.attn_name, SDPAttention(d_model, nhead, dropout))
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)


class SelfAttentionLayer(_AttentionSublayer):
    attn_name = "self_attn"

    def forward(self, tgt, query_pos=None, blocked=None):
        x = self.norm(tgt) if self.normalize_before else tgt
        q = k = x if query_pos is None else x + query_pos
        tgt = tgt + self.dropout(self.self_attn(q, k, x, blocked))
        return tgt if self.normalize_before else self.norm(tgt)


class CrossAttentionLayer(_AttentionSublayer):
    attn_name = "multihead_attn"

    def forward(self, tgt, memory, pos=None, query_pos=None, blocked=None):
        x = self.norm(tgt) if self.normalize_before else tgt
        q = x if query_pos is None else x + query_pos
        k = memory if pos is None else memory + pos
        tgt = tgt + self.dropout(self.multihead_attn(q, k, memory, blocked))
        return tgt if self.normalize_before else self.norm(tgt)


class FFNLayer(nn.Module):
    def __init__(self, d_model: int, dim_feedforward: int = 2048, dropout: float = 0.0,
                 normalize_before: bool = False):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.normalize_before = normalize_before
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, tgt):
        x = self.norm(tgt) if self.normalize_before else tgt
        tgt = tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x)))))
        return tgt if self.normalize_before else self.norm(tgt)


class ExtraQueries(Protocol):
    """Queries placed before the learnable ones for one decoder pass (see `forward`)."""

    content: torch.Tensor  # [B, P, C] initial query features
    pos: torch.Tensor  # [B, P, C] query positional embeddings
    self_attn_blocked: torch.Tensor | None  # [P+Q, P+Q] bool, True = not attended, extra rows first

    def attention_mask(self, layer: int, size: tuple[int, int]) -> torch.Tensor | None:
        """[B, P, h*w] blocked cross-attention for `layer`, or None: use their own predictions."""


class MultiScaleMaskedTransformerDecoder(nn.Module):
    """`dec_layers` masked-attention layers; predictions from the initial queries and after every layer
    (1 + dec_layers in total, all meant to be supervised)."""

    def __init__(self, in_channels: int, *, num_classes: int, hidden_dim: int = 256, num_queries: int = 100,
                 nheads: int = 8, dim_feedforward: int = 2048, dec_layers: int = 9, mask_dim: int = 256,
                 num_feature_levels: int = 3, pre_norm: bool = False, enforce_input_project: bool = False,
                 dropout: float = 0.0, learned_query_content: bool = True):
        super().__init__()
        self.num_classes = num_classes
        self.hidden_dim = hidden_dim
        self.num_queries = num_queries
        self.num_heads = nheads
        self.num_layers = dec_layers
        self.num_feature_levels = num_feature_levels
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)

        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads, dropout, pre_norm) for _ in range(dec_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nheads, dropout, pre_norm) for _ in range(dec_layers))
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, dim_feedforward, dropout, pre_norm) for _ in range(dec_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)

        # Content of the learnable queries; OneFormer passes its own (task-conditioned) content instead.
        self.query_feat = nn.Embedding(num_queries, hidden_dim) if learned_query_content else None
        self.query_embed = nn.Embedding(num_queries, hidden_dim)  # their positional embedding
        self.level_embed = nn.Embedding(num_feature_levels, hidden_dim)

        self.input_proj = nn.ModuleList()
        for _ in range(num_feature_levels):
            if in_channels != hidden_dim or enforce_input_project:
                conv = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
                nn.init.kaiming_uniform_(conv.weight, a=1)
                nn.init.zeros_(conv.bias)
                self.input_proj.append(conv)
            else:
                self.input_proj.append(nn.Sequential())

        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self.activation_checkpointing = False  # set by the model (model.activation_checkpointing)

    # ----------------------------------------------------------------- building blocks
    def prepare_memory(self, multi_scale_features: list[torch.Tensor]):
        """Per level: (memory [B, hw, C] = proj(F_l) + level_embed[l], sine pos [B, hw, C], (h, w))."""
        if len(multi_scale_features) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} feature levels, got {len(multi_scale_features)}")
        memory, pos, sizes = [], [], []
        for i, x in enumerate(multi_scale_features):
            sizes.append(tuple(x.shape[-2:]))
            pos.append(self.pe_layer(x).flatten(2).transpose(1, 2))
            src = self.input_proj[i](x).flatten(2) + self.level_embed.weight[i][None, :, None]
            memory.append(src.transpose(1, 2))
        return memory, pos, sizes

    @staticmethod
    def _attention_mask_from_prediction(mask_logits: torch.Tensor, size) -> torch.Tensor:
        """bool [B, Q, h*w], True = blocked: the prediction resized (bilinear) to `size`, sigmoid < 0.5.
        Detached: no gradient flows through the attention mask."""
        resized = F.interpolate(mask_logits.detach(), size=size, mode="bilinear", align_corners=False)
        return MultiScaleMaskedTransformerDecoder._blocked(resized.flatten(2))

    @staticmethod
    def _blocked(resized_logits: torch.Tensor) -> torch.Tensor:
        """The official rule on logits already at the attention size: blocked where sigmoid < 0.5."""
        return resized_logits.detach().sigmoid() < 0.5

    @staticmethod
    def unblock_empty_rows(blocked: torch.Tensor) -> torch.Tensor:
        """A query whose mask is empty everywhere attends to the whole level instead (official rule);
        also keeps SDPA away from all-masked rows (NaN)."""
        return blocked & ~blocked.all(dim=-1, keepdim=True)

    def forward_prediction_heads(self, output: torch.Tensor, pixels: PixelEmbeddings, attn_mask_target_size,
                                 full: bool = True):
        """Shared head on the layer-normed queries [B,Q,C] -> (class logits [B,Q,K+1], mask logits
        [B,Q,H/4,W/4], blocked mask [B,Q,h*w] at `attn_mask_target_size` for the next layer, or None
        without a size). `full=False` (inference, a prediction nobody reads) skips the class and
        full-resolution mask logits and predicts the blocked mask at the attention size directly."""
        decoded = self.decoder_norm(output)
        mask_embed = self.mask_embed(decoded)
        if not full:
            return None, None, self._blocked(pixels.logits_at(mask_embed, attn_mask_target_size))
        outputs_class = self.class_embed(decoded)
        outputs_mask = pixels.logits(mask_embed)
        blocked = (None if attn_mask_target_size is None
                   else self._attention_mask_from_prediction(outputs_mask, attn_mask_target_size))
        return outputs_class, outputs_mask, blocked

    def forward_layer(self, i: int, output: torch.Tensor, memory: torch.Tensor, memory_pos: torch.Tensor,
                      query_pos: torch.Tensor | None, blocked: torch.Tensor | None,
                      self_attn_blocked: torch.Tensor | None = None) -> torch.Tensor:
        """Layer i: masked cross-attention -> self-attention -> FFN. `blocked` [B,Q,hw] (True = not
        attended) must already have empty rows unblocked; `self_attn_blocked` [Q,Q] or [B,Q,Q] lets
        extra queries be hidden from others."""
        output = self.transformer_cross_attention_layers[i](output, memory, pos=memory_pos, query_pos=query_pos,
                                                            blocked=blocked)
        output = self.transformer_self_attention_layers[i](output, query_pos=query_pos, blocked=self_attn_blocked)
        return self.transformer_ffn_layers[i](output)

    # ----------------------------------------------------------------- forward
    def forward(self, multi_scale_features: list[torch.Tensor], mask_features: torch.Tensor,
                extra: ExtraQueries | None = None, queries: torch.Tensor | None = None,
                aux_outputs: bool = True) -> dict:
        """-> {"pred_logits", "pred_masks", "aux_outputs"} of the learnable queries.

        `aux_outputs=False` (inference) returns the last prediction set only and computes the earlier
        ones only as far as the next layer needs them: their attention masks, predicted at the
        attention resolution (`PixelEmbeddings.logits_at`) instead of at 1/4 and resized.

        `extra` (training-time, e.g. MP-Former's mask-piloted queries) prepends P queries that go through
        the same layers; their predictions come back as "extra_outputs" (one dict per prediction set).
        `queries` [B, Q, C] is the initial query content when the decoder has no learned content
        (OneFormer's task-conditioned queries).
        """
        memory, memory_pos, sizes = self.prepare_memory(multi_scale_features)
        b = mask_features.shape[0]
        query_pos = self.query_embed.weight.unsqueeze(0).expand(b, -1, -1)
        if (queries is None) == (self.query_feat is None):
            raise ValueError("pass `queries` exactly when the decoder was built without learned query content")
        output = queries if queries is not None else self.query_feat.weight.unsqueeze(0).expand(b, -1, -1)
        num_extra, self_blocked = 0, None
        if extra is not None:
            num_extra, self_blocked = extra.content.shape[1], extra.self_attn_blocked
            output = torch.cat([extra.content, output], dim=1)
            query_pos = torch.cat([extra.pos, query_pos], dim=1)

        pixels = PixelEmbeddings(mask_features)
        lean = not aux_outputs and extra is None
        sets = [self.forward_prediction_heads(output, pixels, sizes[0], full=not lean or self.num_layers == 0)]
        for i in range(self.num_layers):
            level = i % self.num_feature_levels
            blocked = sets[-1][2]
            forced = extra.attention_mask(i, sizes[level]) if num_extra else None
            if forced is not None:
                blocked = torch.cat([forced.to(blocked.device), blocked[:, num_extra:]], dim=1)
            output = run_block(self.forward_layer, i, output, memory[level], memory_pos[level], query_pos,
                               self.unblock_empty_rows(blocked), self_blocked, enabled=self.activation_checkpointing)
            last = i == self.num_layers - 1
            size = None if last and lean else sizes[(i + 1) % self.num_feature_levels]
            sets.append(self.forward_prediction_heads(output, pixels, size, full=last or not lean))

        if lean:
            return {"pred_logits": sets[-1][0], "pred_masks": sets[-1][1]}
        learnable = [{"pred_logits": c[:, num_extra:], "pred_masks": m[:, num_extra:]} for c, m, _ in sets]
        out = {**learnable[-1], "aux_outputs": learnable[:-1]}
        if extra is not None:
            out["extra_outputs"] = [{"pred_logits": c[:, :num_extra], "pred_masks": m[:, :num_extra]}
                                    for c, m, _ in sets]
        return out
