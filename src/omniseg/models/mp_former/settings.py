"""The settings of mask-piloted training (config section `model.mp` of the Mask2Former family)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class PilotSettings:
    """Knobs of mask-piloted training.

    The defaults are those of the released MP-Former training scripts: one group, label noise 0.2,
    no point noise, every decoder layer piloted. The official config defaults (and the paper's
    ablations) use 5 groups and point noise 0.2 (preset mp_former_r50_g5).
    """

    enabled: bool = False          # MP-Former: train Mask2Former with piloted queries (inference unchanged)
    groups: int = 1                # query groups G
    label_noise: float = 0.2       # probability that a label-guided query embeds a random class
    point_noise: float = 0.0       # point noise: ~this fraction of a mask's area flipped per layer
    piloted_layers: Optional[int] = None  # null: every decoder layer piloted; n: only layers 0..n-1
    shift_noise: float = 0.0       # ablation: shift by U(-1, 1) x this x half the box size
    scale_noise: float = 0.0       # ablation: enlarge by 1 + this with probability 0.5
    class_loss: bool = True        # supervise the MP queries' classes too (official DN_NO_LB=False)

    def __post_init__(self):
        if self.groups < 1:
            raise ValueError(f"model.mp.groups must be >= 1, got {self.groups}")
        for name in ("label_noise", "point_noise", "shift_noise", "scale_noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.mp.{name} must be >= 0, got {getattr(self, name)}")
