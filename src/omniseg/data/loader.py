"""Batching: images padded to a size divisibility, samples kept alongside.

The training sample order lives in `omniseg.data.sampling` (resumable, seed-determined).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


class PadCollate:
    """Picklable collate function (workers under the spawn start method need one)."""

    def __init__(self, size_divisibility: int):
        self.size_divisibility = size_divisibility

    def __call__(self, samples):
        return collate(samples, self.size_divisibility)
