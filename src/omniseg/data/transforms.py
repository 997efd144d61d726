"""Sample -> sample pipelines on torchvision.transforms.v2, so label maps and masks move with the image.

Every annotation is wrapped as a tv_tensor (label maps and masks as `Mask`, hence nearest-neighbour
resampling), transformed in one call with the image, and unwrapped. Padding uses a single fill
value 0 for all masks; sem_seg is shifted by one on the way in so that 0 means "ignore" during
the transform and padding therefore lands on ignore, while pan_seg padding lands on void (0).
"""

from __future__ import annotations

from typing import Callable

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from omniseg.data.targets import boxes_from_masks, nonempty_masks


def _to_tv(sample: dict) -> dict:
    """Pick the geometric payload of a sample as tv_tensors."""
    payload = {"image": tv_tensors.Image(sample["image"])}
    if "sem_seg" in sample:
        ignore = sample.get("_ignore_index", 255)
        sem = sample["sem_seg"].to(torch.int64)
        shifted = torch.where(sem == ignore, torch.zeros_like(sem), sem + 1)
        payload["sem_seg"] = tv_tensors.Mask(shifted)
    if "pan_seg" in sample:
        payload["pan_seg"] = tv_tensors.Mask(sample["pan_seg"])
    if "instances" in sample:
        payload["masks"] = tv_tensors.Mask(sample["instances"]["masks"])
    return payload


def _from_tv(sample: dict, out: dict) -> dict:
    result = dict(sample)
    image = out["image"].as_subclass(torch.Tensor)
    result["image"] = image
    result["height"], result["width"] = int(image.shape[-2]), int(image.shape[-1])
    if "sem_seg" in out:
        ignore = sample.get("_ignore_index", 255)
        shifted = out["sem_seg"].as_subclass(torch.Tensor)
        result["sem_seg"] = torch.where(shifted == 0, torch.full_like(shifted, ignore), shifted - 1)
    if "pan_seg" in out:
        pan = out["pan_seg"].as_subclass(torch.Tensor)
        result["pan_seg"] = pan
        present = set(torch.unique(pan).tolist())
        result["segments_info"] = [s for s in sample["segments_info"] if int(s["id"]) in present]
    if "masks" in out:
        inst = sample["instances"]
        masks = out["masks"].as_subclass(torch.Tensor).bool()
        keep = nonempty_masks(masks)
        new = {k: v[keep] for k, v in inst.items()
               if k != "masks" and torch.is_tensor(v) and v.shape[:1] == keep.shape}
        new["masks"] = masks[keep]
        new["boxes"] = boxes_from_masks(new["masks"])
        result["instances"] = new
    return result


class TrainTransform:
    """Large-scale jitter + fixed-size crop (padding -> ignore/void), h-flip, photometric jitter."""

    def __init__(self, size: int | tuple[int, int] | None, scale_range=(0.1, 2.0), hflip: bool = True,
                 photometric: bool = True, ignore_index: int = 255):
        self.ignore_index = ignore_index
        geometric: list = []
        if size is not None:
            hw = (size, size) if isinstance(size, int) else tuple(size)
            geometric += [
                v2.ScaleJitter(target_size=hw, scale_range=tuple(scale_range), antialias=True),
                v2.RandomCrop(hw, pad_if_needed=True, fill=0, padding_mode="constant"),
            ]
        if hflip:
            geometric.append(v2.RandomHorizontalFlip(0.5))
        self.geometric = v2.Compose(geometric) if geometric else None
        self.photometric = (
            v2.RandomApply([v2.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.25, hue=0.03)], p=0.8)
            if photometric else None
        )

    def __call__(self, sample: dict) -> dict:
        if self.geometric is not None:
            payload = _to_tv({**sample, "_ignore_index": self.ignore_index})
            sample = _from_tv({**sample, "_ignore_index": self.ignore_index}, self.geometric(payload))
            sample.pop("_ignore_index", None)
        if self.photometric is not None:
            sample = dict(sample)
            sample["image"] = self.photometric(tv_tensors.Image(sample["image"])).as_subclass(torch.Tensor)
        return sample

    def __repr__(self) -> str:
        return f"TrainTransform(geometric={self.geometric}, photometric={self.photometric})"


class EvalTransform:
    """Resize only the model input; annotations and height/width stay at the original resolution."""

    def __init__(self, min_size_test: int | None = None, max_size_test: int | None = None):
        self.resize = (
            v2.Resize(min_size_test, max_size=max_size_test, antialias=True) if min_size_test is not None else None
        )

    def __call__(self, sample: dict) -> dict:
        sample = dict(sample)
        h, w = sample["image"].shape[-2:]
        sample.setdefault("height", int(h))
        sample.setdefault("width", int(w))
        if self.resize is not None:
            sample["image"] = self.resize(tv_tensors.Image(sample["image"])).as_subclass(torch.Tensor)
        return sample

    def __repr__(self) -> str:
        return f"EvalTransform(resize={self.resize})"


def build_transforms(
    train: bool,
    *,
    size: int | tuple[int, int] | None = None,
    scale_range: tuple[float, float] = (0.1, 2.0),
    hflip: bool = True,
    photometric: bool = True,
    min_size_test: int | None = None,
    max_size_test: int | None = None,
    ignore_index: int = 255,
) -> Callable[[dict], dict]:
    """Training: jitter/crop/flip/colour applied to image and every annotation. Evaluation: resize image only.

    `size` is the square (or (h, w)) training crop; None disables jitter and crop.
    """
    if train:
        return TrainTransform(size, scale_range, hflip, photometric, ignore_index)
    return EvalTransform(min_size_test, max_size_test)
