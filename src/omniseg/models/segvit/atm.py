"""SegViT's Attention-to-Mask (ATM) decoder and its loss.

One learnable class token per class (token k answers for class k: no Hungarian matching). Each ATM
layer is a post-norm transformer decoder layer whose cross-attention, from the class tokens to the
projected ViT tokens, also returns its similarity map before the softmax, averaged over heads:
mask logits S = mean_h(Q_h K_hᵀ / sqrt(d_h)), mask = sigmoid(S). Stages read ViT layers deepest first;
the last layer of each stage gives that stage's mask logits, summed over the stages so far, and a
shared linear head on the class tokens gives K+1 class logits (the last = class absent). With a single
stage (the Shrunk models' decoder after QU) every layer gives its own output, as the official TPN head.

Prediction: score_c = sum_k softmax(cls_k)[c] * sigmoid(M_k); argmax over c.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from omniseg.models.maskformer.criterion import dice_loss, sigmoid_focal_loss


class SimilarityCrossAttention(nn.Module):
    """Multi-head cross-attention that also returns the head-averaged pre-softmax similarity."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.1):
        super().__init__()
        if dim % heads:
            raise ValueError(f"ATM width {dim} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, dim // heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(dropout)

    def forward(self, query: torch.Tensor, memory: torch.Tensor,
                memory_padding: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, d = query.shape
        q = self.q_proj(query).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(memory).view(b, -1, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(memory).view(b, -1, self.heads, self.head_dim).transpose(1, 2)
        sim = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # [B, H, N, L]
        logits = sim
        if memory_padding is not None:
            logits = sim.masked_fill(memory_padding[:, None, None, :], float("-inf"))
        attn = self.attn_drop(logits.softmax(-1))
        out = (attn @ v).transpose(1, 2).reshape(b, n, d)
        return self.out_proj(out), sim.mean(1)


class ATMLayer(nn.Module):
    """Post-norm decoder layer (self-attention, similarity cross-attention, ReLU FFN 4x), as PyTorch's
    TransformerDecoderLayer with dropout 0.1."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.1):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.cross_attn = SimilarityCrossAttention(dim, heads, dropout)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                 nn.Linear(4 * dim, dim))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop1, self.drop2, self.drop3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, q: torch.Tensor, memory: torch.Tensor,
                memory_padding: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.norm1(q + self.drop1(self.self_attn(q, q, q, need_weights=False)[0]))
        y, sim = self.cross_attn(q, memory, memory_padding)
        q = self.norm2(q + self.drop2(y))
        q = self.norm3(q + self.drop3(self.ffn(q)))
        return q, sim


class ATMDecoder(nn.Module):
    """Class tokens + `stages` x `layers_per_stage` ATM layers + shared class head.

    Args:
        in_dim: encoder width; every stage input gets Linear(in_dim -> dim) + LayerNorm (unless use_proj
            is false: inputs already at width dim are read unchanged).
        num_classes: K (one token each).
        stages: number of encoder token maps read (deepest first).
    Returns from forward: a list of {"pred_logits": [B, K, K+1], "pred_masks": [B, K, h, w]} (mask
    logits at the token grid), last = final output, the rest for deep supervision.
    """

    def __init__(self, in_dim: int, num_classes: int, *, dim: int = 384, heads: int = 6, stages: int = 3,
                 layers_per_stage: int = 3, dropout: float = 0.1, use_proj: bool = True):
        super().__init__()
        self.num_classes, self.stages = num_classes, stages
        self.class_tokens = nn.Embedding(num_classes, dim)
        if not use_proj and in_dim != dim:
            raise ValueError(f"an ATM decoder without input projection reads width {dim}, got {in_dim}")
        # use_proj=False: the inputs are read as they are (the official grid-query Shrunk decoder)
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Linear(in_dim, dim), nn.LayerNorm(dim)) if use_proj else nn.Identity()
            for _ in range(stages))
        self.layers = nn.ModuleList(
            nn.ModuleList(ATMLayer(dim, heads, dropout) for _ in range(layers_per_stage)) for _ in range(stages))
        self.class_head = nn.Linear(dim, num_classes + 1)
        for proj in self.input_proj:
            if use_proj:
                nn.init.trunc_normal_(proj[0].weight, std=0.02)
                nn.init.zeros_(proj[0].bias)

    def forward(self, features: Sequence[torch.Tensor], grid: tuple[int, int],
                paddings: Sequence[torch.Tensor | None] | None = None) -> list[dict]:
        """features: `stages` token maps [B, L, in_dim], deepest first (L = h*w of `grid`)."""
        if len(features) != self.stages:
            raise ValueError(f"ATM decoder has {self.stages} stages, got {len(features)} feature maps")
        paddings = list(paddings) if paddings is not None else [None] * self.stages
        b = features[0].shape[0]
        h, w = grid
        q = self.class_tokens.weight[None].expand(b, -1, -1)
        outputs, summed = [], None
        per_layer = self.stages == 1
        for proj, layers, feat, pad in zip(self.input_proj, self.layers, features, paddings):
            memory = proj(feat)
            for j, layer in enumerate(layers):
                q, sim = layer(q, memory, pad)
                if per_layer or j == len(layers) - 1:
                    masks = sim if per_layer else (sim if summed is None else summed + sim)
                    if not per_layer:
                        summed = masks
                    outputs.append({"pred_logits": self.class_head(q), "pred_masks": masks.view(b, -1, h, w)})
        return outputs


def semantic_scores(pred_logits: torch.Tensor, pred_masks: torch.Tensor) -> torch.Tensor:
    """[B, K, K+1] class logits, [B, K, H, W] mask logits -> [B, K, H, W] per-class scores."""
    probs = pred_logits.float().softmax(-1)[..., :-1]
    return torch.einsum("bqc,bqhw->bchw", probs, pred_masks.float().sigmoid())


def atm_losses(outputs: Sequence[dict], targets: Sequence[dict], num_classes: int, *, eos_coef: float = 0.1,
               class_weight: float = 1.0, focal_weight: float = 20.0, dice_weight: float = 1.0,
               label_offset: int = 0, class_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """SegViT's loss on every output (deep supervision), fixed token-class assignment.

    targets: the engine's semantic targets ({"labels": [N] class ids, "masks": bool [N, H, W]}). Token k
    stands for class `label_offset + k`; labels outside [offset, offset + K) are not this decoder's (they
    neither get a token nor a mask loss). Class term: weighted CE over K+1 for all K tokens, target k if
    the class is present else absent (weight `eos_coef`). Mask terms, present classes only: sigmoid focal
    (alpha 0.25, gamma 2) and dice on masks upsampled to the target size, divided by the number of
    (image, present class) pairs (averaged over DDP ranks). Pixels in no mask (void, padding) are
    negatives, as in the official code. `class_weights` [K] weigh the class term per token's class.
    """
    from omniseg.models.maskformer.criterion import count_num_masks

    device = outputs[-1]["pred_logits"].device
    local = []
    for t in targets:
        labels = t["labels"].long() - label_offset
        keep = (labels >= 0) & (labels < num_classes)
        local.append({"labels": labels[keep], "masks": t["masks"][keep]})
    num_masks = count_num_masks(local, device)
    weight = torch.ones(num_classes + 1, device=device)
    if class_weights is not None:
        weight[:-1] = class_weights.to(device)
    weight[-1] = eos_coef
    cls_targets = torch.full((len(targets), num_classes), num_classes, dtype=torch.long, device=device)
    for i, t in enumerate(local):
        cls_targets[i, t["labels"]] = t["labels"]
    losses: dict[str, torch.Tensor] = {}
    for j, out in enumerate(outputs):
        suffix = "" if j == len(outputs) - 1 else f"_{j}"
        logits = out["pred_logits"].float()
        loss_ce = F.cross_entropy(logits.transpose(1, 2), cls_targets, weight=weight)
        pred, gt = [], []
        for i, t in enumerate(local):
            if len(t["labels"]):
                pred.append(out["pred_masks"][i, t["labels"]])
                gt.append(t["masks"])
        if pred:
            size = gt[0].shape[-2:]
            p = torch.cat([F.interpolate(m[None].float(), size=size, mode="bilinear", align_corners=False)[0]
                           for m in pred]).flatten(1)
            g = torch.cat(gt).flatten(1).float()
            loss_focal, loss_dice = sigmoid_focal_loss(p, g, num_masks), dice_loss(p, g, num_masks)
        else:
            loss_focal = loss_dice = out["pred_masks"].sum() * 0.0
        losses[f"loss_ce{suffix}"] = class_weight * loss_ce
        losses[f"loss_focal{suffix}"] = focal_weight * loss_focal
        losses[f"loss_dice{suffix}"] = dice_weight * loss_dice
    return losses
