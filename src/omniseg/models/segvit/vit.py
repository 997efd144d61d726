"""Plain ViT encoder for SegViT with the Shrunk (QD + QU) and Shrunk++ (edge-aware QD + QU) options.

The ViT is timm's `VisionTransformer` (any timm ViT checkpoint loads from a local file); the class token
takes part in the position embedding and is dropped before the blocks, as the official SegViT code does
(`with_cls_token=False`), so every block sees exactly the h x w patch grid at stride 16.

- Plain: blocks run on all tokens; `out_indices` taps give [B, h*w, C] token maps.
- Shrunk: block `qd_index` is a query-downsampling (QD) block: its attention queries are the top-left
  token of every 2x2 cell (nearest 2x downsample of LN(x)) while keys/values are all tokens, and its
  residual is added to the sampled tokens, so it and every later block run on 1/4 of the tokens (stride
  32). The stride-16 tokens entering QD are kept, and query-based upsampling (QU) restores the stride-16
  grid: those tokens are the queries of a small cross-attention decoder over the deep tokens.
- Shrunk++: the QD block becomes edge-aware (EQD): an edge head (MLP C -> C/2 -> 2) on the tokens entering
  it predicts which patches hold a class boundary; those with p(edge) > tau keep full resolution, joining
  the 2x2 grid tokens as queries. Token counts then differ per image: the kept tokens are padded to the
  batch maximum and every later block masks the padding out of its keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from omniseg.models.layers.features import FEATURE_NAMES, FeatureSpec

VIT_NAMES = {
    "vit_t": "vit_tiny_patch16_224",
    "vit_s": "vit_small_patch16_224",
    "vit_b": "vit_base_patch16_224",
    "vit_l": "vit_large_patch16_224",
}
SHRINK_MODES = (None, "shrunk", "shrunkpp")


@dataclass
class EncoderOutput:
    """What the encoder hands the decoders.

    taps: [B, h*w, C] tokens of the `out_indices` blocks (plain mode; shallow to deep).
    grid: (h, w) of the stride-16 patch grid.
    hi_res: [B, h*w, C] tokens entering the QD block (shrink modes).
    deep: [B, N, C] tokens after the last block on the reduced set (shrink modes; N = padded count).
    deep_padding: bool [B, N], True where `deep` is padding (Shrunk++ only; None otherwise).
    edge_logits: [B, h*w, 2] patch edge logits of the EQD edge head (Shrunk++ only).
    kept: bool [B, h*w], the tokens that were EQD queries (Shrunk++ only).
    """

    taps: list[torch.Tensor]
    grid: tuple[int, int]
    hi_res: torch.Tensor | None = None
    deep: torch.Tensor | None = None
    deep_padding: torch.Tensor | None = None
    edge_logits: torch.Tensor | None = None
    kept: torch.Tensor | None = None


def grid_mask(h: int, w: int, device=None) -> torch.Tensor:
    """bool [h*w]: the top-left token of every 2x2 cell (QD's nearest downsampling)."""
    m = torch.zeros(h, w, dtype=torch.bool, device=device)
    m[::2, ::2] = True
    return m.flatten()


def grid_positions(h: int, w: int, device=None) -> torch.Tensor:
    """int64 [h*w/4]: the raster indices of `grid_mask`'s tokens, in raster order."""
    return (torch.arange(0, h, 2, device=device)[:, None] * w + torch.arange(0, w, 2, device=device)[None]).flatten()


def eqd_selection(edge_prob: torch.Tensor, h: int, w: int, tau: float) -> torch.Tensor:
    """bool [B, h*w]: EQD's queries, the 2x2 grid tokens plus every token with p(edge) > tau."""
    return grid_mask(h, w, edge_prob.device)[None] | (edge_prob > tau)


def gather_kept(x: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, L, C], kept bool [B, L] -> (tokens [B, N, C] in grid order, padding bool [B, N]); N = max kept."""
    counts = kept.sum(1)
    n = int(counts.max())
    # Stable sort puts the kept positions first, in their original (raster) order.
    order = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)[:, :n]
    tokens = torch.gather(x, 1, order[..., None].expand(-1, -1, x.shape[-1]))
    padding = torch.arange(n, device=x.device)[None] >= counts[:, None]
    return tokens, padding


def key_padding_bias(padding: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """bool [B, N] (True = padding) -> additive attention bias [B, 1, 1, N] (0 / -inf), for timm blocks."""
    if padding is None or not bool(padding.any()):
        return None
    bias = torch.zeros(padding.shape, dtype=dtype, device=padding.device).masked_fill(padding, float("-inf"))
    return bias[:, None, None, :]


def qd_block(block: nn.Module, x: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """A timm ViT block whose attention queries are a subset of its tokens.

    x: [B, L, C] all tokens (keys/values); queries: [B, N] indices into L. The residual is the sampled x,
    the block's pretrained weights are used unchanged. Returns [B, N, C].
    """
    attn = block.attn
    b, L, c = x.shape
    hx = block.norm1(x)
    hq = torch.gather(hx, 1, queries[..., None].expand(-1, -1, c))
    w_q, w_kv = attn.qkv.weight[:c], attn.qkv.weight[c:]
    b_q, b_kv = (attn.qkv.bias[:c], attn.qkv.bias[c:]) if attn.qkv.bias is not None else (None, None)
    heads, dh = attn.num_heads, attn.head_dim
    q = F.linear(hq, w_q, b_q).view(b, -1, heads, dh).transpose(1, 2)
    k, v = F.linear(hx, w_kv, b_kv).view(b, L, 2, heads, dh).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    y = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    y = attn.proj_drop(attn.proj(attn.norm(y.transpose(1, 2).reshape(b, -1, c))))
    xq = torch.gather(x, 1, queries[..., None].expand(-1, -1, c))
    xq = xq + block.drop_path1(block.ls1(y))
    return xq + block.drop_path2(block.ls2(block.mlp(block.norm2(xq))))


class EdgeHead(nn.Sequential):
    """Shrunk++'s patch edge classifier: MLP C -> C/2 -> 2 (no edge / edge)."""

    def __init__(self, dim: int):
        super().__init__(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, 2))


def edge_patch_targets(labels: torch.Tensor, patch: int, grid: tuple[int, int], ignore_index: int = 255) -> torch.Tensor:
    """int64 [B, h*w] edge targets from label maps [B, H, W]: 1 where the patch's valid labels are not all
    equal (it crosses a class boundary), 0 where they are, `ignore_index` where the patch has none
    (all void or padding), so such patches do not train the edge head."""
    h, w = grid
    b = labels.shape[0]
    lab = labels[:, : h * patch, : w * patch]
    if lab.shape[-2:] != (h * patch, w * patch):
        lab = F.pad(lab, (0, w * patch - lab.shape[-1], 0, h * patch - lab.shape[-2]), value=ignore_index)
    cells = lab.reshape(b, h, patch, w, patch).permute(0, 1, 3, 2, 4).reshape(b, h * w, patch * patch)
    valid = cells != ignore_index
    big = torch.iinfo(cells.dtype).max
    lo = torch.where(valid, cells, big).amin(-1)
    hi = torch.where(valid, cells, -1).amax(-1)
    target = (hi > lo).long()
    return torch.where(valid.any(-1), target, torch.full_like(target, ignore_index))


class QueryUpsample(nn.Module):
    """QU: the stride-16 tokens kept from before QD are the queries of `layers` post-norm transformer
    decoder layers (self-attention, cross-attention over the deep stride-32 tokens, FFN); out: the
    stride-16 grid at width `dim`. Queries come from the image itself, so any input size works (the
    official TPN head learns a fixed query grid per crop size instead)."""

    def __init__(self, in_dim: int, dim: int, heads: int, layers: int = 2, dropout: float = 0.1):
        super().__init__()
        self.query_proj = nn.Sequential(nn.Linear(in_dim, dim), nn.LayerNorm(dim))
        self.memory_proj = nn.Sequential(nn.Linear(in_dim, dim), nn.LayerNorm(dim))
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(dim, heads, 4 * dim, dropout, batch_first=True) for _ in range(layers))

    def forward(self, hi_res: torch.Tensor, deep: torch.Tensor, deep_padding: torch.Tensor | None) -> torch.Tensor:
        q, mem = self.query_proj(hi_res), self.memory_proj(deep)
        if deep_padding is not None and not bool(deep_padding.any()):
            deep_padding = None
        for layer in self.layers:
            q = layer(q, mem, memory_key_padding_mask=deep_padding)
        return q


class GridQueryUpsample(nn.Module):
    """QU as the official SegViT-Shrunk code (its TPN head): a learned grid x grid set of queries (the
    stride-16 grid of the training crop) reads the encoder's stages in turn, shallow to deep (the tokens
    entering QD, then the deep stride-32 tokens), each through Linear + LayerNorm and `layers` post-norm
    transformer decoder layers. Out: [B, grid*grid, dim], a fixed grid whatever the input size, so the
    released models are meant for inputs (or sliding-window tiles) of the training crop size."""

    def __init__(self, in_dim: int, dim: int, heads: int, grid: int, layers: int = 3, stages: int = 2,
                 dropout: float = 0.1):
        super().__init__()
        self.grid = int(grid)
        self.queries = nn.Embedding(self.grid * self.grid, dim)
        self.input_proj = nn.ModuleList(nn.Sequential(nn.Linear(in_dim, dim), nn.LayerNorm(dim)) for _ in range(stages))
        self.stages = nn.ModuleList(
            nn.ModuleList(nn.TransformerDecoderLayer(dim, heads, 4 * dim, dropout, batch_first=True)
                          for _ in range(layers))
            for _ in range(stages))

    def forward(self, features: Sequence[torch.Tensor], paddings: Sequence[torch.Tensor | None]) -> torch.Tensor:
        q = self.queries.weight[None].expand(features[0].shape[0], -1, -1)
        for proj, layers, feat, pad in zip(self.input_proj, self.stages, features, paddings):
            memory = proj(feat)
            if pad is not None and not bool(pad.any()):
                pad = None
            for layer in layers:
                q = layer(q, memory, memory_key_padding_mask=pad)
        return q


class PlainViT(nn.Module):
    """timm ViT (patch 16) as a token encoder, with optional QD / EQD at block `qd_index` (see module doc).

    Args:
        name: short name (vit_t/s/b/l) or a timm ViT name.
        out_indices: blocks (0-based) whose outputs are tapped in plain mode.
        shrink: None | "shrunk" | "shrunkpp".
        qd_index: the QD / EQD block.
        tau: Shrunk++'s edge threshold.
        weights: local timm ViT checkpoint (timm's filter converts jax/npz-style layouts and resizes the
            position embedding).
        keep_cls_token: the class token runs through the blocks and is dropped only from the taps
            (MMSeg's `with_cls_token=True`, the UPerNet-ViT checkpoints); default: dropped before the blocks.
        final_norm: the last block's output goes through the final LayerNorm (`body.norm`), tap included
            (MMSeg's `final_norm=True`).
        pos_resize: how the position embedding is resized to another patch grid: "timm" (timm's bicubic
            with antialiasing) or "mmseg" (bicubic, align_corners=False, no antialiasing, as MMSeg's ViT and
            the official SegViT code do; the two differ even when upsampling).
    """

    def __init__(self, name: str = "vit_b", *, out_indices: Sequence[int] = (5, 7, 11), shrink: str | None = None,
                 qd_index: int = 4, tau: float = 0.7, weights: str | None = None, drop_path_rate: float = 0.0,
                 keep_cls_token: bool = False, final_norm: bool = False, pos_resize: str = "timm",
                 **timm_kwargs):
        super().__init__()
        import timm

        if shrink not in SHRINK_MODES:
            raise ValueError(f"model.shrink must be null, 'shrunk' or 'shrunkpp', got {shrink!r}")
        if pos_resize not in ("timm", "mmseg"):
            raise ValueError(f"pos_resize must be 'timm' or 'mmseg', got {pos_resize!r}")
        if shrink and keep_cls_token:
            raise ValueError("Shrunk encoders run on the patch grid only: keep_cls_token must be false")
        self.timm_name = VIT_NAMES.get(name, name)
        # final_norm=False by default: SegViT taps block outputs directly (the official `final_norm=False`).
        kwargs = dict(pretrained=False, num_classes=0, dynamic_img_size=True, final_norm=bool(final_norm),
                      drop_path_rate=drop_path_rate)
        kwargs.update(timm_kwargs)
        self.body = timm.create_model(self.timm_name, **kwargs)
        if getattr(self.body, "patch_embed", None) is None or not hasattr(self.body, "blocks"):
            raise ValueError(f"{self.timm_name} is not a timm VisionTransformer")
        self.keep_cls_token, self.final_norm, self.pos_resize = bool(keep_cls_token), bool(final_norm), pos_resize
        if pos_resize == "mmseg" and (self.body.cls_token is None or self.body.num_prefix_tokens != 1
                                      or self.body.no_embed_class):
            raise ValueError("pos_resize='mmseg' needs a ViT with one class token inside the position embedding")
        self.patch_size = int(self.body.patch_embed.patch_size[0])
        self.embed_dim = int(self.body.embed_dim)
        self.num_heads = int(self.body.blocks[0].attn.num_heads)
        depth = len(self.body.blocks)
        self.out_indices = tuple(int(i) for i in out_indices)
        if any(not 0 <= i < depth for i in self.out_indices):
            raise ValueError(f"model.vit_out_indices {list(self.out_indices)} outside the {depth} blocks")
        self.shrink = shrink
        self.qd_index = int(qd_index)
        if shrink and not 0 <= self.qd_index < depth:
            raise ValueError(f"model.qd_index {self.qd_index} outside the {depth} blocks")
        self.tau = float(tau)
        self.edge_head = EdgeHead(self.embed_dim) if shrink == "shrunkpp" else None
        if weights:
            from omniseg.hub import load_backbone_weights

            load_backbone_weights(self, weights)

    @property
    def size_divisibility(self) -> int:
        return 2 * self.patch_size if self.shrink else self.patch_size

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Normalised images -> patch tokens [B, h*w, C] with position embedding (class token dropped)."""
        body = self.body
        t = body.patch_embed(x)  # [B, h, w, C] with dynamic_img_size
        grid = (t.shape[1], t.shape[2])  # (ints, or symbolic sizes in a dynamic-size export)
        t = self._bicubic_pos_embed(t) if self.pos_resize == "mmseg" else body._pos_embed(t)
        t = body.norm_pre(body.patch_drop(t))
        return (t if self.keep_cls_token else t[:, body.num_prefix_tokens:]), grid

    def _bicubic_pos_embed(self, t: torch.Tensor) -> torch.Tensor:
        """Class token + patch tokens [B, 1 + h*w, C] with the position embedding, resized to the (h, w)
        grid by plain bicubic interpolation (align_corners=False, no antialiasing) when it differs."""
        body = self.body
        b, h, w, c = t.shape
        pos = body.pos_embed
        gh, gw = body.patch_embed.grid_size
        symbolic = isinstance(h, torch.SymInt) or isinstance(w, torch.SymInt)  # resizing to the same grid is exact
        if symbolic or (h, w) != (gh, gw):
            patches = pos[:, 1:].reshape(1, gh, gw, c).permute(0, 3, 1, 2)
            patches = F.interpolate(patches, size=(h, w), mode="bicubic", align_corners=False)
            pos = torch.cat([pos[:, :1], patches.flatten(2).transpose(1, 2)], dim=1)
        tokens = torch.cat([body.cls_token.expand(b, -1, -1), t.reshape(b, h * w, c)], dim=1)
        return body.pos_drop(tokens + pos)

    def _block(self, block: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """One block; recomputed in backward when timm's `set_grad_checkpointing` is on."""
        from omniseg.models.layers.checkpointing import run_block

        enabled = bool(getattr(self.body, "grad_checkpointing", False))
        if bias is None:
            return run_block(block, x, enabled=enabled)
        return run_block(lambda t, m: block(t, attn_mask=m), x, bias, enabled=enabled)

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        t, grid = self.embed(x)
        h, w = grid
        if self.shrink and (h % 2 or w % 2):
            raise ValueError(f"Shrunk encoders need an even patch grid; got {h}x{w} patches "
                             f"(pad inputs to a multiple of {self.size_divisibility})")
        taps: list[torch.Tensor] = []
        out = EncoderOutput(taps=taps, grid=grid)
        padding = None
        prefix = self.body.num_prefix_tokens if self.keep_cls_token else 0
        last = len(self.body.blocks) - 1
        for i, block in enumerate(self.body.blocks):
            if self.shrink and i == self.qd_index:
                out.hi_res = t
                if self.edge_head is not None:  # EQD: an image-dependent number of queries
                    out.edge_logits = self.edge_head(t)
                    kept = eqd_selection(out.edge_logits.detach().softmax(-1)[..., 1], h, w, self.tau)
                    out.kept = kept
                    positions = torch.arange(h * w, device=t.device)[None].expand(t.shape[0], -1)
                    queries, padding = gather_kept(positions[..., None], kept)
                    queries = queries[..., 0]
                    if not bool(padding.any()):
                        padding = None
                else:  # QD: the top-left token of every 2x2 cell, in raster order (static shape: exportable)
                    queries = grid_positions(h, w, t.device)[None].expand(t.shape[0], -1)
                t = qd_block(block, t, queries)
            else:
                t = self._block(block, t, key_padding_bias(padding, t.dtype))
            if self.final_norm and i == last:
                t = self.body.norm(t)
            if not self.shrink and i in self.out_indices:
                taps.append(t[:, prefix:] if prefix else t)
        if self.shrink:
            out.deep, out.deep_padding = t, padding
        return out


class ViTFeaturePyramid(nn.Module):
    """A plain ViT as a multi-scale backbone for per-pixel heads (UPerNet): four tapped blocks, each
    through MMSeg's MultiLevelNeck (1x1 lateral conv, bilinear resize by 4 / 2 / 1 / 0.5, 3x3 conv), give
    res2..res5 at strides 4, 8, 16, 32 with the ViT's width. `multilevel_neck=False` returns the four taps
    as they are, all at the patch stride (MMSeg's UPerNet-DeiT configs with `neck=None`)."""

    SCALES = (4.0, 2.0, 1.0, 0.5)

    def __init__(self, name: str = "vit_b", *, out_indices: Sequence[int] = (2, 5, 8, 11), norm: str = "bn",
                 weights: str | None = None, drop_path_rate: float = 0.0, multilevel_neck: bool = True,
                 **timm_kwargs):
        super().__init__()
        if len(out_indices) != 4:
            raise ValueError(f"a ViT feature pyramid taps 4 blocks, got out_indices={list(out_indices)}")
        self.vit = PlainViT(name, out_indices=out_indices, weights=weights, drop_path_rate=drop_path_rate,
                            **timm_kwargs)
        dim = self.vit.embed_dim
        self.multilevel_neck = bool(multilevel_neck)
        scales = self.SCALES if self.multilevel_neck else (1.0,) * 4
        if self.multilevel_neck:
            self.laterals = nn.ModuleList(nn.Conv2d(dim, dim, 1) for _ in self.SCALES)
            self.convs = nn.ModuleList(nn.Conv2d(dim, dim, 3, padding=1) for _ in self.SCALES)
        stride = self.vit.patch_size
        self.specs = {n: FeatureSpec(dim, int(stride / s)) for n, s in zip(FEATURE_NAMES, scales)}
        self.timm_name = self.vit.timm_name

    @property
    def body(self) -> nn.Module:
        """The timm ViT (weights loading, gradient checkpointing switch)."""
        return self.vit.body

    @property
    def size_divisibility(self) -> int:
        return 2 * self.vit.patch_size

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        enc = self.vit(x)
        h, w = enc.grid
        if not self.multilevel_neck:
            return {name: tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
                    for name, tokens in zip(FEATURE_NAMES, enc.taps)}
        feats = {}
        for name, scale, lateral, conv, tokens in zip(FEATURE_NAMES, self.SCALES, self.laterals, self.convs, enc.taps):
            t = lateral(tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w))
            t = F.interpolate(t, scale_factor=scale, mode="bilinear", align_corners=False)
            feats[name] = conv(t)
        return feats
