"""Batching (pad to a size divisibility), seeded samplers and dataloaders.

Data order and augmentation are functions of (seed, epoch, index) only, so a run is reproducible
whatever the number of workers, and a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, SequentialSampler


def _move(obj, device, non_blocking: bool):
    if torch.is_tensor(obj):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, dict):
        return {k: _move(v, device, non_blocking) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_move(v, device, non_blocking) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_move(v, device, non_blocking) for v in obj)
    return obj


@dataclass
class Batch:
    """images: uint8 [B,3,Hp,Wp] zero-padded; image_sizes: the unpadded (h, w); samples: the samples."""

    images: torch.Tensor
    image_sizes: list[tuple[int, int]]
    samples: list[dict]

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """Images and every tensor inside the samples moved to `device`."""
        return Batch(
            images=self.images.to(device, non_blocking=non_blocking),
            image_sizes=list(self.image_sizes),
            samples=_move(self.samples, device, non_blocking),
        )

    def __len__(self) -> int:
        return len(self.samples)


def collate(samples: list[dict], size_divisibility: int = 32) -> Batch:
    """Stack images top-left aligned into a zero canvas whose sides are multiples of size_divisibility."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    sizes = [(int(s["image"].shape[-2]), int(s["image"].shape[-1])) for s in samples]
    hp, wp = max(h for h, _ in sizes), max(w for _, w in sizes)
    if size_divisibility and size_divisibility > 1:
        d = size_divisibility
        hp, wp = (hp + d - 1) // d * d, (wp + d - 1) // d * d
    first = samples[0]["image"]
    images = torch.zeros((len(samples), first.shape[0], hp, wp), dtype=first.dtype)
    for i, s in enumerate(samples):
        h, w = sizes[i]
        images[i, :, :h, :w] = s["image"]
    return Batch(images=images, image_sizes=sizes, samples=list(samples))


class TransformedDataset(Dataset):
    """Applies `transforms` to a dataset's samples with a per-(seed, epoch, index) random state.

    Seeding each sample makes augmentation independent of worker count and process layout.
    """

    def __init__(self, dataset: Dataset, transforms: Callable[[dict], dict] | None, seed: int | None = 0):
        self.dataset = dataset
        self.transforms = transforms
        self.seed = seed
        self.epoch = 0

    @property
    def meta(self):
        return getattr(self.dataset, "meta", None)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        sample = self.dataset[index]
        if self.transforms is None:
            return sample
        if self.seed is None:
            return self.transforms(sample)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch * 10_007 + int(index)) % (2**63 - 1))
            return self.transforms(sample)


class SeededRandomSampler(Sampler[int]):
    """Random permutation drawn from seed + epoch: same order on every machine and after resume."""

    def __init__(self, data_source, seed: int = 0):
        self.num_samples = len(data_source)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=g).tolist())

    def __len__(self) -> int:
        return self.num_samples


class _Collate:
    """Picklable collate function (workers under the spawn start method need one)."""

    def __init__(self, size_divisibility: int):
        self.size_divisibility = size_divisibility

    def __call__(self, samples):
        return collate(samples, self.size_divisibility)


def build_dataloader(
    dataset: Dataset,
    batch_size: int,
    *,
    train: bool,
    transforms: Callable[[dict], dict] | None = None,
    num_workers: int = 0,
    seed: int = 0,
    size_divisibility: int = 32,
    drop_last: bool | None = None,
    sampler: Sampler | None = None,
) -> DataLoader:
    """DataLoader yielding `Batch`es. Training shuffles (seeded), evaluation keeps dataset order.

    Under torch.distributed each rank gets its DistributedSampler shard. Call `set_epoch(loader, e)`
    at the start of every epoch to reshuffle.
    """
    wrapped = TransformedDataset(dataset, transforms, seed=seed) if transforms is not None else dataset
    if drop_last is None:
        drop_last = train
    if sampler is None:
        if dist.is_available() and dist.is_initialized():
            sampler = DistributedSampler(wrapped, shuffle=train, seed=seed, drop_last=drop_last and train)
        elif train:
            sampler = SeededRandomSampler(wrapped, seed=seed)
        else:
            sampler = SequentialSampler(wrapped)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        wrapped,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=_Collate(size_divisibility),
        drop_last=drop_last,
        generator=generator,
        persistent_workers=False,
        pin_memory=False,
    )


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Reshuffle the sampler and reseed augmentation for `epoch`."""
    for obj in (loader.sampler, loader.dataset):
        if hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
