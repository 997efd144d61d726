"""Evaluator state that is a sum of counts: merges across workers and all-reduces across DDP ranks."""

from __future__ import annotations

import torch


def distributed_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over DDP ranks and return a new tensor (the input is left untouched).

    Returning a copy keeps evaluators idempotent: calling `evaluate()` twice never double counts.
    """
    if not distributed_ready():
        return tensor.clone()
    reduced = tensor.clone()
    if torch.distributed.get_backend() == "nccl" and reduced.device.type != "cuda":
        reduced = reduced.cuda()
    torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.SUM)
    return reduced.to(tensor.device)


class SummedState:
    """Mixin for evaluators whose whole state is a dict of count tensors; the subclass provides
    `state() -> dict[str, Tensor]` and `load_state(dict)`."""

    def merge(self, other: "SummedState") -> None:
        """Add another evaluator's counts (e.g. from a worker) into this one."""
        mine, theirs = self.state(), other.state()
        self.load_state({key: mine[key] + theirs[key].to(mine[key].device) for key in mine})

    def synced_state(self) -> dict[str, torch.Tensor]:
        """State summed over DDP ranks (a copy; a no-op without torch.distributed)."""
        return {key: all_reduce_sum(value) for key, value in self.state().items()}
