"""When a module may keep Python-side tensor caches."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TypeVar

import torch

T = TypeVar("T")


def plain_eager(x: torch.Tensor) -> bool:
    """True when `x` is a plain tensor and nothing is tracing (torch.compile, torch.export, ONNX export):
    only then may a module cache tensors derived from it across calls. A traced call must compute them
    in the graph, and a cache filled while tracing would hand fake tensors to later eager calls."""
    if type(x) not in (torch.Tensor, torch.nn.Parameter):  # FakeTensor, FunctionalTensor, ... while tracing
        return False
    return not (torch.compiler.is_compiling() or torch.compiler.is_exporting())


def eager_cached(cache: dict, key: Callable[[], Hashable], x: torch.Tensor, make: Callable[[], T], limit: int) -> T:
    """`make()`, kept in `cache` under `key()` for later calls when `x` is a plain eager tensor (never
    while tracing; `key` is only called then, so it may read data pointers); the cache is emptied once
    it holds `limit` entries (a run sees a few sizes)."""
    if not plain_eager(x):
        return make()
    key = key()
    if key not in cache:
        if len(cache) >= limit:
            cache.clear()
        cache[key] = make()
    return cache[key]
