"""BlendMask's blender and the mask geometry around it: RoI crops of the bases, GT mask crops, and the
batched paste of R x R masks into the image.

All of it runs on every RoI at once (roi_align, one interpolate, one batched matmul), so the mask branch
costs nearly the same for 10 or 100 detections, which is the paper's claim against Mask R-CNN's heads.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torchvision.ops import roi_align


def pool_bases(bases: torch.Tensor, boxes: torch.Tensor, batch_idx: torch.Tensor, resolution: int,
               stride: int) -> torch.Tensor:
    """[B,K,h,w] bases at `stride`, boxes [N,4] xyxy in input pixels -> [N,K,R,R] crops.

    As AdelaiDet's ROIPooler: aligned RoIAlign, one sample per bin (sampling_ratio=1).
    """
    rois = torch.cat([batch_idx.to(boxes.dtype)[:, None], boxes], 1)
    return roi_align(bases, rois.to(bases.dtype), resolution, spatial_scale=1.0 / stride, sampling_ratio=1,
                     aligned=True)


def upsample_matrix(m: int, r: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[r,m] weights of 1-D bilinear upsampling m -> r (align_corners=False): F.interpolate of the identity."""
    eye = torch.eye(m, device=device, dtype=dtype)[None]
    return F.interpolate(eye, size=r, mode="linear", align_corners=False)[0].T.contiguous()


def blend(rois: torch.Tensor, attns: torch.Tensor) -> torch.Tensor:
    """rois [N,K,R,R], attns [N,K*M*M] -> mask logits [N,R,R].

    Attentions are upsampled bilinearly (align_corners=False) to R x R *before* the softmax over the K bases,
    then weight the crops element-wise and are summed over K (AdelaiDet's merge_bases). The upsampling is
    F.interpolate's, applied as U @ A @ U^T: the same numbers, ~4x faster on CPU for 100 RoIs.
    """
    n, k, r, _ = rois.shape
    m = int(round((attns.shape[1] // k) ** 0.5))
    u = upsample_matrix(m, r, attns.device, attns.dtype)
    a = u @ attns.view(n, k, m, m) @ u.T
    return (rois * a.softmax(dim=1)).sum(dim=1)


def crop_masks(masks: torch.Tensor, boxes: torch.Tensor, resolution: int) -> torch.Tensor:
    """GT masks bool [N,H,W] cropped to their boxes and resampled to R x R, as detectron2's
    BitMasks.crop_and_resize (aligned RoIAlign, adaptive sampling, >= 0.5) -> bool [N,R,R]."""
    if masks.shape[0] == 0:
        return masks.new_zeros((0, resolution, resolution))
    rois = torch.cat([torch.arange(masks.shape[0], device=masks.device, dtype=boxes.dtype)[:, None], boxes], 1)
    out = roi_align(masks[:, None].float(), rois.float(), resolution, spatial_scale=1.0, sampling_ratio=0,
                    aligned=True)
    return out[:, 0] >= 0.5


def _interp_matrix(lo: torch.Tensor, hi: torch.Tensor, start: torch.Tensor, length: int,
                   resolution: int) -> torch.Tensor:
    """[N,length,R] bilinear weights taking R mask cells spanning [lo,hi] to pixels start .. start+length-1.

    The mask cell coordinate of the centre c = i + 0.5 of pixel i is u = (c - lo) / (hi - lo) * R - 0.5; the
    weight on cell j is the tent max(0, 1 - |u - j|): bilinear with zeros outside, exactly what detectron2's
    grid_sample(align_corners=False) paste computes.
    """
    c = start[:, None].float() + torch.arange(length, device=lo.device, dtype=torch.float32) + 0.5
    u = (c - lo[:, None]) / (hi - lo).clamp(min=1e-6)[:, None] * resolution - 0.5  # [N,length]
    j = torch.arange(resolution, device=lo.device, dtype=torch.float32)
    return (1 - (u[..., None] - j).abs()).clamp(min=0)


def _window(lo: torch.Tensor, hi: torch.Tensor, extent: int, resolution: int) -> tuple[torch.Tensor, int]:
    """Per box the first pixel of a window of common length covering every pixel its mask can reach (the box
    plus half a mask cell, where the bilinear tent is still non-zero), shifted to stay inside [0, extent)."""
    pad = (hi - lo) / (2 * resolution)
    a = torch.floor(lo - pad).clamp(0, extent)
    b = torch.ceil(hi + pad).clamp(0, extent)
    length = min(max(int((b - a).max().item()), 1), extent)
    return torch.minimum(a, torch.full_like(a, extent - length)).long(), length


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int],
                threshold: float | None = None) -> torch.Tensor:
    """R x R mask probabilities [N,R,R] placed in their boxes [N,4] (xyxy, output pixels) of an image of
    `size` -> [N,H,W] float (bool `>= threshold` when given), zero where the mask does not reach.

    Bilinear resampling into an axis-aligned box is separable: Wy [N,h,R] @ mask [N,R,R] @ Wx^T [N,R,w], one
    batched matmul for all instances over a window of the largest box's size (h x w, not the whole image),
    written into the output by one indexed assignment. Equals detectron2's per-mask grid_sample paste.
    """
    h, w = size
    n, r = masks.shape[0], masks.shape[-1]
    dtype = torch.bool if threshold is not None else torch.float32
    if n == 0:
        return torch.zeros((0, h, w), dtype=dtype, device=masks.device)
    boxes = boxes.float()
    ys, wh = _window(boxes[:, 1], boxes[:, 3], h, r)
    xs, ww = _window(boxes[:, 0], boxes[:, 2], w, r)
    wy = _interp_matrix(boxes[:, 1], boxes[:, 3], ys, wh, r)
    wx = _interp_matrix(boxes[:, 0], boxes[:, 2], xs, ww, r)
    crops = torch.matmul(torch.matmul(wy, masks.float()), wx.transpose(1, 2))  # [N,wh,ww]
    if threshold is not None:
        crops = crops >= threshold
    out = torch.zeros((n, h, w), dtype=dtype, device=masks.device)
    rows = ys[:, None, None] + torch.arange(wh, device=masks.device)[None, :, None]
    cols = xs[:, None, None] + torch.arange(ww, device=masks.device)[None, None, :]
    out[torch.arange(n, device=masks.device)[:, None, None], rows, cols] = crops
    return out
