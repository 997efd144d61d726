"""Multi-scale deformable attention (Deformable DETR), pure PyTorch.

The official CUDA kernel is replaced by pure PyTorch that matches it up to float rounding:
`ms_deform_attn_core` folds the bilinear corner weights into the attention weights and reads all
levels, heads and points in one `embedding_bag`; its backward pass (`_GatherBackward`) replaces
scatters with a sort of the samples' top-left corners and gathers. On a 2-core CPU it is about 2x
faster than `grid_sample` in inference and faster in training too, storing no samples
(benchmarks/ms_deform_attn_cores.py). `ms_deform_attn_core_grid_sample` is one `grid_sample` per
level with plain autograd, HF transformers' way, kept as the reference.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F


def _size(v) -> int:
    """A level's height or width as an int, left symbolic (a SymInt) in graphs exported with dynamic sizes."""
    return v if isinstance(v, torch.SymInt) else int(v)


def _shapes_as_list(spatial_shapes: torch.Tensor | Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    if isinstance(spatial_shapes, torch.Tensor):
        return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    return [(_size(h), _size(w)) for h, w in spatial_shapes]


def size_tensor(values, dtype: torch.dtype, device) -> torch.Tensor:
    """`torch.tensor(values)` for (nested lists of) sizes; symbolic sizes (dynamic-size export) become graph
    values instead of being fixed to the sizes seen while exporting."""
    if not any(isinstance(v, torch.SymInt) for v in _flat(values)):
        return torch.tensor(values, dtype=dtype, device=device)
    if isinstance(values[0], (list, tuple)):
        return torch.stack([size_tensor(list(row), dtype, device) for row in values])
    # made as int64 (a symbolic size's own type; ONNX refuses to stack it with int32) and then converted
    return torch.stack([torch.full((), v, dtype=torch.int64, device=device) for v in values]).to(dtype)


def _flat(values):
    for v in values:
        if isinstance(v, (list, tuple)):
            yield from _flat(v)
        else:
            yield v


def _level_sizes(shapes: list[tuple[int, int]], dtype: torch.dtype, device) -> torch.Tensor:
    """[levels, 2] (w, h) per level: the (x, y) extent of each level in pixels."""
    return size_tensor([[w, h] for h, w in shapes], dtype, device)


def to_pixels(sampling_locations: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
    """Normalised (x, y) in [0, 1] [B, Lq, heads, levels, points, 2] -> pixel coordinates of each level,
    pixel centres at integers (`align_corners=False`)."""
    sizes = _level_sizes(shapes, sampling_locations.dtype, sampling_locations.device)
    return sampling_locations * sizes[:, None, :] - 0.5


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
    """`ms_deform_attn_core` with the locations already in pixels of each level (`to_pixels`): the
    gather core (`_gather_pixels`), with `_GatherBackward`'s backward pass when a gradient is needed."""
    needs_grad = torch.is_grad_enabled() and (value.requires_grad or pixel_locations.requires_grad
                                              or attention_weights.requires_grad)
    if needs_grad:
        return _GatherBackward.apply(value, pixel_locations, attention_weights, shapes)
    return _gather_pixels(value, shapes, pixel_locations, attention_weights)


def _padded_level_sizes(shapes: list[tuple[int, int]]) -> list[int]:
    """Rows of each level in the padded table: (h + 3) x (w + 3), one zero row/column before the
    level and two after."""
    return [(h + 3) * (w + 3) for h, w in shapes]


def _level_interiors(table: torch.Tensor, shapes: list[tuple[int, int]]) -> Iterator[torch.Tensor]:
    """Padded table [B, heads, per_head, Dh] -> each level's interior (its real pixels) as a view
    [B, heads, h, w, Dh], made one at a time: `_padded_table` writes into each before the next is
    sliced (slices taken before an in-place write fail in exported graphs, as `split`'s views fail in
    autograd)."""
    b, heads, _, head_dim = table.shape
    start = 0
    for (h, w), size in zip(shapes, _padded_level_sizes(shapes)):
        yield table[:, :, start:start + size].view(b, heads, h + 3, w + 3, head_dim)[:, :, 1:h + 1, 1:w + 1]
        start += size


def _padded_table(value: torch.Tensor, shapes: list[tuple[int, int]]) -> tuple[torch.Tensor, int]:
    """value [B, Lv, heads, Dh] -> (rows [B*heads*per_head, Dh], per_head): each level laid out
    [B, heads, h+3, w+3, Dh] with one zero row/column before and two after, so that both bilinear
    neighbours of any location clamped into [-1, size] are valid rows (zeros outside the level)."""
    b, _, heads, head_dim = value.shape
    per_head = sum(_padded_level_sizes(shapes))
    table = value.new_zeros(b, heads, per_head, head_dim)
    for interior, v, (h, w) in zip(_level_interiors(table, shapes), value.split([h * w for h, w in shapes], dim=1),
                                   shapes):
        interior.copy_(v.view(b, h, w, heads, head_dim).permute(0, 3, 1, 2, 4))
    return table.view(-1, head_dim), per_head


def _unpadded(table: torch.Tensor, shapes: list[tuple[int, int]], value_shape) -> torch.Tensor:
    """`_padded_table`'s inverse: rows [B*heads*per_head, Dh] -> [B, Lv, heads, Dh] (borders dropped)."""
    b, _, heads, head_dim = value_shape
    interiors = _level_interiors(table.view(b, heads, -1, head_dim), shapes)
    return torch.cat([interior.permute(0, 2, 3, 1, 4).reshape(b, h * w, heads, head_dim)
                      for interior, (h, w) in zip(interiors, shapes)], dim=1)


def _column_upper(shapes: list[tuple[int, int]], num_points: int, dtype: torch.dtype, device) -> torch.Tensor:
    """[levels * points, 2]: each (level, point) column's (w, h), the exclusive upper pixel bound."""
    return _level_sizes(shapes, dtype, device).repeat_interleave(num_points, dim=0)


class _BilinearLayout(NamedTuple):
    """Where and how much each sample reads, in `_padded_table` rows: rows are (batch, query, head),
    columns (level, point), corners (y0 x0), (y0 x1), (y1 x0), (y1 x1)."""

    top_left: torch.Tensor  # [rows, cols] int32: table row of the (y0, x0) corner
    corner_offsets: torch.Tensor  # [cols, 4] int32: the four corners' rows relative to top_left
    fraction: torch.Tensor  # [rows, cols, 2]: (x, y) position inside the corner square
    attention: torch.Tensor  # [rows, cols]

    def indices(self) -> torch.Tensor:
        """[rows, cols * 4] table rows of every corner."""
        return (self.top_left[..., None] + self.corner_offsets).view(self.top_left.shape[0], -1)

    def weights(self) -> torch.Tensor:
        """[rows, cols, 4] attention weight x bilinear corner weight."""
        fx, fy = self.fraction.unbind(-1)
        bottom = self.attention * fy
        top = self.attention - bottom
        top_right, bottom_right = top * fx, bottom * fx
        return torch.stack([top - top_right, top_right, bottom - bottom_right, bottom_right], -1)


def _bilinear_layout(shapes: list[tuple[int, int]], per_head: int, b: int, heads: int,
                     pixel_locations: torch.Tensor, attention_weights: torch.Tensor) -> _BilinearLayout:
    """Locations are clamped into [-1, size] first: beyond that every corner is in the zero border of
    the table, so no per-corner validity test is needed, and x and y are handled in one pass each."""
    _, num_queries, _, num_levels, num_points, _ = pixel_locations.shape
    device = pixel_locations.device
    columns = num_levels * num_points
    rows = b * num_queries * heads
    # per-column constants: columns are (level, point)
    upper = _column_upper(shapes, num_points, pixel_locations.dtype, device)
    row_length = size_tensor([w + 3 for _, w in shapes], torch.int32, device).repeat_interleave(num_points)
    sizes = _padded_level_sizes(shapes)
    level_start = size_tensor([sum(sizes[:i]) for i in range(num_levels)], torch.int32,
                              device).repeat_interleave(num_points)
    corners = torch.stack([torch.zeros_like(row_length), torch.ones_like(row_length), row_length, row_length + 1], -1)
    bag_start = (torch.arange(b * heads, dtype=torch.int32, device=device) * per_head).view(b, 1, heads, 1)
    column_base = (bag_start + level_start + row_length + 1).expand(b, num_queries, heads, columns).reshape(rows, columns)

    pixels = torch.minimum(pixel_locations.reshape(rows, columns, 2).clamp(min=-1.0), upper)
    low = pixels.floor()
    fraction = pixels - low
    low = low.to(torch.int32)
    top_left = low[..., 1] * row_length + low[..., 0] + column_base  # [rows, cols]
    return _BilinearLayout(top_left, corners, fraction, attention_weights.reshape(rows, columns).to(fraction.dtype))


def _gather_pixels(value: torch.Tensor, shapes: list[tuple[int, int]], pixel_locations: torch.Tensor,
                   attention_weights: torch.Tensor) -> torch.Tensor:
    """One fused gather + weighted sum (`embedding_bag`, mode "sum") over a zero-bordered value table.

    Each (batch, query, head) is one bag whose entries are the 4 bilinear corners of every level and
    point, weighted by attention weight x corner weight; no [B*heads, Dh, Lq, points] sample tensor is
    materialised (forward only: `ms_deform_attn_pixels` routes calls that need a gradient to
    `_GatherBackward`).
    """
    return _gather_with_layout(value, shapes, pixel_locations, attention_weights)[0]


def _gather_with_layout(value, shapes, pixel_locations, attention_weights) -> tuple[torch.Tensor, _BilinearLayout]:
    """`_gather_pixels`'s output [B, Lq, heads * Dh] and the layout it read with."""
    b, _, heads, head_dim = value.shape
    table, per_head = _padded_table(value, shapes)
    layout = _bilinear_layout(shapes, per_head, b, heads, pixel_locations, attention_weights)
    weights = layout.weights().view(layout.top_left.shape[0], -1).to(table.dtype)
    indices = layout.indices()
    if torch.compiler.is_exporting():  # ONNX's embedding_bag with dynamic sizes mixes int32 and int64
        indices = indices.long()
    out = F.embedding_bag(indices, table, per_sample_weights=weights, mode="sum")
    return out.view(b, -1, heads * head_dim), layout


class _GatherBackward(torch.autograd.Function):
    """`_gather_pixels` with a hand-written backward pass; stores the value table and the layout
    (no samples). `embedding_bag`'s own backward sorts all 4 corner indices of every sample and
    scatters; here:

    * value gradient: the samples are sorted once by their top-left corner (a quarter of the
      indices) and each corner's contributions are *gathered* per table row (`embedding_bag` over the
      output gradient); the four corner sums are then added at their per-level row offsets;
    * corner dot products <grad_out, value at corner> (`embedding_bag`'s per-sample-weight
      gradient) give the attention-weight and location gradients in closed form.

    Runs in fp32 (or float64) whatever the input dtype, like `grid_sample` under autocast; returns
    value's dtype. Locations clamped into [-1, size] get no location gradient, as there every corner
    reads zeros.
    """

    @staticmethod
    def forward(ctx, value, pixel_locations, attention_weights, shapes):
        dtype = torch.promote_types(value.dtype, torch.float32)
        with torch.autocast(value.device.type, enabled=False):
            out, layout = _gather_with_layout(value.to(dtype), shapes, pixel_locations.to(dtype),
                                              attention_weights.to(dtype))
        upper = _column_upper(shapes, pixel_locations.shape[-2], dtype, value.device)
        raw = pixel_locations.reshape(*layout.top_left.shape, 2)
        ctx.save_for_backward(value, layout.top_left, layout.corner_offsets, layout.fraction, layout.attention,
                              (raw > -1) & (raw < upper))  # the table is rebuilt from value: half the bytes
        ctx.shapes = shapes
        ctx.location_shape, ctx.location_dtype = pixel_locations.shape, pixel_locations.dtype
        ctx.attention_shape, ctx.attention_dtype = attention_weights.shape, attention_weights.dtype
        return out.to(value.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        value, top_left, corner_offsets, fraction, attention, inside = ctx.saved_tensors
        layout = _BilinearLayout(top_left, corner_offsets, fraction, attention)
        rows, columns = top_left.shape
        table, _ = _padded_table(value.to(fraction.dtype), ctx.shapes)
        grad = grad_output.reshape(rows, -1).to(table.dtype).contiguous()  # (a sum's gradient is expanded)
        grad_value = grad_locations = grad_attention = None
        if ctx.needs_input_grad[0]:
            grad_table = _scatter_by_gather(grad, top_left, layout.weights(), table.shape[0], ctx.shapes)
            grad_value = _unpadded(grad_table, ctx.shapes, value.shape).to(value.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # <grad_out, value at each corner>: embedding_bag's per-sample-weight gradient
            samples = rows * columns * 4
            bag_of_sample = torch.arange(rows, dtype=top_left.dtype, device=top_left.device)[:, None]
            dots = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                grad, table, layout.indices().view(-1), bag_of_sample[:, 0] * (columns * 4),
                bag_of_sample.expand(rows, columns * 4).reshape(samples), 0, -1)  # mode 0: sum
            d00, d01, d10, d11 = dots.view(rows, columns, 4).unbind(-1)
            fx, fy = fraction.unbind(-1)
            top = d00 + (d01 - d00) * fx  # <grad, sample> along the top and bottom edges
            bottom = d10 + (d11 - d10) * fx
            if ctx.needs_input_grad[2]:
                grad_attention = (top + (bottom - top) * fy).view(ctx.attention_shape).to(ctx.attention_dtype)
            if ctx.needs_input_grad[1]:
                d_x = (d01 - d00) + (d11 - d10 - d01 + d00) * fy
                d_xy = torch.stack([d_x, bottom - top], -1).mul_((attention[..., None]) * inside)
                grad_locations = d_xy.view(ctx.location_shape).to(ctx.location_dtype)
        return grad_value, grad_locations, grad_attention, None


def _scatter_by_gather(grad: torch.Tensor, top_left: torch.Tensor, weights: torch.Tensor, table_rows: int,
                       shapes: list[tuple[int, int]]) -> torch.Tensor:
    """sum over samples of weight x grad[row] into each corner's table row, [table_rows, Dh], as
    gathers: samples sorted by top-left row, one `embedding_bag` per corner over `grad`, then each
    corner's sums shifted by its row offset (the same for every point of a level)."""
    rows, columns = top_left.shape
    flat = top_left.reshape(-1)
    order = torch.argsort(flat, stable=True)  # each row sums its samples in (batch, query) order: batch-independent
    counts = torch.bincount(flat, minlength=table_rows)
    offsets = counts.cumsum(0) - counts
    source_rows = torch.div(order, columns, rounding_mode="floor")
    corner_weights = weights.reshape(-1, 4).index_select(0, order).t().contiguous()  # [4, samples]
    per_corner = [F.embedding_bag(source_rows, grad, offsets=offsets, per_sample_weights=w, mode="sum")
                  for w in corner_weights]
    grad_table = per_corner[0]
    # levels are consecutive blocks of each (batch, head) table; corners add at a fixed offset within a level
    sizes = _padded_level_sizes(shapes)
    blocks = [part.view(-1, sum(sizes), grad.shape[1]) for part in (grad_table, *per_corner[1:])]
    start = 0
    for (_, w), size in zip(shapes, sizes):
        for corner, shift in zip(blocks[1:], (1, w + 3, w + 4)):
            blocks[0][:, start + shift:start + size] += corner[:, start:start + size - shift]
        start += size
    return grad_table


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


def ms_deform_attn_core_grid_sample(value: torch.Tensor, spatial_shapes: torch.Tensor | Sequence[Sequence[int]],
                                    sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """`ms_deform_attn_core` as one `grid_sample` per level and plain autograd, HF transformers' way
    (kept as the reference the gather core is checked and benchmarked against).

    value [B, Lv, heads, Dh] (levels concatenated in `spatial_shapes` order),
    sampling_locations [B, Lq, heads, levels, points, 2] as (x, y) in [0, 1],
    attention_weights [B, Lq, heads, levels, points]  ->  [B, Lq, heads * Dh].
    Locations outside [0, 1] read zeros (`padding_mode="zeros"`, `align_corners=False`), like the CUDA kernel.
    """
    heads = value.shape[2]
    grids, weights = _level_grids(2 * sampling_locations - 1, attention_weights, heads)  # grid_sample's [-1, 1]
    output = None
    for level, value_l in enumerate(_value_levels(value, _shapes_as_list(spatial_shapes))):
        contribution = _weighted_samples(value_l, grids[:, level], weights[:, :, level])
        output = contribution if output is None else output + contribution
    return _heads_last(output, value.shape[0], heads)


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
