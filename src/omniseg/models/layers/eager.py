"""When a module may keep Python-side tensor caches."""

from __future__ import annotations

import torch


def plain_eager(x: torch.Tensor) -> bool:
    """True when `x` is a plain tensor and nothing is tracing (torch.compile, torch.export, ONNX export):
    only then may a module cache tensors derived from it across calls. A traced call must compute them
    in the graph, and a cache filled while tracing would hand fake tensors to later eager calls."""
    if type(x) not in (torch.Tensor, torch.nn.Parameter):  # FakeTensor, FunctionalTensor, ... while tracing
        return False
    return not (torch.compiler.is_compiling() or torch.compiler.is_exporting())
