"""Classification folders (root/<class_name>/<image>): the input of every PSSL step.

Classes are the sub-folder names in sorted order, the same convention as torchvision's ImageFolder
and timm's ImageNet class order, so a classifier trained elsewhere on the same folder agrees on ids.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from omniseg.data.errors import DataError
from omniseg.data.formats import IMAGE_EXTENSIONS, load_rgb_image


@dataclass(frozen=True)
class Item:
    path: Path
    label: int


class ClassificationFolder(torch.utils.data.Dataset):
    """root/<class>/*.{png,jpg,...}; samples are (uint8 [3,H,W] image, class id).

    Hidden entries (".name") are ignored, so marker files and editor droppings never become classes.
    Every problem raises DataError naming the folder or file, before any training starts (files are
    only listed here; an unreadable image is reported when it is read).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(self.root, "classification folder does not exist or is not a directory")
        class_dirs = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            raise DataError(self.root, "no class folders found (expected root/<class_name>/<images>)")
        self.classes = [p.name for p in class_dirs]
        self.items: list[Item] = []
        for label, d in enumerate(class_dirs):
            files = sorted(p for p in d.iterdir()
                           if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise DataError(d, f"class folder '{d.name}' holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            self.items += [Item(f, label) for f in files]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item = self.items[index]
        return load_rgb_image(item.path), item.label

    def class_counts(self) -> list[int]:
        counts = [0] * self.num_classes
        for it in self.items:
            counts[it.label] += 1
        return counts

    def split(self, val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
        """Deterministic stratified (train, val) index lists; see `split_indices`."""
        return split_indices([it.label for it in self.items], val_fraction, seed)


def split_indices(labels: list[int], val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Per class, a seeded shuffle puts round(fraction * n) images in val (>= 1 when n >= 2 and
    fraction > 0, never all of them), so every class is represented on both sides and the split
    does not depend on anything but the file list and the seed."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    by_class: dict[int, list[int]] = {}
    for i, c in enumerate(labels):
        by_class.setdefault(c, []).append(i)
    train, val = [], []
    for c, idx in sorted(by_class.items()):
        idx = list(idx)
        random.Random(f"{seed}:{c}").shuffle(idx)
        n_val = round(val_fraction * len(idx))
        if val_fraction > 0 and len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        else:
            n_val = 0
        val += idx[:n_val]
        train += idx[n_val:]
    return sorted(train), sorted(val)
