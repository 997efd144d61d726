"""What every omniseg segmenter shares, whatever its family: normalisation inside the model (so callers and
exported graphs take uint8 RGB) and one `forward` that trains with targets and predicts without."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


class Segmenter(nn.Module):
    """Base of the model families. Subclasses implement `losses(images, targets)` and
    `predict(images, image_sizes, output_sizes=None, tasks=...)`, and call `register_pixel_stats(cfg)`."""

    tasks: tuple[str, ...] = ("semantic", "panoptic", "instance")  # what predict can produce

    def register_pixel_stats(self, cfg: Mapping) -> None:
        """model.pixel_mean / pixel_std (0-255 RGB) as non-persistent buffers: they follow the device."""
        mean = cfg.get("pixel_mean") or IMAGENET_MEAN
        std = cfg.get("pixel_std") or IMAGENET_STD
        self.register_buffer("pixel_mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or float [0,255] RGB -> normalised float."""
        return (images.float() - self.pixel_mean) / self.pixel_std

    def forward(self, images: torch.Tensor, targets: list[dict] | None = None, **predict_kwargs):
        """Training mode with targets -> loss dict; otherwise -> predictions (see `predict`)."""
        if self.training and targets is not None:
            return self.losses(images, targets)
        image_sizes = predict_kwargs.pop("image_sizes", [tuple(images.shape[-2:])] * images.shape[0])
        return self.predict(images, image_sizes, **predict_kwargs)


def semantic_results(scores: torch.Tensor, image_sizes: Sequence[tuple[int, int]],
                     output_sizes: Sequence[tuple[int, int]] | None, tasks: Sequence[str],
                     return_raw: bool = False) -> list[dict]:
    """Per-class scores at the padded batch size [B,K,Hp,Wp] -> [{"semantic": int64 [H,W]}] per image:
    cropped to its size inside the padding, resized to its output size (default: image size), argmax."""
    results = []
    for i, ((h, w), out_size) in enumerate(zip(image_sizes, output_sizes or image_sizes)):
        s = scores[i:i + 1, :, :h, :w]
        if tuple(out_size) != (h, w):
            s = F.interpolate(s, size=tuple(out_size), mode="bilinear", align_corners=False)
        result = {"semantic": s[0].argmax(0)} if "semantic" in tasks else {}
        if return_raw:
            result["raw"] = {"sem_seg": scores[i]}
        results.append(result)
    return results


def cfg_get(cfg: Mapping, key: str, default=None):
    """cfg[key], or `default` when the key is missing or null (model configs leave optional keys null)."""
    return cfg[key] if key in cfg and cfg[key] is not None else default


def label_map_from_targets(targets: Sequence[dict], size: tuple[int, int], ignore_index: int = 255) -> torch.Tensor:
    """Engine targets ({"labels": [N], "masks": bool [N,H,W]}, one mask per class for the semantic task)
    -> int64 label maps [B,H,W]; pixels in no mask (padding, void) are `ignore_index`."""
    out = []
    for t in targets:
        sem = torch.full(size, ignore_index, dtype=torch.int64, device=t["masks"].device)
        for label, mask in zip(t["labels"].tolist(), t["masks"]):
            sem[mask] = int(label)
        out.append(sem)
    return torch.stack(out)
