"""OneFormer's settings (the Mask2Former family's plus the task token, query initialiser and text mapper)
and its registration. Defaults are the official COCO R-50 values."""

from __future__ import annotations

from dataclasses import dataclass, field

from omniseg.models.maskformer.family import MaskFormerSettings, MaskFormerTest
from omniseg.models.registry import Family
from omniseg.schema import choice
from omniseg.tasks import TASKS


@dataclass
class OneFormerOptions:
    task_seq_len: int = 77             # task-token ids fed to the task MLP (CLIP ids of "the task is {task}")
    query_dec_layers: int = 2          # DETR layers refining the N-1 task-token copies over the 1/4 features
    query_dropout: float = 0.1
    n_ctx: int = 16                    # learnable context vectors appended to the text queries
    text_layers: int = 6               # text encoder (training only)
    text_width: int = 256
    text_vocab_size: int = 49408       # >= 10 + classes; start/end tokens are the last two ids
    text_context_length: int = 77
    text_proj_layers: int = 2
    text_causal: bool = True           # official causal mask (HF transformers checkpoints: false)
    contrastive_weight: float = 0.5
    contrastive_temperature: float = 0.07


@dataclass
class OneFormerTest(MaskFormerTest):
    task: str = choice("panoptic", TASKS)  # the task token of forward_raw / export


@dataclass
class OneFormerSettings(MaskFormerSettings):
    arch: str = choice("oneformer", ("oneformer",))
    oneformer: OneFormerOptions = field(default_factory=OneFormerOptions)
    test: OneFormerTest = field(default_factory=OneFormerTest)


def describe(s: OneFormerSettings) -> tuple[str, str]:
    return s.arch, f"{s.num_queries} queries, {s.dec_layers} decoder layers, task token"


FAMILY = Family(name="oneformer", archs=("oneformer",), settings=OneFormerSettings,
                model="omniseg.models.oneformer.model:OneFormer", describe=describe)
