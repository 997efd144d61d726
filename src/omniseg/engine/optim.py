"""Optimisers, parameter groups, learning-rate schedules and a weight average, chosen by `train.*`.

The choices are those the official configs of the seed systems use: AdamW (Mask2Former, MaskFormer,
OneFormer) or SGD with momentum (detectron2's R-CNNs, MMSegmentation's CNN heads); poly decay
(Mask2Former, MMSegmentation's PolyLR with `eta_min`), step decay at milestones (detectron2's
WarmupMultiStepLR) or cosine decay; linear or constant warmup (detectron2's WarmupParamScheduler);
per-parameter learning-rate and weight-decay rules (detectron2's WEIGHT_DECAY_NORM / _BIAS / _EMBED,
MMSegmentation's `paramwise_cfg.custom_keys`); and an exponential moving average of the weights.
The defaults are AdamW + linear warmup + poly decay with Mask2Former's parameter groups.
"""

from __future__ import annotations

import bisect
import copy
import math
from collections.abc import Mapping
from functools import partial

import torch
from torch import nn

from omniseg.models.base import Segmenter

_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
_CUSTOM_KEY_FIELDS = ("lr_mult", "decay_mult")


def _custom_key_order(custom_keys: Mapping) -> list[str]:
    """Longest key first, then alphabetical: the most specific substring decides (as mmengine)."""
    return sorted(sorted(custom_keys), key=len, reverse=True)


def parameter_rules(model: nn.Module, cfg: Mapping) -> list[tuple[str, nn.Parameter, float, float]]:
    """(name, parameter, lr, weight decay) of every trainable parameter, in module order.

    Rules, in order:
      1. lr = `lr`, x `backbone_multiplier` for parameters of the model's `backbone`.
      2. weight decay = `weight_decay`; parameters of norm layers: `weight_decay_norm`; embeddings and
         Swin's position tables: `weight_decay_embed`; other biases: `weight_decay_bias` when set.
      3. `custom_keys` {substring: {lr_mult, decay_mult}}: the longest key contained in the parameter's
         full name multiplies the lr and weight decay the rules above gave (e.g. `pos_embed: {decay_mult: 0}`,
         `head: {lr_mult: 10}`). A key that names no parameter is refused: a typo would silently change
         nothing.
    In mmengine a matching custom key replaces the norm / bias rules (lr = base x lr_mult, decay = base x
    decay_mult); here it scales what they give, so an MMSegmentation `paramwise_cfg` ports as
    backbone_multiplier 1, weight_decay_norm / _bias = weight_decay x norm_decay_mult / bias_decay_mult,
    and its custom_keys unchanged wherever they do not touch norms or biases.
    """
    from omniseg.schema import ConfigError

    lr = float(cfg["lr"])
    wd = float(cfg["weight_decay"])
    wd_norm = float(cfg.get("weight_decay_norm", 0.0))
    wd_embed = float(cfg.get("weight_decay_embed", 0.0))
    wd_bias = cfg.get("weight_decay_bias")
    backbone_mult = float(cfg.get("backbone_multiplier", 1.0))
    custom_keys = dict(cfg.get("custom_keys") or {})
    for key, rule in custom_keys.items():
        unknown = sorted(set(rule or {}) - set(_CUSTOM_KEY_FIELDS))
        if unknown:
            raise ConfigError(f"train.custom_keys.{key}: unknown field(s) {unknown}; "
                              f"choose from {', '.join(_CUSTOM_KEY_FIELDS)}")
    ordered_keys = _custom_key_order(custom_keys)
    matched: set[str] = set()

    # The backbone is what a Segmenter declares as `backbone` (the model contract, models/base.py).
    in_backbone = {id(p) for p in model.backbone.parameters()} if isinstance(model, Segmenter) else set()
    rules = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full_name = f"{module_name}.{name}" if module_name else name
            p_lr, p_wd = lr, wd
            if id(param) in in_backbone:
                p_lr = lr * backbone_mult
            if isinstance(module, _NORM_TYPES):
                p_wd = wd_norm
            elif isinstance(module, nn.Embedding) or "relative_position_bias_table" in name or "absolute_pos_embed" in name:
                p_wd = wd_embed
            elif name == "bias" and wd_bias is not None:
                p_wd = float(wd_bias)
            for key in ordered_keys:
                if key in full_name:
                    rule = custom_keys[key] or {}
                    p_lr *= float(rule.get("lr_mult", 1.0))
                    p_wd *= float(rule.get("decay_mult", 1.0))
                    matched.add(key)
                    break
            rules.append((full_name, param, p_lr, p_wd))
    unmatched = [k for k in ordered_keys if k not in matched]
    if unmatched:
        raise ConfigError(f"train.custom_keys: {unmatched} match no trainable parameter name of this model")
    return rules


def build_optimizer(model: nn.Module, cfg: Mapping) -> torch.optim.Optimizer:
    """`optimizer` adamw (default) or sgd (`momentum`, `nesterov`) over the groups of `parameter_rules`:
    one group per distinct (lr, weight decay), in the order the parameters first appear."""
    lr = float(cfg["lr"])
    wd = float(cfg["weight_decay"])
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for _, param, p_lr, p_wd in parameter_rules(model, cfg):
        groups.setdefault((p_lr, p_wd), []).append(param)
    param_groups = [{"params": ps, "lr": g_lr, "initial_lr": g_lr, "weight_decay": g_wd} for (g_lr, g_wd), ps in groups.items()]
    kind = str(cfg.get("optimizer", "adamw"))
    if kind == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, weight_decay=wd, momentum=float(cfg.get("momentum", 0.9)),
                               nesterov=bool(cfg.get("nesterov", False)))
    if kind != "adamw":
        raise ValueError(f"train.optimizer: {kind!r} is not one of adamw, sgd")
    # torch's fused kernel (CPU and CUDA): the same update in one pass over each tensor, faster than the
    # multi-tensor (foreach) path
    params = [p for ps in groups.values() for p in ps]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(param_groups, lr=lr, weight_decay=wd, fused=fused or None)


SCHEDULES = ("poly", "step", "cosine")
WARMUPS = ("linear", "constant")


class WarmupLR(torch.optim.lr_scheduler.LambdaLR):
    """lr(it) = warmup(it) x schedule(it), for each parameter group from its own base lr.

    schedule: poly   (base - min_lr) * (1 - it/T) ** power + min_lr   (min_lr 0: detectron2's and Mask2Former's
                     poly; MMSegmentation's PolyLR(eta_min, end=E) is min_lr=eta_min, T = E - 1)
              step   base * gamma ** (number of `steps` milestones <= it)     (detectron2's WarmupMultiStepLR)
              cosine (base - min_lr) * (1 + cos(pi * it/T)) / 2 + min_lr
              T = `decay_iters` (default max_iters); after T the lr stays at min_lr.
    warmup:   linear   from warmup_factor at it=0 to 1 at warmup_iters; constant: warmup_factor until
              warmup_iters, then 1 (detectron2's WarmupParamScheduler).
    """

    def __init__(self, optimizer, max_iters: int, *, schedule: str = "poly", power: float = 0.9,
                 steps=(), gamma: float = 0.1, min_lr: float = 0.0, warmup: str = "linear",
                 warmup_iters: int = 0, warmup_factor: float = 1.0, decay_iters: int | None = None,
                 last_epoch: int = -1):
        if schedule not in SCHEDULES:
            raise ValueError(f"train.schedule: {schedule!r} is not one of {', '.join(SCHEDULES)}")
        if warmup not in WARMUPS:
            raise ValueError(f"train.warmup: {warmup!r} is not one of {', '.join(WARMUPS)}")
        if list(steps) != sorted(steps):
            raise ValueError(f"train.steps must be increasing, got {list(steps)}")
        self.max_iters, self.schedule, self.power = max_iters, schedule, power
        self.decay_iters = int(decay_iters) if decay_iters else max_iters
        self.steps, self.gamma, self.min_lr = [int(s) for s in steps], gamma, float(min_lr)
        self.warmup, self.warmup_iters, self.warmup_factor = warmup, warmup_iters, warmup_factor
        bases = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        super().__init__(optimizer, [partial(self._factor, base_lr=b) for b in bases], last_epoch=last_epoch)

    def _warmup(self, it: int) -> float:
        if it >= self.warmup_iters:
            return 1.0
        if self.warmup == "constant":
            return self.warmup_factor
        alpha = it / max(1, self.warmup_iters)
        return self.warmup_factor * (1 - alpha) + alpha

    def _factor(self, it: int, base_lr: float) -> float:
        if self.schedule == "step":
            return self._warmup(it) * self.gamma ** bisect.bisect_right(self.steps, it)
        progress = min(it, self.decay_iters) / self.decay_iters
        decay = (max(0.0, 1.0 - it / self.decay_iters) ** self.power if self.schedule == "poly"
                 else 0.5 * (1.0 + math.cos(math.pi * progress)))
        if self.min_lr and base_lr > 0:
            floor = self.min_lr / base_lr
            decay = (1.0 - floor) * decay + floor
        return self._warmup(it) * decay


WarmupPolyLR = WarmupLR  # the earlier name: poly is WarmupLR's default schedule


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Mapping) -> WarmupLR:
    """The schedule `train.*` asks for (see WarmupLR)."""
    return WarmupLR(optimizer, int(cfg["max_iters"]), schedule=str(cfg.get("schedule", "poly")),
                    power=float(cfg.get("poly_power", 0.9)), steps=list(cfg.get("steps") or ()),
                    gamma=float(cfg.get("gamma", 0.1)), min_lr=float(cfg.get("min_lr", 0.0)),
                    warmup=str(cfg.get("warmup", "linear")), warmup_iters=int(cfg.get("warmup_iters", 0)),
                    warmup_factor=float(cfg.get("warmup_factor", 1.0)), decay_iters=cfg.get("decay_iters"))


class ModelEMA:
    """An exponential moving average of a model's weights: after each optimiser step, every floating-point
    parameter becomes ema = decay * ema + (1 - decay) * param, starting from the weights training starts
    with (timm's ModelEmaV2 update); buffers (BatchNorm statistics, counters) are copied from the model,
    as mmengine's ExponentialMovingAverage does by default. With `warmup`, the decay of update n (0-based)
    is min(decay, (1 + n) / (10 + n)) (TensorFlow's num_updates rule), so the initial weights fade
    quickly. `module` is the averaged model (eval mode, no gradients); `state_dict` / `load_state_dict`
    carry it and the update count through checkpoints."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = False):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"train.ema.decay must lie in [0, 1], got {decay}")
        self.decay, self.warmup = float(decay), bool(warmup)
        self.updates = 0
        self.module = copy.deepcopy(_unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        live = _unwrap(model)
        live_params = dict(live.named_parameters())
        averaged, current = [], []
        for name, p in self.module.named_parameters():
            if p.is_floating_point():
                averaged.append(p)
                current.append(live_params[name].detach())
            else:
                p.copy_(live_params[name])
        if averaged:
            torch._foreach_mul_(averaged, decay)
            torch._foreach_add_(averaged, current, alpha=1.0 - decay)
        live_buffers = dict(live.named_buffers())
        for name, b in self.module.named_buffers():
            b.copy_(live_buffers[name])
        self.updates += 1

    @torch.no_grad()
    def reset_to(self, model: nn.Module) -> None:
        """Restart the average at the model's current weights."""
        self.module.load_state_dict(_unwrap(model).state_dict())
        self.updates = 0

    def state_dict(self) -> dict:
        return {"weights": {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()},
                "updates": self.updates}

    def load_state_dict(self, state: Mapping) -> None:
        self.module.load_state_dict(state["weights"], strict=True)
        self.updates = int(state["updates"])


def build_ema(model: nn.Module, cfg: Mapping) -> ModelEMA | None:
    """The ModelEMA `train.ema` asks for, or None when it is disabled."""
    ema = cfg.get("ema") or {}
    if not ema.get("enabled", False):
        return None
    return ModelEMA(model, decay=float(ema.get("decay", 0.9999)), warmup=bool(ema.get("warmup", False)))


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
