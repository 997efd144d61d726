"""Swin's window attention (original pad-then-shift order) as omniseg computes it: q/k/v on real tokens,
gathers instead of pad/roll/partition, cached bias. Checked against the plain sequence of those steps
through timm's own WindowAttention."""

import pytest
import torch
from timm.models.swin_transformer import window_partition, window_reverse
from torch.nn import functional as F

from omniseg.models.backbones import OriginalWindowSwinBlock, build_backbone


def _plain_attn(block, x):
    """pad -> roll -> partition -> timm WindowAttention -> reverse -> roll back -> crop."""
    b, h, w, c = x.shape
    win_h, win_w = block.window_size
    x = F.pad(x, (0, 0, 0, (win_w - w % win_w) % win_w, 0, (win_h - h % win_h) % win_h))
    _, hp, wp, _ = x.shape
    shifted = any(block.shift_size)
    if shifted:
        x = torch.roll(x, shifts=(-block.shift_size[0], -block.shift_size[1]), dims=(1, 2))
    windows = block.attn(window_partition(x, block.window_size).view(-1, block.window_area, c),
                         mask=block.get_attn_mask(x) if shifted else None)
    x = window_reverse(windows.view(-1, win_h, win_w, c), block.window_size, hp, wp)
    if shifted:
        x = torch.roll(x, shifts=block.shift_size, dims=(1, 2))
    return x[:, :h, :w, :].contiguous()


@pytest.fixture
def swin():
    torch.manual_seed(0)
    backbone = build_backbone("swin_t", out_norms=False)
    with torch.no_grad():
        for p in backbone.parameters():  # non-zero biases everywhere (timm zero-inits many)
            p.normal_(0, 0.05)
    return backbone


def _both(backbone, run):
    """run() with omniseg's window attention, then with the plain order."""
    fast = run()
    original = OriginalWindowSwinBlock.__dict__["_attn"]
    try:
        OriginalWindowSwinBlock._attn = _plain_attn
        plain = run()
    finally:
        OriginalWindowSwinBlock._attn = original
    return fast, plain


@pytest.mark.parametrize("size", [(96, 64), (80, 112)])  # stage sizes not multiples of the window: padding
def test_inference_matches_the_plain_order(swin, size):
    swin.eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        fast, plain = _both(swin, lambda: swin(x))
    for name in fast:
        torch.testing.assert_close(fast[name], plain[name], atol=2e-6, rtol=1e-5)


def test_training_gradients_match_the_plain_order(swin):
    swin.train()
    x = torch.randn(1, 3, 80, 112)

    def loss_and_grads():
        swin.zero_grad()
        torch.manual_seed(1)  # the same stochastic-depth draws on both sides
        loss = sum(f.square().mean() for f in swin(x).values())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in swin.named_parameters()}

    (loss, grads), (plain_loss, plain_grads) = _both(swin, loss_and_grads)
    torch.testing.assert_close(loss, plain_loss)
    assert grads.keys() == plain_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], atol=1e-6, rtol=1e-4)


def test_cached_bias_follows_new_weights(swin):
    """The bias is cached per input size at inference; loading other weights afterwards must not reuse it."""
    swin.eval()
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        swin(x)
        other = build_backbone("swin_t", out_norms=False)
        for p in other.parameters():
            p.data.normal_(0, 0.05)
        swin.load_state_dict(other.state_dict())
        fast, plain = _both(swin, lambda: swin(x))
    for name in fast:
        torch.testing.assert_close(fast[name], plain[name], atol=2e-6, rtol=1e-5)
