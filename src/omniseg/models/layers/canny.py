"""Canny edge detection in pure PyTorch.

Gated-SCNN feeds ``cv2.Canny(image, 10, 100)`` to its shape stream. This version gives the same edge
maps without an OpenCV dependency, runs batched on any device and can be traced for export.

It follows OpenCV's ``cv::Canny`` (aperture 3, L1 gradient by default):

* 3x3 Sobel derivatives with replicated borders; for a multi-channel image each pixel takes the
  gradient of the channel with the largest magnitude (ties go to the first channel), there is no
  conversion to grey;
* non-maximum suppression in four sectors split at tan(22.5 deg) in OpenCV's fixed point
  (``TG22 = 13573 / 2**15``); along the horizontal and vertical directions a pixel must be ``>`` its
  left/upper neighbour and ``>=`` its right/lower one, along diagonals ``>`` both; magnitudes
  outside the image count as 0;
* a pixel is a candidate when it survives suppression with magnitude ``> low``, strong when also
  ``> high``; candidates 8-connected to a strong pixel through other candidates are edges.

Pixels on the image border can be edges, as in OpenCV.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["canny"]

# OpenCV's fixed-point tan(22.5 deg): sector tests compare |dy| * 2**15 with |dx| * _TG22.
_SHIFT = 1 << 15
_TG22 = 13573
# Steps of hysteresis between convergence checks; extra steps past the fixed point change nothing.
_STEPS_PER_CHECK = 4


def _sobel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """3x3 Sobel (x to the right, y downwards) with replicated borders, as OpenCV's aperture 3."""
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    dx = p[..., 2:] - p[..., :-2]
    dx = dx[..., :-2, :] + 2 * dx[..., 1:-1, :] + dx[..., 2:, :]
    dy = p[..., 2:, :] - p[..., :-2, :]
    dy = dy[..., :-2] + 2 * dy[..., 1:-1] + dy[..., 2:]
    return dx, dy


def _strongest_channel(mag: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pixel, the channel with the largest magnitude; strict ``>`` keeps the first on ties."""
    best_mag, best_dx, best_dy = mag[:, :1], dx[:, :1], dy[:, :1]
    for c in range(1, mag.shape[1]):
        take = mag[:, c:c + 1] > best_mag
        best_mag = torch.where(take, mag[:, c:c + 1], best_mag)
        best_dx = torch.where(take, dx[:, c:c + 1], best_dx)
        best_dy = torch.where(take, dy[:, c:c + 1], best_dy)
    return best_mag, best_dx, best_dy


def _non_max_suppression(mag: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Bool [B,1,H,W]: pixels that are a local maximum across their quantised gradient direction."""
    H, W = mag.shape[-2:]
    p = F.pad(mag, (1, 1, 1, 1))

    def shifted(di: int, dj: int) -> torch.Tensor:
        return p[..., 1 + di:1 + di + H, 1 + dj:1 + dj + W]

    ax, ay = dx.abs(), dy.abs()
    # Integer-exact in float32 for 8-bit images (|dx|, |dy| <= 1020).
    horizontal = ay * _SHIFT < ax * _TG22
    vertical = (ay - 2 * ax) * _SHIFT > ax * _TG22
    same_sign = (dx < 0) == (dy < 0)

    keep_h = (mag > shifted(0, -1)) & (mag >= shifted(0, 1))
    keep_v = (mag > shifted(-1, 0)) & (mag >= shifted(1, 0))
    keep_main = (mag > shifted(-1, -1)) & (mag > shifted(1, 1))
    keep_anti = (mag > shifted(-1, 1)) & (mag > shifted(1, -1))
    keep_d = torch.where(same_sign, keep_main, keep_anti)
    return torch.where(horizontal, keep_h, torch.where(vertical, keep_v, keep_d))


def _hysteresis(strong: torch.Tensor, weak: torch.Tensor, max_iterations: int | None) -> torch.Tensor:
    """Grow ``strong`` (float 0/1) through 8-connected ``weak`` pixels (float 0/1, a superset).

    Without a bound, iterates to the fixed point. With ``max_iterations``, runs exactly that many
    steps with no data-dependent control flow, so the loop unrolls into a static exported graph;
    edges farther than that many pixels along a weak chain from a strong pixel are then dropped.
    """
    edges = strong
    if max_iterations is not None:
        for _ in range(max_iterations):
            edges = F.max_pool2d(edges, 3, stride=1, padding=1) * weak
        return edges
    while True:
        previous = edges
        for _ in range(_STEPS_PER_CHECK):
            edges = F.max_pool2d(edges, 3, stride=1, padding=1) * weak
        if torch.equal(edges, previous):
            return edges


@torch.no_grad()
def canny(images: torch.Tensor, low: float = 10, high: float = 100, *, l2_gradient: bool = False,
          max_iterations: int | None = None) -> torch.Tensor:
    """Edge map of ``images`` like ``cv2.Canny(image, low, high, L2gradient=l2_gradient)`` per image.

    Args:
        images: [B,C,H,W] uint8 or float with values in [0, 255]; C = 3 (RGB) or 1 (grey). Floats
            are used as they are (not rounded); integer-valued floats give the uint8 result.
        low, high: hysteresis thresholds on the gradient magnitude (swapped if ``low > high``).
        l2_gradient: use sqrt(dx^2 + dy^2) instead of |dx| + |dy|, as OpenCV's ``L2gradient``.
        max_iterations: fixed number of hysteresis growth steps (for export); None = until stable.

    Returns:
        float32 [B,1,H,W] with 1 on edges and 0 elsewhere.
    """
    if images.dim() != 4 or images.shape[1] < 1:
        raise ValueError(f"canny expects [B,C,H,W] images, got shape {tuple(images.shape)}")
    if max_iterations is not None and max_iterations < 0:
        raise ValueError(f"max_iterations must be >= 0, got {max_iterations}")
    x = images.float()
    low, high = float(low), float(high)
    if low > high:
        low, high = high, low

    dx, dy = _sobel(x)
    if l2_gradient:
        mag = dx * dx + dy * dy
        # OpenCV compares squared magnitudes with squared thresholds clamped to 32767.
        low = min(low, 32767.0) ** 2 if low > 0 else low
        high = min(high, 32767.0) ** 2 if high > 0 else high
    else:
        mag = dx.abs() + dy.abs()
    mag, dx, dy = _strongest_channel(mag, dx, dy)

    candidate = _non_max_suppression(mag, dx, dy) & (mag > low)
    strong = candidate & (mag > high)
    return _hysteresis(strong.float(), candidate.float(), max_iterations)
