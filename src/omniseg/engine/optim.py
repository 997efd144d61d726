"""AdamW with Mask2Former's parameter groups, and warmup + poly learning-rate schedule."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from omniseg.models.base import Segmenter

_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def build_optimizer(model: nn.Module, cfg: Mapping) -> torch.optim.Optimizer:
    """AdamW; backbone lr x `backbone_multiplier`; no weight decay on norms and embeddings
    (`weight_decay_norm`, `weight_decay_embed`), as in Mask2Former's `build_optimizer`."""
    lr = float(cfg["lr"])
    wd = float(cfg["weight_decay"])
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    seen: set[int] = set()
    # The backbone is what a Segmenter declares as `backbone` (the model contract, models/base.py).
    in_backbone = {id(p) for p in model.backbone.parameters()} if isinstance(model, Segmenter) else set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            p_lr, p_wd = lr, wd
            if id(param) in in_backbone:
                p_lr = lr * float(cfg.get("backbone_multiplier", 1.0))
            if isinstance(module, _NORM_TYPES):
                p_wd = float(cfg.get("weight_decay_norm", 0.0))
            elif isinstance(module, nn.Embedding) or "relative_position_bias_table" in name or "absolute_pos_embed" in name:
                p_wd = float(cfg.get("weight_decay_embed", 0.0))
            groups.setdefault((p_lr, p_wd), []).append(param)
    param_groups = [{"params": ps, "lr": g_lr, "initial_lr": g_lr, "weight_decay": g_wd} for (g_lr, g_wd), ps in groups.items()]
    # torch's fused kernel (CPU and CUDA): the same update in one pass over each tensor, faster than the
    # multi-tensor (foreach) path
    params = [p for ps in groups.values() for p in ps]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(param_groups, lr=lr, weight_decay=wd, fused=fused or None)


class WarmupPolyLR(torch.optim.lr_scheduler.LambdaLR):
    """lr = base * warmup(it) * (1 - it/max_iters) ** power; linear warmup from `warmup_factor`."""

    def __init__(self, optimizer, max_iters: int, *, power: float = 0.9, warmup_iters: int = 0,
                 warmup_factor: float = 1.0, last_epoch: int = -1):
        self.max_iters, self.power = max_iters, power
        self.warmup_iters, self.warmup_factor = warmup_iters, warmup_factor
        super().__init__(optimizer, self._factor, last_epoch=last_epoch)

    def _factor(self, it: int) -> float:
        warm = 1.0
        if it < self.warmup_iters:
            alpha = it / max(1, self.warmup_iters)
            warm = self.warmup_factor * (1 - alpha) + alpha
        return warm * max(0.0, 1.0 - it / self.max_iters) ** self.power
