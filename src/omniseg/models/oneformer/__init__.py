"""OneFormer (task-conditioned universal segmentation) on the shared Mask2Former modules."""

from omniseg.models.oneformer.model import OneFormer, QueryInitializer
from omniseg.models.oneformer.text import TASK_TOKEN_IDS, PromptTokenizer, TextMapper, task_token_ids

__all__ = ["OneFormer", "QueryInitializer", "TASK_TOKEN_IDS", "PromptTokenizer", "TextMapper", "task_token_ids"]
