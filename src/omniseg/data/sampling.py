"""Deterministic, resumable sample order: batch k of a run is a pure function of (seed, k).

Because nothing depends on iterator state, resuming at iteration i only needs i — no sampler state
to save — and every sample carries its own augmentation seed, so data order *and* augmentation are
identical whether or not training was interrupted, and whatever the number of loader workers.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import torch
from torch.utils.data import Sampler


class ResumableBatchSampler(Sampler):
    """Yields lists of (dataset_index, augmentation_seed) from global batch `start_batch` on.

    Each epoch is a fresh permutation drawn from `seed + epoch`; with DDP, rank r takes every
    `world_size`-th element of each global batch of `batch_size * world_size` samples. With
    `repeat_factors` (LVIS's repeat-factor sampling) image i appears floor(r_i) times per epoch, plus once
    more with probability r_i - floor(r_i), drawn from the same epoch seed: epochs then differ in length,
    and batch k is still a pure function of (seed, k).
    """

    def __init__(self, dataset_len: int, batch_size: int, *, seed: int = 0, start_batch: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 repeat_factors: Sequence[float] | None = None):
        if dataset_len < batch_size * world_size:
            raise ValueError(f"dataset has {dataset_len} samples, fewer than one global batch "
                             f"({batch_size} x {world_size} ranks)")
        self.n, self.bs, self.seed = dataset_len, batch_size, seed
        self.start_batch, self.rank, self.world = start_batch, rank, world_size
        self.shuffle = shuffle
        self.global_bs = batch_size * world_size
        self.batches_per_epoch = dataset_len // self.global_bs
        self.repeat = None
        if repeat_factors is not None:
            factors = torch.as_tensor(list(repeat_factors), dtype=torch.float64)
            if len(factors) != dataset_len or bool((factors < 1).any()):
                raise ValueError("repeat_factors: one factor >= 1 per sample")
            self.repeat = factors
        self._starts = [0]  # first global batch of each epoch laid out so far (repeat factors only)
        self._orders: dict[int, torch.Tensor] = {}  # the last epochs' sample orders

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        if self.repeat is None:
            return torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        whole = self.repeat.floor()
        counts = (whole + (torch.rand(self.n, generator=g, dtype=torch.float64) < self.repeat - whole)).long()
        order = torch.repeat_interleave(torch.arange(self.n), counts)
        return order[torch.randperm(len(order), generator=g)] if self.shuffle else order

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            self._orders[epoch] = self._perm(epoch)
            for old in sorted(self._orders)[:-2]:
                del self._orders[old]
        return self._orders[epoch]

    def _locate(self, k: int) -> tuple[torch.Tensor, int]:
        """(the order of the epoch holding global batch k, k's batch index within it)."""
        if self.repeat is None:
            epoch, j = divmod(k, self.batches_per_epoch)
            return self._order(epoch), j
        while self._starts[-1] <= k:  # every epoch holds at least the n samples once: this ends
            epoch = len(self._starts) - 1
            self._starts.append(self._starts[-1] + len(self._order(epoch)) // self.global_bs)
        epoch = bisect.bisect_right(self._starts, k) - 1
        return self._order(epoch), k - self._starts[epoch]

    def batch(self, k: int) -> list[tuple[int, int]]:
        order, j = self._locate(k)
        idx = order[j * self.global_bs:(j + 1) * self.global_bs][self.rank::self.world]
        base = (self.seed * 7919 + k) * self.global_bs
        return [(int(i), base + self.rank + t * self.world) for t, i in enumerate(idx.tolist())]

    def __iter__(self):
        k = self.start_batch
        while True:
            yield self.batch(k)
            k += 1

    def __len__(self) -> int:  # infinite stream; report one epoch for progress displays
        return self.batches_per_epoch


def repeat_factors(categories: Sequence[set[int]], threshold: float) -> list[float]:
    """LVIS's repeat factors: class c, in a fraction f_c of the images, has r_c = max(1, sqrt(t / f_c));
    an image repeats max r_c over its classes (1 when it has none)."""
    n = len(categories)
    counts: dict[int, int] = {}
    for cats in categories:
        for c in cats:
            counts[c] = counts.get(c, 0) + 1
    per_class = {c: max(1.0, math.sqrt(threshold / (k / n))) for c, k in counts.items()}
    return [max((per_class[c] for c in cats), default=1.0) for cats in categories]
