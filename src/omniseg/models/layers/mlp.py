"""Small building blocks shared by several model families."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class MLP(nn.Module):
    """`num_layers` Linear layers with ReLU in between (the mask-embedding head of DETR-style models)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class ConvNormAct(nn.Sequential):
    """Conv2d -> GroupNorm -> optional ReLU: detectron2's `Conv2d(norm=GN, activation=relu)`.

    Children are named `0` (conv) and `1` (norm) so HF checkpoints map one to one.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, *, bias: bool = False, groups: int = 32,
                 activation: bool = True):
        layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=bias),
                                   nn.GroupNorm(min(groups, out_ch), out_ch)]
        if activation:
            layers.append(nn.ReLU())
        super().__init__(*layers)
