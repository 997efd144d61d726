"""Deterministic, resumable sample order: batch k of a run is a pure function of (seed, k).

Because nothing depends on iterator state, resuming at iteration i only needs i — no sampler state
to save — and every sample carries its own augmentation seed, so data order *and* augmentation are
identical whether or not training was interrupted, and whatever the number of loader workers.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class ResumableBatchSampler(Sampler):
    """Yields lists of (dataset_index, augmentation_seed) from global batch `start_batch` on.

    Each epoch is a fresh permutation drawn from `seed + epoch`; with DDP, rank r takes every
    `world_size`-th element of each global batch of `batch_size * world_size` samples.
    """

    def __init__(self, dataset_len: int, batch_size: int, *, seed: int = 0, start_batch: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if dataset_len < batch_size * world_size:
            raise ValueError(f"dataset has {dataset_len} samples, fewer than one global batch "
                             f"({batch_size} x {world_size} ranks)")
        self.n, self.bs, self.seed = dataset_len, batch_size, seed
        self.start_batch, self.rank, self.world = start_batch, rank, world_size
        self.shuffle = shuffle
        self.global_bs = batch_size * world_size
        self.batches_per_epoch = dataset_len // self.global_bs

    def _perm(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def batch(self, k: int) -> list[tuple[int, int]]:
        epoch, j = divmod(k, self.batches_per_epoch)
        idx = self._perm(epoch)[j * self.global_bs:(j + 1) * self.global_bs][self.rank::self.world]
        base = (self.seed * 7919 + k) * self.global_bs
        return [(int(i), base + self.rank + t * self.world) for t, i in enumerate(idx.tolist())]

    def __iter__(self):
        k = self.start_batch
        while True:
            yield self.batch(k)
            k += 1

    def __len__(self) -> int:  # infinite stream; report one epoch for progress displays
        return self.batches_per_epoch
