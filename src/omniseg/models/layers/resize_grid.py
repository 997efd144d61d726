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
    its taps are i .. i+L-1 (clamped), a superset of each member's support, so window bounds hold.

    Exact values are computed per *group*: up to P output indices of one window (a window with more
    members, e.g. at the border, has several groups), so blocks are not padded to the largest window."""

    taps: int  # L, the widest support
    window: torch.Tensor  # [n_out] window (= first low-resolution index of the support) of each output index
    window_count: torch.Tensor  # [n_low] number of output indices in each window (may be 0)
    window_groups: torch.Tensor  # [n_low] number of groups of each window (0 for an empty window)
    first_group: torch.Tensor  # [n_low] index of each window's first group
    group_window: torch.Tensor  # [G] the window of each group
    group_pixels: torch.Tensor  # [G, P] output indices of each group (padded by repeating a member)
    group_count: torch.Tensor  # [G] number of real members of each group
    group_weights: torch.Tensor  # [G, P, L] their interpolation weights on the window's taps


def resize_chain(maps: torch.Tensor, padded_size: Sequence[int], image_size: Sequence[int],
                 output_size: Sequence[int], channels_last: bool = False) -> torch.Tensor:
    """[N, h, w] -> [N, H, W]: bilinear upsample to the padded input, crop the image, bilinear resize to
    the output (Mask2Former's official order). The one definition of the chain: dense post-processing
    and ResizeGrid's weights both come from it. `channels_last` returns [H, W, N] instead (the same
    values, resized in channels-last memory: faster, and per-pixel reductions over the N maps then read
    contiguous memory)."""
    if maps.shape[0] == 0:  # interpolate rejects N=0
        return maps.new_zeros((*output_size, 0) if channels_last else (0, *output_size))
    x = maps[None]
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if tuple(x.shape[-2:]) != tuple(padded_size):
        x = F.interpolate(x, size=tuple(padded_size), mode="bilinear", align_corners=False)
    x = x[..., : image_size[0], : image_size[1]]
    if tuple(x.shape[-2:]) != tuple(output_size):
        x = F.interpolate(x, size=tuple(output_size), mode="bilinear", align_corners=False)
    return x[0].permute(1, 2, 0) if channels_last else x[0]


def _axis_matrix(low: int, padded: int, image: int, output: int) -> torch.Tensor:
    """[output, low]: row o = weights of the low-resolution samples that make output sample o (the chain
    applied to one delta per channel, along one axis; the other axis has size 1)."""
    deltas = torch.eye(low, dtype=torch.float64)[:, :, None]  # [low, low, 1]
    return resize_chain(deltas, (padded, 1), (image, 1), (output, 1))[:, :, 0].T.contiguous()


def _group_size(count: torch.Tensor, taps: int) -> int:
    """P minimising sum(ceil(count / P) * (P + taps)) over the non-empty windows: padded members plus a
    per-group cost (its taps are gathered and weighted once per group)."""
    count = count[count > 0]
    groups = lambda p: torch.div(count + p - 1, p, rounding_mode="floor")  # noqa: E731
    return min(range(1, int(count.max()) + 1), key=lambda p: (int((groups(p) * (p + taps)).sum()), p))


@lru_cache(maxsize=32)
def _build_axis(low: int, padded: int, image: int, output: int, device: str) -> _Axis:
    """Cached: every image of a size shares it (the tensors are only read)."""
    matrix = _axis_matrix(low, padded, image, output)
    nonzero = matrix != 0
    positions = torch.arange(low).expand_as(matrix)
    lo = torch.where(nonzero, positions, low).min(1).values
    hi = torch.where(nonzero, positions, -1).max(1).values
    taps = int((hi - lo).max()) + 1
    tap_index = lo[:, None] + torch.arange(taps)  # [n_out, L], unclamped
    pixel_weights = torch.where(tap_index < low, matrix.gather(1, tap_index.clamp(max=low - 1)), 0.0)
    count = torch.bincount(lo, minlength=low)
    size = _group_size(count, taps)
    groups = torch.div(count + size - 1, size, rounding_mode="floor")
    first_group = torch.cumsum(groups, 0) - groups
    group_window = torch.repeat_interleave(torch.arange(low), groups)
    rank = torch.arange(len(group_window)) - first_group[group_window]  # group's rank within its window
    group_count = torch.minimum(count[group_window] - rank * size, torch.tensor(size))
    order = torch.argsort(lo, stable=True)  # output indices sorted by window
    starts = (torch.cumsum(count, 0) - count)[group_window] + rank * size  # [G] first member's position
    slot = torch.minimum(torch.arange(size), group_count[:, None] - 1)
    group_pixels = order[starts[:, None] + slot]
    group_weights = pixel_weights[group_pixels]
    f32 = dict(dtype=torch.float32, device=device)
    return _Axis(taps, lo.to(device), count.to(device), groups.to(device),
                 first_group.to(device), group_window.to(device), group_pixels.to(device), group_count.to(device),
                 group_weights.to(**f32))


def _run_reduce(maps: torch.Tensor, dim: int, taps: int, op) -> torch.Tensor:
    """op (torch.minimum / torch.maximum) of maps[i .. i+taps-1] (clamped) along `dim` for every start i:
    the first shift writes a fresh output, later ones update it in place."""
    n = maps.shape[dim]
    if taps < 2 or n < 2:
        return maps.clone()
    out = torch.empty_like(maps)
    op(maps.narrow(dim, 0, n - 1), maps.narrow(dim, 1, n - 1), out=out.narrow(dim, 0, n - 1))
    out.narrow(dim, n - 1, 1).copy_(maps.narrow(dim, n - 1, 1))
    for t in range(2, min(taps, n)):
        tail = out.narrow(dim, 0, n - t)
        op(tail, maps.narrow(dim, t, n - t), out=tail)
    return out


def _channel_keys(values: torch.Tensor, channel: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered like (value, -channel): one max-reduction finds the largest value and, among
    equal values, the lowest channel (torch.argmax's rule). Floats map to order-preserving integers."""
    bits = (values.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into 0.0 (they compare equal)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
    return (ordered << 16) | (_KEY_CHANNELS - 1 - channel).expand_as(values)


_KEY_CHANNELS = 1 << 16  # channels a key can tell apart
_MAX_CHANNELS = (1 << 15) - 1  # channels `argmax_candidates` counts in int16


@dataclass
class ArgmaxCandidates:
    """Which channel can be largest where, from per-window bounds (`ResizeGrid.argmax_candidates`)."""

    winner: torch.Tensor  # [h, w] int64: in decided windows the winning channel, elsewhere some valid channel
    decided: torch.Tensor  # [h, w] windows whose winner beats every other channel's upper bound (or empty)
    windows: tuple[torch.Tensor, torch.Tensor]  # (rows [M], cols [M]) of the undecided windows
    channel: torch.Tensor  # [C] channels that can still win in an undecided window ...
    window: torch.Tensor  # [C] ... and which one (index into `windows`)
    work: int  # output pixels x channels to evaluate exactly


class ResizeGrid:
    """The resize chain low (h, w) -> padded -> crop to image -> output, seen through its windows.

    Windows are indexed like the low-resolution map itself ([..., h, w]); every output pixel belongs to
    exactly one. Exact values are computed a *block* at a time: the [P, P'] output pixels of one group
    of rows by one group of columns of a window, from the window's [L, L'] taps.
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
        self.window_pixel_count = self.rows.window_count[:, None] * self.cols.window_count[None, :]  # [h, w]
        self.nonempty = self.window_pixel_count > 0  # [h, w]: windows that own output pixels

    def selected_work(self, selected: torch.Tensor) -> int:
        """Output pixels x maps to evaluate exactly for the `selected` [N, h, w] windows."""
        return int((selected.sum(0) * self.window_pixel_count).sum())

    def exact_work_exceeds_dense(self, work: int, n_maps: int, fraction: float = 0.04) -> bool:
        """Whether evaluating `work` output pixels x maps exactly costs more than `fraction` of resizing
        all `n_maps` maps densely. Exact evaluation costs about 25x a dense resize per pixel on CPU
        (gathers and scatters), hence 4% by default: trained-model-like masks need ~1%, random-weight
        masks ~12% (break-evens measured with `omniseg bench --no-hf --no-train`)."""
        return work > fraction * n_maps * self.output_size[0] * self.output_size[1]

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

    def blocks(self, wr: torch.Tensor, wc: torch.Tensor, *per_window: torch.Tensor):
        """Windows (wr, wc) [M] -> their blocks (row group [B], column group [B], *per_window tensors
        repeated per block). Empty windows have no block."""
        nr, nc = self.rows.window_groups[wr], self.cols.window_groups[wc]
        gr, gc = self.rows.first_group[wr], self.cols.first_group[wc]
        n = nr * nc
        if bool((n == 1).all()):
            return gr, gc, *per_window
        block = torch.repeat_interleave(n)  # [B] window of each block
        rank = torch.arange(len(block), device=wr.device) - (torch.cumsum(n, 0) - n)[block]
        ncb = nc[block]
        return gr[block] + rank // ncb, gc[block] + rank % ncb, *(t[block] for t in per_window)

    def block_pixels(self, gr: torch.Tensor, gc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat output pixel index [B, P, P'] of blocks (gr, gc), and which entries are real (the others
        repeat a real pixel of the same block, with the same value)."""
        rows, cols = self.rows.group_pixels[gr], self.cols.group_pixels[gc]
        pixel = rows[:, :, None] * self.output_size[1] + cols[:, None, :]
        slots_r = torch.arange(rows.shape[1], device=rows.device)
        slots_c = torch.arange(cols.shape[1], device=cols.device)
        valid = ((slots_r < self.rows.group_count[gr, None])[:, :, None]
                 & (slots_c < self.cols.group_count[gc, None])[:, None, :])
        return pixel, valid

    def _taps(self, maps: torch.Tensor, channel: torch.Tensor, wr: torch.Tensor, wc: torch.Tensor) -> torch.Tensor:
        """maps[channel] on the taps of windows (wr, wc): [M, L, L']."""
        h, w = self.low_size
        rows = (wr[:, None] + torch.arange(self.rows.taps, device=wr.device)).clamp(max=h - 1)  # [M, L]
        cols = (wc[:, None] + torch.arange(self.cols.taps, device=wc.device)).clamp(max=w - 1)
        return maps.reshape(-1)[((channel[:, None] * h + rows)[:, :, None] * w + cols[:, None, :])]

    def block_values(self, maps: torch.Tensor, channel: torch.Tensor, gr: torch.Tensor,
                     gc: torch.Tensor) -> torch.Tensor:
        """Exact resized values of map `channel` [B] on blocks (gr, gc): [B, P, P']."""
        taps = self._taps(maps, channel, self.rows.group_window[gr], self.cols.group_window[gc])  # [B, L, L']
        along_cols = torch.bmm(taps, self.cols.group_weights[gc].transpose(1, 2))  # [B, L, P']
        return torch.bmm(self.rows.group_weights[gr], along_cols)  # [B, P, P']

    def window_values(self, maps: torch.Tensor, channel: torch.Tensor, wr: torch.Tensor, wc: torch.Tensor):
        """Exact values of map channel[i] on all pixels of window (wr[i], wc[i]), block by block:
        (channel [B], flat pixel [B, P, P'], valid [B, P, P'], values [B, P, P'])."""
        gr, gc, channel = self.blocks(wr, wc, channel)
        pixel, valid = self.block_pixels(gr, gc)
        return channel, pixel, valid, self.block_values(maps, channel, gr, gc)

    def edge_blocks(self, maps: torch.Tensor, selected: torch.Tensor):
        """`window_values` of map k on the windows where `selected` [N, h, w] is True (typically where a
        threshold lies between the window's bounds)."""
        k, wr, wc = torch.nonzero(selected, as_tuple=True)
        return self.window_values(maps, k, wr, wc)

    def window_pixels(self, wr: torch.Tensor, wc: torch.Tensor) -> torch.Tensor:
        """Flat output pixels of windows (wr, wc)."""
        pixel, valid = self.block_pixels(*self.blocks(wr, wc))
        return pixel[valid]

    def resize(self, maps: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """The dense route: [N, h, w] -> [N, H, W] through the whole chain ([H, W, N] with
        `channels_last`, for per-pixel reductions over the maps)."""
        return resize_chain(maps, self.padded_size, self.image_size, self.output_size, channels_last)

    def argmax_candidates(self, lower: torch.Tensor, upper: torch.Tensor) -> ArgmaxCandidates:
        """From per-window bounds [N, h, w] of each channel's value: the winner by lower bound, decided
        where its lower bound beats every other channel's upper bound, and in the undecided windows the
        channels whose upper bound reaches the best lower bound -- the only possible winners."""
        n = lower.shape[0]
        if n > _MAX_CHANNELS:
            raise ValueError(f"argmax over {n} channels: at most {_MAX_CHANNELS} supported")
        # The best channel's own upper bound always reaches its lower bound, so the window is decided
        # exactly when no other channel's upper bound does (a tie leaves it undecided). Reductions over the
        # channel axis that return an index (max/argmax) are over 20x slower on a CPU than value-only ones
        # (`python benchmarks/cpu_primitives.py`), so the reaching channels are counted in the narrowest
        # integer type, and in a decided window the only reaching channel -- the winner -- is the sum of
        # index x reach (in the others that sum is clamped to some valid channel).
        small = torch.uint8 if n < 256 else torch.int16
        reach = upper >= lower.amax(0)
        reach_int = reach.view(torch.uint8)
        count = reach_int.sum(0, dtype=small)
        index = torch.arange(n, dtype=small, device=lower.device).view(-1, 1, 1)
        winner = (reach_int * index).sum(0, dtype=small).clamp_(0, n - 1).long()
        decided = (count == 1) | ~self.nonempty
        wr, wc = torch.nonzero(~decided, as_tuple=True)
        channel, window = torch.nonzero(reach[:, wr, wc], as_tuple=True)
        work = int((count[wr, wc].long() * self.window_pixel_count[wr, wc]).sum())
        return ArgmaxCandidates(winner, decided, (wr, wc), channel, window, work)

    def resized_argmax(self, maps: torch.Tensor, candidates: ArgmaxCandidates, value_at=None,
                       winner_maps: bool = False):
        """Per output pixel, the channel whose (monotone-in-the-map) value is largest; ties -> lowest channel.

        `value_at(resized, channel) -> values` turns exact resized map values into values (identity when
        None). Decided windows take their winner; in the others the candidates are evaluated exactly.
        Returns (argmax [H, W], the flat output pixels that were evaluated exactly [M]), and with
        `winner_maps` also the winner's exact resized map value at those pixels [M] (computed anyway)."""
        argmax = self.to_pixels(candidates.winner)
        wr, wc = candidates.windows
        pixels = self.window_pixels(wr, wc)
        if len(wr) == 0:
            return (argmax, pixels, maps.new_empty(0)) if winner_maps else (argmax, pixels)
        gr, gc, channel = self.blocks(wr[candidates.window], wc[candidates.window], candidates.channel)
        pixel, _ = self.block_pixels(gr, gc)  # padded entries repeat a real pixel and its value: harmless
        resized = self.block_values(maps, channel, gr, gc)
        channel = channel[:, None, None]
        values = resized if value_at is None else value_at(resized, channel)
        best = torch.full((self.output_size[0] * self.output_size[1],), torch.iinfo(torch.int64).min,
                          device=maps.device)
        best.scatter_reduce_(0, pixel.flatten(), _channel_keys(values, channel).flatten(), "amax")
        argmax.view(-1)[pixels] = _KEY_CHANNELS - 1 - (best[pixels] & (_KEY_CHANNELS - 1))
        if not winner_maps:
            return argmax, pixels
        # each block entry of the winning channel writes its map value to its pixel (padded entries
        # repeat a real pixel and its value)
        entry_pixel = pixel.flatten()
        won = argmax.view(-1)[entry_pixel] == channel.expand_as(resized).flatten()
        winner_value = torch.empty_like(best, dtype=resized.dtype)
        winner_value[entry_pixel[won]] = resized.flatten()[won]
        return argmax, pixels, winner_value[pixels]
