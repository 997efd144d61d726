"""Point sampling for point-based mask losses (PointRend style, as used by Mask2Former).

Mask losses are evaluated on a few thousand points instead of full-resolution masks, so the
N predicted masks never have to be upsampled to the input size during training. Coordinates
are normalised to ``[0, 1] x [0, 1]`` as ``(x, y)`` and read with bilinear ``grid_sample``.
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F

__all__ = [
    "point_sample",
    "calculate_uncertainty",
    "get_uncertain_point_coords_with_randomness",
    "random_points",
    "Generators",
    "image_generator",
]


# One RNG for the whole batch, or one per image (then an image's random points do not depend on the
# other images in its batch or DDP rank).
Generators = Union[torch.Generator, Sequence[torch.Generator], None]


def image_generator(generator: Generators, index: int) -> torch.Generator | None:
    """The RNG that image `index` of the batch draws from."""
    return generator[index] if isinstance(generator, (list, tuple)) else generator


def random_points(
    shape: tuple[int, ...],
    device: torch.device | str,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Uniform points in [0, 1); drawn on the generator's device so a CPU generator works for CUDA tensors.

    With ``generator=None`` this is exactly ``torch.rand(shape, device=device)``, so it consumes the
    global RNG stream like the official / HF code does (which the parity tests rely on).
    """
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def point_sample(input: torch.Tensor, coords: torch.Tensor, align_corners: bool = False, **kwargs) -> torch.Tensor:
    """Bilinearly read ``input`` [N, C, H, W] at ``coords`` in [0, 1].

    ``coords`` is [N, P, 2] (returns [N, C, P]) or [N, Hg, Wg, 2] (returns [N, C, Hg, Wg]).
    """
    squeeze = coords.dim() == 3
    if squeeze:
        coords = coords.unsqueeze(2)
    out = F.grid_sample(input, 2.0 * coords - 1.0, align_corners=align_corners, **kwargs)
    return out.squeeze(3) if squeeze else out


def calculate_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Uncertainty of class-agnostic mask logits: points closest to the decision boundary score highest."""
    return -logits.abs()


def get_uncertain_point_coords_with_randomness(
    logits: torch.Tensor,
    uncertainty_fn: Callable[[torch.Tensor], torch.Tensor],
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PointRend importance sampling: most uncertain of an oversampled uniform set, plus uniform points.

    Args:
        logits: [N, 1, H, W] mask logits.
        uncertainty_fn: maps [N, 1, P] logits to [N, 1, P] uncertainties (higher = more uncertain).
        num_points: points returned per mask.
        oversample_ratio: ``int(num_points * oversample_ratio)`` uniform candidates are drawn.
        importance_sample_ratio: fraction of ``num_points`` taken as the most uncertain candidates;
            the rest are fresh uniform points (keeps coverage of confident regions).
        generator: optional RNG for reproducibility.

    Returns:
        [N, num_points, 2] coordinates in [0, 1].
    """
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
    num_masks = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    candidates = random_points((num_masks, num_sampled, 2), logits.device, generator)
    uncertainties = uncertainty_fn(point_sample(logits, candidates, align_corners=False))
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    # the same points as the official sorted top-k, in another order (unsorted top-k skips the sort)
    top = torch.topk(uncertainties[:, 0, :], k=num_uncertain, dim=1, sorted=False).indices
    coords = torch.gather(candidates, 1, top.unsqueeze(-1).expand(-1, -1, 2))
    if num_random > 0:
        coords = torch.cat([coords, random_points((num_masks, num_random, 2), logits.device, generator)], dim=1)
    return coords
