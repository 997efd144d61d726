"""torch.distributed plumbing for `torchrun`: joining and leaving the process group, and reaching the model
inside a DistributedDataParallel wrapper."""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from torch import nn


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@contextmanager
def distributed_session(device: torch.device):
    """(rank, world size) for this process. Under torchrun (WORLD_SIZE > 1) joins the process group,
    and on leaving waits for every rank and tears the group down (a process that exits with a live
    gloo group can abort at interpreter shutdown). A group set up by the caller is left alone."""
    created = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_distributed():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        created = True
    try:
        yield (torch.distributed.get_rank(), torch.distributed.get_world_size()) if is_distributed() else (0, 1)
        if created:
            torch.distributed.barrier()
    finally:
        if created:
            torch.distributed.destroy_process_group()


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself, also when wrapped in DistributedDataParallel."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
