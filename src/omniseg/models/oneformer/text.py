"""OneFormer's text side: the task-token ids, the prompt tokenizer, the text mapper and the
query-text contrastive loss.

Task tokens: "the task is {task}" as CLIP BPE ids, zero-padded to `task_seq_len`, fed to the task MLP as
raw floats (the official recipe). Only three sequences exist at inference, so they are constants here:
no tokenizer file, no download, and HF / official checkpoints see exactly the ids they were trained on.

Prompts ("a photo with a {class}", "a/an {task} photo") feed only the text mapper, which exists only in
training and is trained from scratch with the model. A word-level tokenizer over that fixed vocabulary
(template words + one token per class) is therefore enough; it keeps CLIP's layout (start token
vocab-2, end token vocab-1, zero padding) so the end token is the argmax id, as the encoder's pooling
expects. Feeding ids directly (`TextMapper(ids)`) keeps parity with HF testable.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from omniseg.models.layers.mlp import MLP

# CLIP BPE of "the task is {task}" with start (49406) and end (49407) tokens; the official repo's
# "The task is ..." gives the same ids (CLIP lowercases).
TASK_TOKEN_IDS = {
    "semantic": (49406, 518, 10549, 533, 29119, 1550, 49407),
    "instance": (49406, 518, 10549, 533, 34572, 49407),
    "panoptic": (49406, 518, 10549, 533, 1072, 24755, 49407),
}


def task_token_ids(tasks: Sequence[str], seq_len: int = 77, device=None) -> torch.Tensor:
    """int64 [len(tasks), seq_len]: each task's CLIP ids, zero-padded."""
    out = torch.zeros(len(tasks), seq_len, dtype=torch.int64, device=device)
    for i, task in enumerate(tasks):
        if task not in TASK_TOKEN_IDS:
            raise ValueError(f"unknown task {task!r}; OneFormer knows {tuple(TASK_TOKEN_IDS)}")
        ids = TASK_TOKEN_IDS[task]
        if len(ids) > seq_len:
            raise ValueError(f"task_seq_len {seq_len} is shorter than the task prompt ({len(ids)} tokens)")
        out[i, :len(ids)] = torch.tensor(ids)
    return out


class PromptTokenizer:
    """Word-level ids for the text mapper's prompts over the classes 0..K-1.

    Id layout: 0 padding, 1..7 the template words, 8..8+K-1 the classes (one token each, whatever the
    class name's length), vocab-2 start, vocab-1 end.
    """

    WORDS = ("a", "an", "photo", "with", "semantic", "instance", "panoptic")

    def __init__(self, num_classes: int, vocab_size: int, context_length: int):
        self.num_classes = num_classes
        self.first_class = 1 + len(self.WORDS)
        self.start, self.end = vocab_size - 2, vocab_size - 1
        if self.first_class + num_classes > self.start:
            raise ValueError(f"text vocab_size {vocab_size} cannot hold {num_classes} classes "
                             f"(needs >= {self.first_class + num_classes + 2})")
        if context_length < 7:
            raise ValueError(f"text context_length must be >= 7 (longest prompt), got {context_length}")
        self.word_ids = {w: i + 1 for i, w in enumerate(self.WORDS)}
        self.context_length = context_length

    def _encode(self, tokens: Sequence[int]) -> list[int]:
        ids = [self.start, *tokens, self.end]
        return ids + [0] * (self.context_length - len(ids))

    def class_prompt(self, label: int) -> list[int]:
        """"a photo with a {class}"."""
        if not 0 <= label < self.num_classes:
            raise ValueError(f"class id {label} outside 0..{self.num_classes - 1}")
        w = self.word_ids
        return self._encode([w["a"], w["photo"], w["with"], w["a"], self.first_class + label])

    def task_prompt(self, task: str) -> list[int]:
        """"a semantic photo" / "an instance photo" / "a panoptic photo" (the padding prompts)."""
        w = self.word_ids
        return self._encode([w["an" if task == "instance" else "a"], w[task], w["photo"]])

    def prompts(self, labels: Sequence[int], task: str, num_text: int) -> torch.Tensor:
        """int64 [num_text, context_length]: one class prompt per GT mask (first `num_text`), then the
        task prompt as padding."""
        rows = [self.class_prompt(int(c)) for c in list(labels)[:num_text]]
        rows += [self.task_prompt(task)] * (num_text - len(rows))
        return torch.tensor(rows, dtype=torch.int64)


class TextLayer(nn.Module):
    """CLIP residual block: pre-norm self-attention and a 4x quick-GELU MLP (HF / official names)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.layer_norm1 = nn.LayerNorm(width)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(width, 4 * width)
        self.mlp.fc2 = nn.Linear(4 * width, width)
        self.layer_norm2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        h = self.layer_norm1(x)
        x = x + self.self_attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0]
        h = self.mlp.fc1(self.layer_norm2(x))
        return x + self.mlp.fc2(h * torch.sigmoid(1.702 * h))


class TextEncoder(nn.Module):
    """Token + position embeddings -> `layers` CLIP blocks -> LayerNorm -> the end token's feature.

    `causal=True` is the official OneFormer encoder; HF transformers builds the causal mask but never
    applies it, so its checkpoints behave as `causal=False`.
    """

    def __init__(self, vocab_size: int, context_length: int, width: int, layers: int, causal: bool = True):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = nn.Module()
        self.transformer.layers = nn.ModuleList(TextLayer(width, max(1, width // 64)) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.causal = causal
        # True = blocked: each token sees itself and the tokens before it.
        self.register_buffer("causal_mask", torch.ones(context_length, context_length, dtype=torch.bool).triu_(1),
                             persistent=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """int64 [T, L] -> [T, width]."""
        x = self.token_embedding(ids) + self.positional_embedding
        mask = self.causal_mask if self.causal else None
        for layer in self.transformer.layers:
            x = layer(x, mask)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]


class TextMapper(nn.Module):
    """Prompt ids [B, N_text, L] -> text queries [B, N_text + N_ctx, C]: encoder, projection MLP, then
    `n_ctx` learnable context vectors appended. Training only (OneFormer drops it at inference)."""

    def __init__(self, *, vocab_size: int, context_length: int, width: int, layers: int, hidden_dim: int,
                 proj_layers: int = 2, n_ctx: int = 16, causal: bool = True):
        super().__init__()
        self.text_encoder = TextEncoder(vocab_size, context_length, width, layers, causal)
        self.text_projector = MLP(width, hidden_dim, hidden_dim, proj_layers)
        self.prompt_ctx = nn.Embedding(n_ctx, hidden_dim) if n_ctx > 0 else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b, n, length = ids.shape
        queries = self.text_projector(self.text_encoder(ids.reshape(b * n, length))).reshape(b, n, -1)
        if self.prompt_ctx is not None:
            queries = torch.cat([queries, self.prompt_ctx.weight.unsqueeze(0).expand(b, -1, -1)], dim=1)
        return queries


def _gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` over DDP ranks, keeping each rank's gradient path (identity without DDP)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def query_text_contrastive_loss(object_queries: torch.Tensor, text_queries: torch.Tensor,
                                logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE between whole query sets: each image's [N, C] object queries and [N, C] text
    queries flattened to one vector, L2-normalised; images x texts similarity (over all DDP ranks) times
    exp(logit_scale) clamped to 100; CE(image -> text) + CE(text -> image), summed."""
    image = F.normalize(_gather_with_grad(object_queries.float().flatten(1)), dim=-1)
    text = F.normalize(_gather_with_grad(text_queries.float().flatten(1)), dim=-1)
    logits_per_text = text @ image.t() * logit_scale.exp().clamp(max=100)
    target = torch.arange(len(image), device=image.device)
    return F.cross_entropy(logits_per_text.t(), target) + F.cross_entropy(logits_per_text, target)
