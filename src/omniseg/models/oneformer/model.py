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
from omniseg.models.maskformer.model import MaskFormer
from omniseg.models.oneformer.family import OneFormerSettings
from omniseg.models.oneformer.text import (
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
    settings (OneFormerOptions in family.py); `predict` runs the transformer decoder once per task."""

    settings_class = OneFormerSettings
    learned_query_content = False
    training_only = MaskFormer.training_only + ("text_mapper", "logit_scale")

    def __init__(self, settings: OneFormerSettings | Mapping, num_classes: int, thing_ids: Sequence[int] = ()):
        s = self.settings_class.coerce(settings)
        if s.mp.enabled:
            raise ValueError("model.mp (mask-piloted training) is not available for OneFormer")
        super().__init__(s, num_classes, thing_ids)
        of = s.oneformer
        hidden = self.predictor.hidden_dim
        if self.predictor.num_queries < 2:
            raise ValueError("OneFormer needs num_queries >= 2 (N-1 object queries plus the task token)")
        self.task_seq_len = of.task_seq_len
        self.task_mlp = MLP(self.task_seq_len, hidden, hidden, 2)
        self.query_init = QueryInitializer(s.mask_dim, hidden, s.nheads, s.dim_feedforward,
                                           layers=of.query_dec_layers, dropout=of.query_dropout, pre_norm=s.pre_norm)
        self.num_text = self.predictor.num_queries - of.n_ctx
        if self.num_text < 1:
            raise ValueError(f"oneformer.n_ctx ({of.n_ctx}) must be smaller than num_queries ({self.predictor.num_queries})")
        self.tokenizer = PromptTokenizer(num_classes, of.text_vocab_size, of.text_context_length)
        self.text_mapper = TextMapper(
            vocab_size=of.text_vocab_size, context_length=of.text_context_length, width=of.text_width,
            layers=of.text_layers, hidden_dim=hidden, proj_layers=of.text_proj_layers, n_ctx=of.n_ctx,
            causal=of.text_causal)
        self.contrastive_weight = of.contrastive_weight
        self.logit_scale = nn.Parameter(torch.tensor(1 / of.contrastive_temperature).log())
        self.default_task = s.test.task

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

    def raw_forward_options(self, task: str | None = None) -> dict:
        """The last prediction set for `task` (default: model.test.task), which the graph bakes in."""
        return {"aux_outputs": False, "task": task or self.default_task}

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
