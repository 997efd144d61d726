"""Multi-scale deformable attention (Deformable DETR), pure PyTorch.

The official CUDA kernel is replaced by pure PyTorch, three ways that match it up to float rounding:
`ms_deform_attn_core_gather` folds the bilinear corner weights into the attention weights and reads
all levels, heads and points in one `embedding_bag` (in inference on a 2-core CPU about 2x faster than
`grid_sample`, 3.5x faster than HF transformers' function: benchmarks/ms_deform_attn_cores.py);
`ms_deform_attn_core_recompute` is one `grid_sample` per level whose samples are recomputed in the
backward pass instead of stored, used when gradients are needed; `ms_deform_attn_core_grid_sample` is the same with plain autograd, HF
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


def _level_sizes(shapes: list[tuple[int, int]], dtype: torch.dtype, device) -> torch.Tensor:
    """[levels, 2] (w, h) per level: the (x, y) extent of each level in pixels."""
    return torch.tensor([[w, h] for h, w in shapes], dtype=dtype, device=device)


def to_pixels(sampling_locations: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
    """Normalised (x, y) in [0, 1] [B, Lq, heads, levels, points, 2] -> pixel coordinates of each level,
    pixel centres at integers (`align_corners=False`)."""
    sizes = _level_sizes(shapes, sampling_locations.dtype, sampling_locations.device)
    return sampling_locations * sizes[:, None, :] - 0.5


def _pixels_to_grid(pixels: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
    """Pixel coordinates -> `grid_sample`'s [-1, 1] coordinates (align_corners=False)."""
    sizes = _level_sizes(shapes, pixels.dtype, pixels.device)[:, None, :]
    return torch.addcmul(1 / sizes - 1, pixels, 2 / sizes)


def ms_deform_attn_core(value: torch.Tensor, spatial_shapes: torch.Tensor | Sequence[Sequence[int]],
                        sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """Sample every level at the given locations and take the attention-weighted sum.

    value [B, Lv, heads, Dh] (levels concatenated in `spatial_shapes` order),
    sampling_locations [B, Lq, heads, levels, points, 2] as (x, y) in [0, 1],
    attention_weights [B, Lq, heads, levels, points]  ->  [B, Lq, heads * Dh].
    Locations outside [0, 1] read zeros (`padding_mode="zeros"`, `align_corners=False`), like the CUDA kernel.
    """
    shapes = _shapes_as_list(spatial_shapes)
    return ms_deform_attn_pixels(value, shapes, to_pixels(sampling_locations, shapes), attention_weights)


def ms_deform_attn_pixels(value: torch.Tensor, shapes: list[tuple[int, int]], pixel_locations: torch.Tensor,
                          attention_weights: torch.Tensor) -> torch.Tensor:
    """`ms_deform_attn_core` with the locations already in pixels of each level (`to_pixels`).

    Inference takes the gather path (`_gather_pixels`); when a gradient is needed the `grid_sample` path
    that stores no samples (`ms_deform_attn_core_recompute`'s), because `embedding_bag`'s backward (it
    sorts every index) is slower on a CPU (benchmarks/ms_deform_attn_cores.py times the ways).
    """
    needs_grad = torch.is_grad_enabled() and (value.requires_grad or pixel_locations.requires_grad
                                              or attention_weights.requires_grad)
    if not needs_grad:
        return _gather_pixels(value, shapes, pixel_locations, attention_weights)
    return _levels_core(value, shapes, _pixels_to_grid(pixel_locations, shapes), attention_weights,
                        _SampleAndWeigh.apply)


def _padded_table(value: torch.Tensor, shapes: list[tuple[int, int]]) -> tuple[torch.Tensor, int]:
    """value [B, Lv, heads, Dh] -> (rows [B*heads*per_head, Dh], per_head): each level laid out
    [B, heads, h+3, w+3, Dh] with one zero row/column before and two after, so that both bilinear
    neighbours of any location clamped into [-1, size] are valid rows (zeros outside the level)."""
    b, _, heads, head_dim = value.shape
    padded = [(h + 3) * (w + 3) for h, w in shapes]
    table = value.new_zeros(b, heads, sum(padded), head_dim)
    start = 0
    for v, (h, w), n in zip(value.split([h * w for h, w in shapes], dim=1), shapes, padded):
        interior = table[:, :, start:start + n].view(b, heads, h + 3, w + 3, head_dim)[:, :, 1:h + 1, 1:w + 1]
        interior.copy_(v.view(b, h, w, heads, head_dim).permute(0, 3, 1, 2, 4))
        start += n
    return table.view(-1, head_dim), sum(padded)


def _gather_pixels(value: torch.Tensor, shapes: list[tuple[int, int]], pixel_locations: torch.Tensor,
                   attention_weights: torch.Tensor) -> torch.Tensor:
    """One fused gather + weighted sum (`embedding_bag`, mode "sum") over a zero-bordered value table.

    Each (batch, query, head) is one bag whose entries are the 4 bilinear corners of every level and
    point, weighted by attention weight x corner weight; no [B*heads, Dh, Lq, points] sample tensor is
    materialised. Locations are clamped into [-1, size] first: beyond that every corner is in the zero
    border, so no per-corner validity test is needed, and x and y are handled in one pass each.
    """
    b, _, heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = pixel_locations.shape
    device = value.device
    columns = num_levels * num_points
    rows = b * num_queries * heads
    table, per_head = _padded_table(value, shapes)
    # per-column constants: columns are (level, point)
    upper = _level_sizes(shapes, pixel_locations.dtype, device).repeat_interleave(num_points, dim=0)  # [cols, 2]
    row_length = torch.tensor([w + 3 for _, w in shapes], dtype=torch.int32, device=device).repeat_interleave(num_points)
    level_start = torch.tensor([sum((h + 3) * (w + 3) for h, w in shapes[:i]) for i in range(num_levels)],
                               dtype=torch.int32, device=device).repeat_interleave(num_points)
    corners = torch.stack([torch.zeros_like(row_length), torch.ones_like(row_length), row_length, row_length + 1], -1)
    bag_start = (torch.arange(b * heads, dtype=torch.int32, device=device) * per_head).view(b, 1, heads, 1)
    column_base = (bag_start + level_start + row_length + 1).expand(b, num_queries, heads, columns).reshape(rows, columns)

    pixels = torch.minimum(pixel_locations.reshape(rows, columns, 2).clamp(min=-1.0), upper)
    low = pixels.floor()
    frac = pixels - low
    low = low.to(torch.int32)
    top_left = low[..., 1] * row_length + low[..., 0] + column_base  # [rows, cols]
    indices = (top_left[..., None] + corners).view(rows, -1)  # corners: (y0 x0), (y0 x1), (y1 x0), (y1 x1)
    fx, fy = frac[..., 0], frac[..., 1]
    attention = attention_weights.reshape(rows, columns).to(frac.dtype)
    bottom = attention * fy
    top = attention - bottom
    top_right, bottom_right = top * fx, bottom * fx
    weights = torch.stack([top - top_right, top_right, bottom - bottom_right, bottom_right], -1).view(rows, -1)
    out = F.embedding_bag(indices, table, per_sample_weights=weights.to(table.dtype), mode="sum")
    return out.view(b, num_queries, heads * head_dim)


def ms_deform_attn_core_gather(value: torch.Tensor, spatial_shapes: torch.Tensor | Sequence[Sequence[int]],
                               sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """`ms_deform_attn_core`'s inference path (`_gather_pixels`) for normalised locations."""
    shapes = _shapes_as_list(spatial_shapes)
    return _gather_pixels(value, shapes, to_pixels(sampling_locations, shapes), attention_weights)


def _level_grids(grid: torch.Tensor, attention_weights: torch.Tensor, heads: int):
    """Per-level grid_sample inputs in a [B*heads, ..., points, Lq] layout, so the weighted sum over points
    reduces a non-innermost axis of grid_sample's [B*heads, Dh, points, Lq] output (a vectorised
    multiply-add of contiguous rows, no transposed copy): `grid` [B, Lq, heads, levels, points, 2] in
    [-1, 1] -> grids [B*heads, levels, points, Lq, 2] and weights [B*heads, 1, levels, points, Lq]."""
    b, num_queries, _, num_levels, num_points, _ = grid.shape
    grids = grid.permute(0, 2, 3, 4, 1, 5).reshape(b * heads, num_levels, num_points, num_queries, 2)
    weights = attention_weights.reshape(b, num_queries, heads, num_levels, num_points).permute(0, 2, 3, 4, 1)
    return grids, weights.reshape(b * heads, 1, num_levels, num_points, num_queries)


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


def _levels_core(value, shapes, grid, attention_weights, per_level) -> torch.Tensor:
    """The grid_sample cores: `per_level(value_l, grid_l, weights_l)` summed over levels; `grid` holds
    the locations in grid_sample's [-1, 1] coordinates."""
    heads = value.shape[2]
    grids, weights = _level_grids(grid, attention_weights, heads)
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
    return _levels_core(value, _shapes_as_list(spatial_shapes), 2 * sampling_locations - 1, attention_weights,
                        _weighted_samples)


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
    return _levels_core(value, _shapes_as_list(spatial_shapes), 2 * sampling_locations - 1, attention_weights,
                        _SampleAndWeigh.apply)


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

    def pixel_reference(self, reference_points: torch.Tensor,
                        spatial_shapes: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        """reference_points [B, Lq, levels, 2] normalised (x, y) -> [B*Lq, heads*levels*points*2]: each
        query's reference point in pixels of every level, laid out like the sampling-offset projection's
        output. `forward` passes it to `addmm` as the term added to that projection, so the sampling
        locations come out of the GEMM in pixels with no further pass; an encoder whose layers share
        the reference points computes it once for all of them."""
        shapes = _shapes_as_list(spatial_shapes)
        b, num_queries = reference_points.shape[:2]
        sizes = _level_sizes(shapes, reference_points.dtype, reference_points.device)
        pixels = reference_points * sizes - 0.5
        return (pixels[:, :, None, :, None, :].expand(b, num_queries, self.n_heads, self.n_levels, self.n_points, 2)
                .reshape(b * num_queries, -1))

    def _pixel_locations(self, query: torch.Tensor, reference_points: torch.Tensor, shapes: list[tuple[int, int]],
                         pixel_reference: torch.Tensor | None) -> torch.Tensor:
        """Sampling locations in pixels of each level, [B, Lq, heads, levels, points, 2]."""
        b, num_queries, channels = query.shape
        shape = (b, num_queries, self.n_heads, self.n_levels, self.n_points, 2)
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level (official definition): reference in pixels + offsets
            base = pixel_reference if pixel_reference is not None else self.pixel_reference(reference_points, shapes)
            flat = query.reshape(b * num_queries, channels)
            if flat.dtype == base.dtype and not torch.is_autocast_enabled(query.device.type):
                pixels = torch.addmm(base, flat, self.sampling_offsets.weight.t()).add_(self.sampling_offsets.bias)
            else:  # reduced precision: keep the (large) reference coordinates out of the low-precision GEMM
                pixels = self.sampling_offsets(flat).to(base.dtype) + base
            return pixels.view(shape)
        if reference_points.shape[-1] == 4:
            offsets = self.sampling_offsets(query).view(shape)
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5)
            return to_pixels(locations, shapes)
        raise ValueError(f"reference_points must end in 2 or 4 values, got {reference_points.shape[-1]}")

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, value_input: torch.Tensor,
                spatial_shapes: torch.Tensor | Sequence[Sequence[int]], level_start_index: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None, pixel_reference: torch.Tensor | None = None) -> torch.Tensor:
        """query [B,Lq,C] (position already added), reference_points [B,Lq,levels,2] normalised (x, y)
        or [B,Lq,levels,4] boxes (cx, cy, w, h), value_input [B,Lv,C], spatial_shapes [levels,2] (h, w)
        as an int64 tensor or a list (a list avoids a device sync), padding_mask [B,Lv] True = padding,
        pixel_reference: `self.pixel_reference(reference_points, spatial_shapes)` if already computed.

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
        pixels = self._pixel_locations(query, reference_points, shapes, pixel_reference)
        weights = softmax_last_dim(self.attention_weights(query).view(b, num_queries, self.n_heads, -1))
        output = ms_deform_attn_pixels(value, shapes, pixels, weights)
        return self.output_proj(output)


def softmax_last_dim(x: torch.Tensor) -> torch.Tensor:
    """`x.softmax(-1)`. Without autograd, as max-subtract, exp and divide in place: torch's softmax
    kernel vectorises along the softmax axis, which over MSDeformAttn's 12 (levels x points) weights is
    several times slower (`python benchmarks/cpu_primitives.py` times both)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return x.softmax(-1, dtype=torch.float32)
    x = x.float()  # (a no-op in fp32) weights are computed in fp32 under autocast too
    out = (x - x.amax(-1, keepdim=True)).exp_()
    return out.div_(out.sum(-1, keepdim=True))
