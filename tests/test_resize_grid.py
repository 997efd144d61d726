"""ResizeGrid: exact resized values without resizing, and window bounds that really bound them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from omniseg.models.layers.resize_grid import ResizeGrid
from omniseg.models.maskformer.postprocess import resize_mask_logits

CHAINS = [((8, 10), (32, 40), (32, 40), (32, 40)),  # plain 4x upsample
          ((8, 10), (32, 40), (29, 33), (50, 21)),  # upsample, crop, resize (up and down)
          ((8, 10), (8, 10), (8, 10), (3, 4)),  # pure downsample
          ((6, 7), (24, 28), (24, 28), (24, 28))]


@pytest.mark.parametrize("low, padded, image, output", CHAINS)
def test_every_pixel_from_its_window_block_equals_the_resize_chain(low, padded, image, output):
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(3, *low, generator=g)
    grid = ResizeGrid(low, padded, image, output)
    reference = resize_mask_logits(maps, padded, image, output)  # [3, H, W]
    wr, wc = torch.nonzero(grid.nonempty, as_tuple=True)
    assert int(grid.window_pixel_count.sum()) == output[0] * output[1]  # the windows partition the output
    for channel in range(3):
        channels, pixels, valid, values = grid.window_values(maps, torch.full_like(wr, channel), wr, wc)
        assert (channels == channel).all()
        got = torch.full((output[0] * output[1],), float("nan"))
        got[pixels[valid]] = values[valid]
        assert torch.allclose(got.view(output), reference[channel], atol=1e-5)
        # every output pixel lies between its window's bounds
        low_b, high_b = grid.window_min_max(maps)
        assert (grid.to_pixels(low_b)[channel] <= reference[channel] + 1e-5).all()
        assert (grid.to_pixels(high_b)[channel] >= reference[channel] - 1e-5).all()


@pytest.mark.parametrize("low, padded, image, output", CHAINS)
def test_resized_argmax_equals_argmax_of_the_resized_maps(low, padded, image, output):
    g = torch.Generator().manual_seed(1)
    # smooth maps: most windows are decided by their bounds, the rest evaluated exactly
    maps = F.interpolate(torch.randn(1, 6, 3, 3, generator=g), size=low, mode="bilinear")[0] * 3
    grid = ResizeGrid(low, padded, image, output)
    candidates = grid.argmax_candidates(*grid.window_min_max(maps))
    argmax, pixels, winner_maps = grid.resized_argmax(maps, candidates, winner_maps=True)
    reference = grid.resize(maps)
    assert torch.equal(argmax, reference.argmax(0))
    assert torch.equal(grid.resized_argmax(maps, candidates)[0], argmax)
    assert candidates.decided.any() and (~candidates.decided).any()  # both routes were taken
    # the exactly evaluated pixels are those of the undecided windows, and the winner's values there are exact
    assert len(pixels) == int(grid.window_pixel_count[~candidates.decided].sum())
    assert torch.allclose(winner_maps, reference.flatten(1).max(0).values[pixels], atol=1e-5)
    # the channels-last dense route holds the same values
    torch.testing.assert_close(grid.resize(maps, channels_last=True), reference.permute(1, 2, 0))
    # only channels that can win are evaluated: at least one per window, usually far fewer than all
    per_window = torch.bincount(candidates.window, minlength=len(candidates.windows[0]))
    assert per_window.min() >= 1 and len(candidates.channel) < maps.shape[0] * len(per_window)


def test_ties_go_to_the_lowest_channel_like_torch_argmax():
    grid = ResizeGrid((4, 4), (16, 16), (16, 16), (16, 16))
    maps = torch.zeros(3, 4, 4)
    maps[1, :, 2:] = 1.0
    maps[2, :, 2:] = 1.0  # channels 1 and 2 tie on the right half; 0, 1, 2 tie at 0.0 elsewhere
    maps[0, 0, 0] = -0.0
    argmax, _ = grid.resized_argmax(maps, grid.argmax_candidates(*grid.window_min_max(maps)))
    assert torch.equal(argmax, grid.resize(maps).argmax(0))


@pytest.mark.parametrize("channels", [6, 255, 256, 300])  # uint8 counting below 256 channels, indexed max above
def test_argmax_candidates_for_any_channel_count(channels):
    g = torch.Generator().manual_seed(2)
    low, padded = (8, 10), (32, 40)
    maps = F.interpolate(torch.randn(1, channels, 3, 3, generator=g), size=low, mode="bilinear")[0] * 3
    grid = ResizeGrid(low, padded, padded, padded)
    lower, upper = grid.window_min_max(maps)
    candidates = grid.argmax_candidates(lower, upper)
    assert candidates.winner.dtype == torch.int64
    assert (candidates.winner >= 0).all() and (candidates.winner < channels).all()
    # in decided windows the winner is the channel with the best lower bound, beaten by no upper bound
    best = lower.argmax(0)
    decided = candidates.decided & grid.nonempty
    assert torch.equal(candidates.winner[decided], best[decided])
    others = upper.scatter(0, best[None], float("-inf")).amax(0)
    assert torch.equal(decided, (others < lower.amax(0)) & grid.nonempty)
    argmax, _ = grid.resized_argmax(maps, candidates)
    assert torch.equal(argmax, grid.resize(maps).argmax(0))
