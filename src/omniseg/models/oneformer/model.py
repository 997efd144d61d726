"""OneFormer: one Mask2Former-architecture model, trained once, conditioned on the task at inference.

What differs from Mask2Former (everything else is the shared MaskFormer meta-architecture):
- a task token Q_task = MLP(raw CLIP ids of "the task is {task}"), LayerNorm'ed by the decoder's norm;
- the N queries are N-1 copies of Q_task refined by a 2-layer DETR decoder over the 1/4-scale mask
  features (`QueryInitializer`), followed by Q_task itself; there is no learned query content;
- training adds the query-text contrastive loss between those pre-decoder queries and the text
  mapper's queries; every image carries its own task (targets' "task"), drawn by the data pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from omniseg.models.layers.mlp import MLP
from omniseg.models.layers.position_encoding import PositionEmbeddingSine
from omniseg.models.maskformer.detr_decoder import DetrDecoderLayer
from omniseg.models.base import cfg_get
from omniseg.models.maskformer.model import MaskFormer
from omniseg.models.oneformer.text import (
    TASKS,
    PromptTokenizer,
    TextMapper,
    query_text_contrastive_loss,
    task_token_ids,
)


class QueryInitializer(nn.Module):
    """N-1 copies of the task token refined by a DETR decoder over the flattened mask features.

    Follows the official code, including its argument order: the memory (values) is the sine position
    encoding of the mask features and the "position" added to the keys is their 1x1 projection, so keys
    = encoding + projection, values = encoding. Checkpoints depend on this.
    """

    def __init__(self, mask_dim: int, hidden_dim: int, nheads: int, dim_feedforward: int, layers: int = 2,
                 dropout: float = 0.1, pre_norm: bool = False):
        super().__init__()
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.input_proj = nn.Conv2d(mask_dim, hidden_dim, kernel_size=1)
        self.layers = nn.ModuleList(DetrDecoderLayer(hidden_dim, nheads, dim_feedforward, dropout, pre_norm)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(hidden_dim)
        for p in self.layers.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, task_token: torch.Tensor, mask_features: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        """task_token [B, C] (normalised), mask_features [B, D, H, W], query_pos [N-1, C] -> [B, N-1, C]."""
        b = mask_features.shape[0]
        memory = self.pe_layer(mask_features).flatten(2).transpose(1, 2)  # values: the encoding only
        key_pos = self.input_proj(mask_features).flatten(2).transpose(1, 2)
        query_pos = query_pos.unsqueeze(0).expand(b, -1, -1)
        queries = task_token.unsqueeze(1).expand_as(query_pos)
        for layer in self.layers:
            queries = layer(queries, memory, key_pos, query_pos)
        return self.norm(queries)


class OneFormer(MaskFormer):
    """Task-conditioned Mask2Former (see module docstring). `cfg["oneformer"]` holds the OneFormer-only
    settings (see configs/_base_.yaml); `predict` runs the transformer decoder once per task."""

    learned_query_content = False
    training_only = MaskFormer.training_only + ("text_mapper", "logit_scale")

    def __init__(self, cfg: Mapping, num_classes: int, thing_ids: Sequence[int] = ()):
        if dict(cfg_get(cfg, "mp", {}) or {}).get("enabled", False):
            raise ValueError("model.mp (mask-piloted training) is not available for OneFormer")
        super().__init__(cfg, num_classes, thing_ids)
        of = dict(cfg_get(cfg, "oneformer", {}) or {})
        hidden = self.predictor.hidden_dim
        if self.predictor.num_queries < 2:
            raise ValueError("OneFormer needs num_queries >= 2 (N-1 object queries plus the task token)")
        self.task_seq_len = int(of.get("task_seq_len", 77))
        self.task_mlp = MLP(self.task_seq_len, hidden, hidden, 2)
        self.query_init = QueryInitializer(
            int(cfg_get(cfg, "mask_dim", 256)), hidden, int(cfg_get(cfg, "nheads", 8)),
            int(cfg_get(cfg, "dim_feedforward", 2048)), layers=int(of.get("query_dec_layers", 2)),
            dropout=float(of.get("query_dropout", 0.1)), pre_norm=bool(cfg_get(cfg, "pre_norm", False)))
        n_ctx = int(of.get("n_ctx", 16))
        self.num_text = self.predictor.num_queries - n_ctx
        if self.num_text < 1:
            raise ValueError(f"oneformer.n_ctx ({n_ctx}) must be smaller than num_queries ({self.predictor.num_queries})")
        vocab = int(of.get("text_vocab_size", 49408))
        context = int(of.get("text_context_length", 77))
        self.tokenizer = PromptTokenizer(num_classes, vocab, context)
        self.text_mapper = TextMapper(
            vocab_size=vocab, context_length=context, width=int(of.get("text_width", hidden)),
            layers=int(of.get("text_layers", 6)), hidden_dim=hidden, proj_layers=int(of.get("text_proj_layers", 2)),
            n_ctx=n_ctx, causal=bool(of.get("text_causal", True)))
        self.contrastive_weight = float(of.get("contrastive_weight", 0.5))
        self.logit_scale = nn.Parameter(torch.tensor(1 / float(of.get("contrastive_temperature", 0.07))).log())
        self.default_task = str(cfg_get(cfg, "test", {}).get("task", "panoptic"))
        if self.default_task not in TASKS:
            raise ValueError(f"model.test.task must be one of {TASKS}, got {self.default_task!r}")

    # -- network -------------------------------------------------------------------------------
    def task_token(self, task_ids: torch.Tensor) -> torch.Tensor:
        """Raw task ids [B, task_seq_len] -> Q_task [B, C] (before the decoder's LayerNorm)."""
        return self.task_mlp(task_ids.float())

    def decode(self, multi_scale: list[torch.Tensor], mask_features: torch.Tensor, task_ids: torch.Tensor,
               aux_outputs: bool = True) -> dict:
        """Transformer decoder for per-image task ids; adds "contrastive_queries" (the N initial queries)."""
        task = self.predictor.decoder_norm(self.task_token(task_ids).to(mask_features.dtype))
        objects = self.query_init(task, mask_features, self.predictor.query_embed.weight[:-1])
        queries = torch.cat([objects, task.unsqueeze(1)], dim=1)
        outputs = self.predictor(multi_scale, mask_features, queries=queries, aux_outputs=aux_outputs)
        outputs["contrastive_queries"] = queries
        return outputs

    def forward_raw(self, x: torch.Tensor, task: str | None = None, aux_outputs: bool = True) -> dict:
        """Normalised images -> raw query predictions for `task` (default: model.test.task)."""
        mask_features, multi_scale = self.pixel_features(x)
        ids = task_token_ids([task or self.default_task] * x.shape[0], self.task_seq_len, x.device)
        return self.decode(multi_scale, mask_features, ids, aux_outputs=aux_outputs)

    # -- training ------------------------------------------------------------------------------
    def training_outputs(self, x: torch.Tensor, targets: list[dict]):
        """Each target names its "task" (default panoptic): it picks the task token and the padding of
        the text prompts. Adds the query-text contrastive loss to MaskFormer's set losses."""
        tasks = [str(t.get("task", "panoptic")) for t in targets]
        mask_features, multi_scale = self.pixel_features(x)
        outputs = self.decode(multi_scale, mask_features, task_token_ids(tasks, self.task_seq_len, x.device))
        object_queries = outputs.pop("contrastive_queries")
        prompts = torch.stack([self.tokenizer.prompts(t["labels"].tolist(), task, self.num_text)
                               for t, task in zip(targets, tasks)]).to(x.device)
        text_queries = self.text_mapper(prompts)

        def contrastive(targets, generators):
            return {"loss_contrastive": self.contrastive_weight * query_text_contrastive_loss(
                object_queries, text_queries, self.logit_scale)}

        return outputs, contrastive

    # -- inference -----------------------------------------------------------------------------
    def decoder_passes(self, images: torch.Tensor, tasks: Sequence[str]) -> list[tuple[list[str], dict]]:
        """One transformer-decoder pass per task, each with its task token; the backbone and pixel
        decoder run once."""
        mask_features, multi_scale = self.pixel_features(self.normalize(images))
        return [([task], self.decode(multi_scale, mask_features,
                                     task_token_ids([task] * images.shape[0], self.task_seq_len, images.device),
                                     aux_outputs=False))
                for task in tasks]
