"""Multi-scale deformable attention (Deformable DETR), pure PyTorch.

The official CUDA kernel is replaced by pure PyTorch, three ways that match it up to float rounding:
`ms_deform_attn_core_gather` folds the bilinear corner weights into the attention weights and reads
all levels, heads and points in one `embedding_bag` (about 3x faster than `grid_sample` in inference
on a 2-core CPU: benchmarks/ms_deform_attn_cores.py); `ms_deform_attn_core_recompute` is one
`grid_sample` per level whose samples are recomputed in the backward pass instead of stored, used
when gradients are needed; `ms_deform_attn_core_grid_sample` is the same with plain autograd, HF
transformers' way, kept as the reference. `ms_deform_attn_core` picks between the first two.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


def _shapes_as_list(spatial_shapes: torch.Tensor | Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    if isinstance(spatial_shapes, torch.Tensor):
        return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    return [(int(h), int(w)) for h, w in spatial_shapes]


def ms_deform_attn_core(value: torch.Tensor, spatial_shapes: torch.Tensor | Sequence[Sequence[int]],
                        sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """Sample every level at the given locations and take the attention-weighted sum.

    value [B, Lv, heads, Dh] (levels concatenated in `spatial_shapes` order),
    sampling_locations [B, Lq, heads, levels, points, 2] as (x, y) in [0, 1],
    attention_weights [B, Lq, heads, levels, points]  ->  [B, Lq, heads * Dh].

    Inference takes the gather path (`ms_deform_attn_core_gather`); when a gradient is needed the
    `grid_sample` path that stores no samples (`ms_deform_attn_core_recompute`), because
    `embedding_bag`'s backward (it sorts every index) is slower on a CPU
    (benchmarks/ms_deform_attn_cores.py times the ways).
    """
    needs_grad = torch.is_grad_enabled() and (value.requires_grad or sampling_locations.requires_grad
                                              or attention_weights.requires_grad)
    core = ms_deform_attn_core_recompute if needs_grad else ms_deform_attn_core_gather
    return core(value, spatial_shapes, sampling_locations, attention_weights)


def _bilinear_axis(coord: torch.Tensor, size: torch.Tensor):
    """Along one axis of sizes `size` (int32, per column): the two neighbouring pixel indices (clamped
    into the level, so always valid) and their linear weights, zero for a neighbour outside the level
    (`align_corners=False`, zero padding)."""
    last = size - 1
    pixel = coord * size.to(coord.dtype) - 0.5  # pixel centres sit at integer + 0.5
    low = pixel.floor()
    frac = pixel - low
    low = low.to(torch.int32)
    weight_low = (1 - frac) * ((low >= 0) & (low <= last))
    weight_high = frac * ((low >= -1) & (low < last))
    return low.clamp(min=0).minimum(last), (low + 1).clamp(min=0).minimum(last), weight_low, weight_high


def ms_deform_attn_core_gather(value: torch.Tensor, spatial_shapes: torch.Tensor | Sequence[Sequence[int]],
                               sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """`ms_deform_attn_core` as one fused gather + weighted sum (`embedding_bag`, mode "sum").

    Each (batch, query, head) is one bag whose entries are the 4 bilinear corners of every level and
    point, weighted by attention weight x corner weight; no [B*heads, Dh, Lq, points] sample tensor is
    materialised. All index arithmetic runs on contiguous [B*Lq*heads, levels*points] tensors with
    per-column constants, so every elementwise pass is vectorised.
    """
    shapes = _shapes_as_list(spatial_shapes)
    b, num_values, heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    device = value.device
    # per-column constants: columns are (level, point), the level's value repeated over its points
    level_sizes = torch.tensor(shapes, dtype=torch.int32, device=device).repeat_interleave(num_points, dim=0)
    heights, widths = level_sizes.unbind(1)  # int32 [levels*points]; a row of a level is `widths` long
    starts = torch.tensor([sum(h * w for h, w in shapes[:i]) for i in range(num_levels)], dtype=torch.int32,
                          device=device).repeat_interleave(num_points)
    rows = b * num_queries * heads
    # The table is value laid [B, heads, Lv, Dh]: value[b, v, head] is row (b * heads + head) * Lv + v.
    table = value.permute(0, 2, 1, 3).reshape(-1, head_dim)
    bag_base = ((torch.arange(b, dtype=torch.int32, device=device)[:, None, None] * heads
                 + torch.arange(heads, dtype=torch.int32, device=device)[None, None, :]) * num_values)
    level_base = bag_base.expand(b, num_queries, heads).reshape(rows, 1) + starts  # [rows, levels*points]
    locations = sampling_locations.reshape(rows, num_levels * num_points, 2)
    x0, x1, wx0, wx1 = _bilinear_axis(locations[..., 0], widths)
    y0, y1, wy0, wy1 = _bilinear_axis(locations[..., 1], heights)
    row0 = level_base + y0 * widths
    row1 = level_base + y1 * widths
    indices = torch.stack([row0 + x0, row0 + x1, row1 + x0, row1 + x1], -1).view(rows, -1)
    attention = attention_weights.reshape(rows, num_levels * num_points)
    top, bottom = attention * wy0, attention * wy1
    weights = torch.stack([top * wx0, top * wx1, bottom * wx0, bottom * wx1], -1).view(rows, -1)
    out = F.embedding_bag(indices, table, per_sample_weights=weights.to(table.dtype), mode="sum")
    return out.view(b, num_queries, heads * head_dim)


def _level_grids(sampling_locations: torch.Tensor, attention_weights: torch.Tensor, heads: int):
    """Per-level grid_sample inputs in a [B*heads, ..., points, Lq] layout, so the weighted sum over points
    reduces a non-innermost axis of grid_sample's [B*heads, Dh, points, Lq] output (a vectorised
    multiply-add of contiguous rows, no transposed copy): grids [B*heads, levels, points, Lq, 2] in
    [-1, 1] and weights [B*heads, 1, levels, points, Lq]."""
    b, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    grids = (2 * sampling_locations - 1).permute(0, 2, 3, 4, 1, 5).reshape(b * heads, num_levels, num_points,
                                                                         num_queries, 2)
    weights = attention_weights.permute(0, 2, 3, 4, 1).reshape(b * heads, 1, num_levels, num_points, num_queries)
    return grids, weights


def _value_levels(value: torch.Tensor, shapes: list[tuple[int, int]]):
    """value [B, Lv, heads, Dh] -> one [B*heads, Dh, h, w] map per level."""
    b, _, heads, head_dim = value.shape
    return [v.permute(0, 2, 3, 1).reshape(b * heads, head_dim, h, w)
            for v, (h, w) in zip(value.split([h * w for h, w in shapes], dim=1), shapes)]


def _heads_last(output: torch.Tensor, b: int, heads: int) -> torch.Tensor:
    """[B*heads, Dh, Lq] -> [B, Lq, heads*Dh]."""
    _, head_dim, num_queries = output.shape
    return output.view(b, heads, head_dim, num_queries).permute(0, 3, 1, 2).reshape(b, num_queries, heads * head_dim)


def _weighted_samples(value_l: torch.Tensor, grid: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One level: sum over points of grid_sample(value_l [B*heads, Dh, h, w], grid [B*heads, points, Lq, 2])
    weighted by weights [B*heads, 1, points, Lq] -> [B*heads, Dh, Lq]."""
    sampled = F.grid_sample(value_l, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (sampled * weights.to(sampled.dtype)).sum(2)


def _levels_core(value, spatial_shapes, sampling_locations, attention_weights, per_level) -> torch.Tensor:
    """The grid_sample cores: `per_level(value_l, grid_l, weights_l)` summed over levels."""
    shapes = _shapes_as_list(spatial_shapes)
    heads = value.shape[2]
    grids, weights = _level_grids(sampling_locations, attention_weights, heads)
    output = None
    for level, value_l in enumerate(_value_levels(value, shapes)):
        contribution = per_level(value_l, grids[:, level], weights[:, :, level])
        output = contribution if output is None else output + contribution
    return _heads_last(output, value.shape[0], heads)


def ms_deform_attn_core_grid_sample(value: torch.Tensor, spatial_shapes: torch.Tensor | Sequence[Sequence[int]],
                                    sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """`ms_deform_attn_core` as one `grid_sample` per level and plain autograd, HF transformers' way
    (kept as the reference the training core is checked and benchmarked against).

    value [B, Lv, heads, Dh] (levels concatenated in `spatial_shapes` order),
    sampling_locations [B, Lq, heads, levels, points, 2] as (x, y) in [0, 1],
    attention_weights [B, Lq, heads, levels, points]  ->  [B, Lq, heads * Dh].
    Locations outside [0, 1] read zeros (`padding_mode="zeros"`, `align_corners=False`), like the CUDA kernel.
    """
    return _levels_core(value, spatial_shapes, sampling_locations, attention_weights, _weighted_samples)


class _SampleAndWeigh(torch.autograd.Function):
    """`_weighted_samples` for one level, keeping only the inputs for the backward pass: the
    [B*heads, Dh, points, Lq] samples (the largest tensor of the pixel decoder, 44 MB per level and layer
    at 512x512, batch 2) are recomputed there instead of stored.

    Runs in fp32 (or float64) whatever the input dtype, like `grid_sample` under autocast; returns
    value_l's dtype.
    """

    @staticmethod
    def forward(ctx, value_l, grid, weights):
        dtype = torch.promote_types(value_l.dtype, torch.float32)
        ctx.save_for_backward(value_l, grid, weights)
        with torch.autocast(value_l.device.type, enabled=False):
            return _weighted_samples(value_l.to(dtype), grid.to(dtype), weights.to(dtype)).to(value_l.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        value_l, grid, weights = ctx.saved_tensors
        dtype = torch.promote_types(value_l.dtype, torch.float32)
        value32, grid32 = value_l.to(dtype), grid.to(dtype)
        grad = grad_output.to(dtype).unsqueeze(2)  # [B*heads, Dh, 1, Lq]
        grad_weights = None
        if ctx.needs_input_grad[2]:
            sampled = F.grid_sample(value32, grid32, mode="bilinear", padding_mode="zeros", align_corners=False)
            grad_weights = (grad * sampled).sum(1, keepdim=True).to(weights.dtype)
        grad_value = grad_grid = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_value, grad_grid = torch.ops.aten.grid_sampler_2d_backward(
                grad * weights.to(dtype), value32, grid32, 0, 0, False,  # bilinear, zeros, align_corners=False
                [ctx.needs_input_grad[0], ctx.needs_input_grad[1]])
            grad_value = grad_value.to(value_l.dtype) if ctx.needs_input_grad[0] else None
            grad_grid = grad_grid.to(grid.dtype) if ctx.needs_input_grad[1] else None
        return grad_value, grad_grid, grad_weights


def ms_deform_attn_core_recompute(value: torch.Tensor, spatial_shapes: torch.Tensor | Sequence[Sequence[int]],
                                  sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """`ms_deform_attn_core` for training: `ms_deform_attn_core_grid_sample`'s values and gradients,
    but the per-level samples are recomputed in the backward pass rather than stored (one extra
    `grid_sample` per level there; benchmarks/ms_deform_attn_cores.py measures time and stored bytes)."""
    return _levels_core(value, spatial_shapes, sampling_locations, attention_weights, _SampleAndWeigh.apply)


class MSDeformAttn(nn.Module):
    """Each query attends to `n_points` learned offsets around its reference point on every level."""

    def __init__(self, d_model: int = 256, n_levels: int = 3, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Official init: zero offset weights, offset biases on a ring of directions (one per head),
        scaled by the point index, so training starts from a spread-out sampling pattern."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, value_input: torch.Tensor,
                spatial_shapes: torch.Tensor | Sequence[Sequence[int]], level_start_index: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """query [B,Lq,C] (position already added), reference_points [B,Lq,levels,2] normalised (x, y)
        or [B,Lq,levels,4] boxes (cx, cy, w, h), value_input [B,Lv,C], spatial_shapes [levels,2] (h, w)
        as an int64 tensor or a list (a list avoids a device sync), padding_mask [B,Lv] True = padding.

        `level_start_index` is implied by `spatial_shapes`; it is accepted for the usual signature.
        """
        b, num_queries, _ = query.shape
        _, num_values, _ = value_input.shape
        shapes = _shapes_as_list(spatial_shapes)
        if sum(h * w for h, w in shapes) != num_values:
            raise ValueError(f"spatial_shapes {shapes} do not cover the {num_values} values")

        value = self.value_proj(value_input)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(b, num_values, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(b, num_queries, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(b, num_queries, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(b, num_queries, self.n_heads, self.n_levels, self.n_points)

        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: normalise by (w, h)
            normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=query.dtype, device=query.device)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"reference_points must end in 2 or 4 values, got {reference_points.shape[-1]}")
        output = ms_deform_attn_core(value, shapes, locations, weights)
        return self.output_proj(output)
