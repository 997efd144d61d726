"""SmoothGrad saliency, its ensemble average, and per-image decile quantisation (PSSL's labels).

Choices, and why:
- Gradients are taken w.r.t. the *normalised* input (what the network sees). The per-channel affine
  normalisation only rescales each channel's gradient by 1/std, and the noise level is defined
  relative to the input's range, so this is the space where the SmoothGrad noise recipe applies.
- Noise: N(0, sigma^2) with sigma = noise * (max - min) of each image (SmoothGrad paper, Smilkov et
  al. 2017, who recommend 10-20%); n_samples=0 gives the plain gradient.
- Channel reduction: max over channels of |gradient| (Simonyan et al. 2014's saliency map). The
  absolute value because a pixel that pushes the logit down matters as much for "where is the object"
  as one that pushes it up; the max rather than the sum so that a pixel strongly relevant through one
  colour channel is not diluted by two indifferent ones.
- Each map is divided by its own maximum, giving [0, 1] with 0 still meaning "no influence";
  models with larger gradients then do not dominate the ensemble mean.
- Deciles are ranks, not value thresholds: decile = floor(10 * #(pixels with a smaller value) / N).
  Ties share the lower decile, so a flat map (no evidence) is all decile 0 (all background) instead of
  an arbitrary 10% of it, and distinct values give exactly N - ceil(0.9 N) pixels in decile 9.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from omniseg.pssl.classifier import IMAGENET_MEAN, IMAGENET_STD, Classifier, normalize, resize


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """[B,H,W] >= 0 -> each map divided by its maximum (all-zero maps stay zero)."""
    peak = maps.flatten(1).amax(dim=1).view(-1, 1, 1)
    return torch.where(peak > 0, maps / peak.clamp_min(torch.finfo(maps.dtype).tiny), torch.zeros_like(maps))


def smoothgrad(model: nn.Module, images: torch.Tensor, class_ids: torch.Tensor | Sequence[int], *,
               n_samples: int = 16, noise: float = 0.15, generator: torch.Generator | None = None,
               mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """SmoothGrad of each image's `class_ids` logit: float [B,H,W] in [0, 1] (see module docstring).

    `images`: float (or uint8) [B,3,H,W] in 0-255; `model` maps normalised images to logits [B,K] and
    is run in eval mode (restored afterwards) so images in a batch do not interact.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B,3,H,W], got {tuple(images.shape)}")
    if n_samples < 0 or noise < 0:
        raise ValueError("n_samples and noise must be >= 0")
    b = images.shape[0]
    class_ids = torch.as_tensor(class_ids, dtype=torch.int64, device=images.device).view(b, 1)
    x = normalize(images, mean, std).detach()
    sigma = noise * (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(b, 1, 1, 1)
    was_training = model.training
    model.eval()
    try:
        total = torch.zeros_like(x)
        for _ in range(max(1, n_samples)):
            xn = x
            if n_samples > 0 and noise > 0:
                eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
                xn = x + sigma * eps
            xn = xn.clone().requires_grad_(True)
            with torch.enable_grad():
                logits = model(xn)
                # Eval mode: image i's logit depends on image i only, so one backward gives all B gradients.
                (grad,) = torch.autograd.grad(logits.gather(1, class_ids).sum(), xn)
            total += grad
    finally:
        model.train(was_training)
    grad = total / max(1, n_samples)
    return normalize_maps(grad.abs().amax(dim=1))


def ensemble_saliency(models: Sequence[Classifier | nn.Module], images: torch.Tensor | Sequence[torch.Tensor],
                      class_ids: torch.Tensor | Sequence[int] | Sequence[torch.Tensor], *, n_samples: int = 16,
                      noise: float = 0.15, generator: torch.Generator | None = None):
    """Mean of the models' normalised SmoothGrad maps at each image's own size.

    `images`: float 0-255 [B,3,H,W] (returns [B,H,W]) or a list of [3,H_i,W_i] (returns a list of
    [H_i,W_i]). A `Classifier` sees every image resized to its own square input size with its own
    normalisation, and its maps are resized back (bilinear); a bare module sees the images as they
    are (same size required), ImageNet-normalised. `class_ids` is one id per image for every model, or
    a list with one such tensor per model (when the models number their classes differently).
    """
    if not models:
        raise ValueError("ensemble_saliency needs at least one model")
    batched = isinstance(images, torch.Tensor)
    imgs = list(images.unbind(0)) if batched else list(images)
    if not imgs:
        return images.new_zeros((0,) + tuple(images.shape[-2:]), dtype=torch.float32) if batched else []
    per_model = isinstance(class_ids, (list, tuple)) and len(class_ids) == len(models) and all(
        isinstance(c, torch.Tensor) and c.ndim == 1 for c in class_ids)
    sizes = [tuple(im.shape[-2:]) for im in imgs]
    acc = [torch.zeros(hw, dtype=torch.float32, device=imgs[0].device) for hw in sizes]
    for m, model in enumerate(models):
        ids = class_ids[m] if per_model else class_ids
        if isinstance(model, Classifier):
            x = torch.stack([resize(im, model.image_size) for im in imgs])
            sal = smoothgrad(model.model, x, ids, n_samples=n_samples, noise=noise, generator=generator,
                             mean=model.mean, std=model.std)
        else:
            if len(set(sizes)) > 1:
                raise ValueError("a bare model needs images of one size; wrap it in a Classifier to resize")
            sal = smoothgrad(model, torch.stack(imgs).float(), ids, n_samples=n_samples, noise=noise,
                             generator=generator)
        for i, hw in enumerate(sizes):
            s = sal[i]
            if tuple(s.shape) != hw:
                s = F.interpolate(s[None, None], size=hw, mode="bilinear", align_corners=False)[0, 0]
            acc[i] += s.to(acc[i].device)
    maps = [a / len(models) for a in acc]
    return torch.stack(maps) if batched else maps


def decile_map(saliency: torch.Tensor) -> torch.Tensor:
    """Per-image rank deciles of a [B,H,W] (or [H,W]) map: int64 in 0..9, 9 = most salient 10%."""
    squeeze = saliency.ndim == 2
    s = saliency[None] if squeeze else saliency
    b, h, w = s.shape
    flat = s.reshape(b, -1).float().contiguous()
    n = flat.shape[1]
    smaller = torch.searchsorted(flat.sort(dim=1).values, flat, side="left")  # pixels strictly below each
    dec = torch.div(10 * smaller, n, rounding_mode="floor").clamp_(0, 9).view(b, h, w)
    return dec[0] if squeeze else dec
