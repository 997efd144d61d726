"""Decisions on bilinearly resized maps without resizing them.

Post-processing asks questions like "which of N maps is largest at this output pixel?" or "is this
mask logit positive here?" about maps that are bilinearly upsampled from the 1/4-resolution
predictions. Resizing all N maps to full resolution costs N x H x W work. But a resized value is a
convex combination of a few low-resolution values (its *window*), so it lies between the window's
minimum and maximum: wherever those bounds already decide the question -- almost everywhere except
near boundaries -- the answer holds for every output pixel of the window. Only the undecided pixels
are evaluated exactly, from the same interpolation weights.

`ResizeGrid` describes one resize chain (upsample to the padded input, crop the image, resize to the
output size, as :func:`omniseg.models.maskformer.postprocess.resize_mask_logits`). Both axes are
independent linear maps, so the chain is captured by applying it to identity matrices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F


@dataclass
class _Axis:
    """One axis of the resize chain. Window i = the output indices whose support starts at low index i;
    its taps are i .. i+L-1 (clamped), a superset of each member's support, so window bounds hold."""

    taps: int  # L, the widest support
    window: torch.Tensor  # [n_out] window (= first low-resolution index of the support) of each output index
    window_pixels: torch.Tensor  # [n_low, P] output indices in each window (padded; see window_count)
    window_weights: torch.Tensor  # [n_low, P, L] their interpolation weights on the window's taps
    window_count: torch.Tensor  # [n_low] number of output indices in each window (may be 0)


def resize_chain(maps: torch.Tensor, padded_size: Sequence[int], image_size: Sequence[int],
                 output_size: Sequence[int]) -> torch.Tensor:
    """[N, h, w] -> [N, H, W]: bilinear upsample to the padded input, crop the image, bilinear resize to
    the output (Mask2Former's official order). The one definition of the chain: dense post-processing
    and ResizeGrid's weights both come from it."""
    if maps.shape[0] == 0:  # interpolate rejects N=0
        return maps.new_zeros((0, *output_size))
    x = maps[None]
    if tuple(x.shape[-2:]) != tuple(padded_size):
        x = F.interpolate(x, size=tuple(padded_size), mode="bilinear", align_corners=False)
    x = x[..., : image_size[0], : image_size[1]]
    if tuple(x.shape[-2:]) != tuple(output_size):
        x = F.interpolate(x, size=tuple(output_size), mode="bilinear", align_corners=False)
    return x[0]


def _axis_matrix(low: int, padded: int, image: int, output: int) -> torch.Tensor:
    """[output, low]: row o = weights of the low-resolution samples that make output sample o (the chain
    applied to one delta per channel, along one axis; the other axis has size 1)."""
    deltas = torch.eye(low, dtype=torch.float64)[:, :, None]  # [low, low, 1]
    return resize_chain(deltas, (padded, 1), (image, 1), (output, 1))[:, :, 0].T.contiguous()


@lru_cache(maxsize=32)
def _build_axis(low: int, padded: int, image: int, output: int, device: str) -> _Axis:
    """Cached: every image of a size shares it (the tensors are only read)."""
    matrix = _axis_matrix(low, padded, image, output)
    nonzero = matrix != 0
    positions = torch.arange(low).expand_as(matrix)
    lo = torch.where(nonzero, positions, low).min(1).values
    hi = torch.where(nonzero, positions, -1).max(1).values
    taps = int((hi - lo).max()) + 1
    count = torch.bincount(lo, minlength=low)
    order = torch.argsort(lo, stable=True)
    starts = torch.cumsum(count, 0) - count
    slots = torch.arange(max(int(count.max()), 1))
    pixels = order[(starts[:, None] + torch.minimum(slots, (count[:, None] - 1).clamp(min=0))).clamp(max=output - 1)]
    tap_index = torch.arange(low)[:, None] + torch.arange(taps)  # [n_low, L], unclamped
    weights = matrix[pixels[:, :, None], tap_index.clamp(max=low - 1)[:, None, :]]
    weights = torch.where((tap_index < low)[:, None, :], weights, 0.0)  # clamped taps repeat a row: weigh 0
    return _Axis(taps, lo.to(device), pixels.to(device), weights.float().to(device), count.to(device))


def _run_reduce(maps: torch.Tensor, dim: int, taps: int, op) -> torch.Tensor:
    """op (torch.minimum / torch.maximum) of maps[i .. i+taps-1] (clamped) along `dim` for every start i:
    one fresh output, then in-place shifted slices."""
    n = maps.shape[dim]
    if taps < 2 or n < 2:
        return maps.clone()
    out = maps.clone()
    for t in range(1, min(taps, n)):
        tail = out.narrow(dim, 0, n - t)
        op(tail, maps.narrow(dim, t, n - t), out=tail)
    return out


class ResizeGrid:
    """The resize chain low (h, w) -> padded -> crop to image -> output, seen through its windows.

    Windows are indexed like the low-resolution map itself ([..., h, w]); every output pixel belongs to
    exactly one. Exact values are computed a window *block* at a time: the [P, P'] output pixels of one
    window from its [L, L] taps.
    """

    def __init__(self, low_size: Sequence[int], padded_size: Sequence[int], image_size: Sequence[int],
                 output_size: Sequence[int], device: torch.device | str = "cpu"):
        self.low_size = (int(low_size[0]), int(low_size[1]))
        self.output_size = (int(output_size[0]), int(output_size[1]))
        device = str(torch.device(device))
        self.padded_size = (int(padded_size[0]), int(padded_size[1]))
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.rows = _build_axis(self.low_size[0], int(padded_size[0]), int(image_size[0]), self.output_size[0], device)
        self.cols = _build_axis(self.low_size[1], int(padded_size[1]), int(image_size[1]), self.output_size[1], device)
        self.nonempty = self.window_pixel_count > 0  # [h, w]: windows that own output pixels (select only these)

    @property
    def window_pixel_count(self) -> torch.Tensor:
        """[n_win_rows, n_win_cols] number of output pixels in each window."""
        return self.rows.window_count[:, None] * self.cols.window_count[None, :]

    def exact_work_exceeds_dense(self, selected: torch.Tensor, fraction: float = 0.04) -> bool:
        """Whether evaluating the output pixels of the `selected` [N, h, w] windows exactly costs more than
        `fraction` of resizing all N maps densely. Exact evaluation costs about 25x a dense resize per
        pixel on CPU (gathers and scatters), hence 4% by default: trained-model-like masks need ~1%,
        random-weight masks ~12% (break-evens measured with `omniseg bench --no-hf --no-train`)."""
        pixels = (selected & self.nonempty).flatten(1).float() @ self.window_pixel_count.flatten().float()
        dense = selected.shape[0] * self.output_size[0] * self.output_size[1]
        return bool(pixels.sum() > fraction * dense)

    def window_min_max(self, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """maps [N, h, w] -> (min, max) over each window's taps, [N, h, w]."""
        rows, cols = self.rows.taps, self.cols.taps
        low = _run_reduce(_run_reduce(maps, 1, rows, torch.minimum), 2, cols, torch.minimum)
        high = _run_reduce(_run_reduce(maps, 1, rows, torch.maximum), 2, cols, torch.maximum)
        return low, high

    def to_pixels(self, window_map: torch.Tensor) -> torch.Tensor:
        """[..., h, w] -> [..., H, W]: every output pixel takes its window's value. Both expansions run
        as row gathers (a column gather on CPU is several times slower)."""
        cols = window_map.transpose(-1, -2).index_select(-2, self.cols.window)  # [..., W, w]
        return cols.transpose(-1, -2).contiguous().index_select(-2, self.rows.window)

    def block_pixels(self, wr: torch.Tensor, wc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat output pixel index [M, P, P'] of the blocks of non-empty windows (wr, wc), and which
        entries are real (the others repeat a real pixel of the same block, with the same value)."""
        rows, cols = self.rows.window_pixels[wr], self.cols.window_pixels[wc]
        pixel = rows[:, :, None] * self.output_size[1] + cols[:, None, :]
        slots_r = torch.arange(rows.shape[1], device=rows.device)
        slots_c = torch.arange(cols.shape[1], device=cols.device)
        valid = ((slots_r < self.rows.window_count[wr, None])[:, :, None]
                 & (slots_c < self.cols.window_count[wc, None])[:, None, :])
        return pixel, valid

    def block_values(self, maps: torch.Tensor, channel: torch.Tensor, wr: torch.Tensor,
                     wc: torch.Tensor) -> torch.Tensor:
        """Exact resized values of map `channel` [M] on the blocks of windows (wr, wc): [M, P, P']."""
        h, w = self.low_size
        rows = (wr[:, None] + torch.arange(self.rows.taps, device=wr.device)).clamp(max=h - 1)  # [M, L]
        cols = (wc[:, None] + torch.arange(self.cols.taps, device=wc.device)).clamp(max=w - 1)
        taps = maps.reshape(-1)[((channel[:, None] * h + rows)[:, :, None] * w + cols[:, None, :])]  # [M, L, L]
        along_cols = (taps[:, :, None, :] * self.cols.window_weights[wc][:, None, :, :]).sum(-1)  # [M, L, P']
        return (self.rows.window_weights[wr][:, :, :, None] * along_cols[:, None, :, :]).sum(2)  # [M, P, P']

    def edge_blocks(self, maps: torch.Tensor, selected: torch.Tensor):
        """Exact values of map k on the blocks of the windows where `selected` [N, h, w] is True (typically
        where a threshold lies between the window's bounds): (k [M], flat pixel [M, P, P'], valid
        [M, P, P'], values [M, P, P'])."""
        k, wr, wc = torch.nonzero(selected & self.nonempty, as_tuple=True)
        pixel, valid = self.block_pixels(wr, wc)
        return k, pixel, valid, self.block_values(maps, k, wr, wc)

    def resize(self, maps: torch.Tensor) -> torch.Tensor:
        """The dense route: [N, h, w] -> [N, H, W] through the whole chain."""
        return resize_chain(maps, self.padded_size, self.image_size, self.output_size)

    def argmax_candidates(self, lower: torch.Tensor, upper: torch.Tensor):
        """From per-window bounds [N, h, w] of each channel's value: (winner [h, w] by lower bound, decided
        [h, w]: its lower bound beats every other channel's upper bound, candidates [N, h, w]: in undecided
        windows, the channels whose upper bound reaches the best lower bound -- the only possible winners)."""
        best_lower, winner = lower.max(0)
        # The winner's own upper bound always reaches its lower bound, so the window is decided exactly
        # when no other channel's upper bound does (a tie leaves it undecided).
        reach = upper >= best_lower
        decided = (reach.sum(0, dtype=torch.int32) == 1) | ~self.nonempty
        return winner, decided, reach & ~decided

    def resized_argmax(self, maps: torch.Tensor, winner: torch.Tensor, decided: torch.Tensor,
                       candidates: torch.Tensor, value_at=None):
        """Per output pixel, the channel whose (monotone-in-the-map) value is largest; ties -> lowest channel.

        Takes `argmax_candidates`' answer; `value_at(resized, channel) -> values` turns exact resized map
        values into values (identity when None). Decided windows take their winner; in the others the
        candidates are evaluated exactly. Returns (argmax [H, W], (flat pixels evaluated exactly [M], the
        winner's resized map value there [M])).
        """
        argmax = self.to_pixels(winner)
        wr, wc = torch.nonzero(~decided, as_tuple=True)
        pixels, valid = self.block_pixels(wr, wc)
        pixels = pixels[valid]
        if len(wr) == 0:
            return argmax, (pixels, maps.new_zeros(0))
        channel, pixel, _, resized = self.edge_blocks(maps, candidates)
        pixel, resized = pixel.flatten(1), resized.flatten(1)  # [C, P*P']
        values = resized if value_at is None else value_at(resized, channel[:, None])
        channel = channel[:, None].expand_as(pixel)
        size = self.output_size[0] * self.output_size[1]
        best = torch.full((size,), -torch.inf, device=maps.device).scatter_reduce(0, pixel.flatten(), values.flatten(), "amax")
        at_best = values == best[pixel]
        first = torch.full((size,), maps.shape[0], dtype=torch.int64, device=maps.device)
        first = first.scatter_reduce(0, pixel[at_best], channel[at_best], "amin")
        argmax.view(-1)[pixels] = first[pixels]
        won = channel == first[pixel]
        winner_value = torch.zeros(size, device=maps.device)
        winner_value[pixel[won]] = resized[won]
        return argmax, (pixels, winner_value[pixels])
