"""Canny edges in PyTorch: hand-derived geometry, thresholds, hysteresis, channel rule, cv2 parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from omniseg.models.layers.canny import canny


def _grey(a: torch.Tensor) -> torch.Tensor:
    """[H,W] -> [1,1,H,W] uint8."""
    return a.to(torch.uint8)[None, None]


def _edges(images: torch.Tensor, *args, **kwargs) -> np.ndarray:
    return canny(images, *args, **kwargs)[0, 0].numpy().astype(bool)


def _step(h: int, w: int, col: int, value: int) -> torch.Tensor:
    """Dark left half, ``value`` from column ``col`` on."""
    a = torch.zeros(h, w)
    a[:, col:] = value
    return a


# Square occupying rows R0..R1 and columns C0..C1 (inclusive) of a 32x32 image.
R0, R1, C0, C1 = 10, 21, 8, 23


def _square() -> torch.Tensor:
    a = torch.zeros(32, 32)
    a[R0:R1 + 1, C0:C1 + 1] = 200
    return _grey(a)


def test_square_straight_sides_exact():
    # Across a side the two pixels next to the step have equal magnitude 4*200; suppression keeps the
    # one whose left/upper neighbour is smaller (">" before, ">=" after): the outside pixel on the
    # top and left sides, the inside pixel on the bottom and right sides.
    e = _edges(_square())
    for j in range(C0 + 1, C1):
        assert np.flatnonzero(e[:, j]).tolist() == [R0 - 1, R1], j
    for i in range(R0 + 1, R1):
        assert np.flatnonzero(e[i, :]).tolist() == [C0 - 1, C1], i
    # Nothing outside the box spanned by those sides.
    box = np.zeros_like(e)
    box[R0 - 1:R1 + 1, C0 - 1:C1 + 1] = True
    assert not e[~box].any()
    # Bottom-left corner pixel (R1, C0) closes the bottom side and left side diagonally.
    assert e[R1, C0] and not e[R1, C0 - 1]


def test_square_contour_is_closed_and_thin():
    e = _edges(_square())
    # One 8-connected contour ...
    _, n_contours = ndimage.label(e, structure=np.ones((3, 3)))
    assert n_contours == 1
    # ... that separates the inside from the outside for 4-connected background paths ...
    background, _ = ndimage.label(~e)
    centre = background[(R0 + R1) // 2, (C0 + C1) // 2]
    assert centre != 0 and centre != background[0, 0]
    # Inside: rows R0..R1-1 x columns C0..C1-1 (the bottom and right sides sit on the square), less
    # the corner pixel (R0, C0), which is on the contour.
    assert (background == centre).sum() == (R1 - R0) * (C1 - C0) - 1
    # ... and is one pixel thick: no 2x2 block is entirely edge.
    blocks = e[:-1, :-1] & e[1:, :-1] & e[:-1, 1:] & e[1:, 1:]
    assert not blocks.any()


def test_border_pixels_can_be_edges_like_opencv():
    # OpenCV only pads its edge map outside the image: a step crossing the image is marked on
    # its first and last rows too.
    e = _edges(_grey(_step(24, 24, 12, 200)))
    assert np.flatnonzero(e.any(0)).tolist() == [11]
    assert e[:, 11].all()
    e = _edges(_grey(_step(24, 24, 1, 200)))
    assert e[:, 0].all() and e.sum() == 24


def test_constant_images_have_no_edges():
    for value in (0, 77, 255):
        out = canny(torch.full((2, 3, 40, 40), value, dtype=torch.uint8))
        assert out.sum().item() == 0


def test_thresholds_are_strict():
    # A step of v gives |dx| = 4v on the two columns beside it.
    assert not _edges(_grey(_step(32, 32, 16, 2))).any()       # 8 <= low
    assert not _edges(_grey(_step(32, 32, 16, 3))).any()       # 12: weak only, no strong anywhere
    assert not _edges(_grey(_step(32, 32, 16, 25))).any()      # 100 is not > high
    assert _edges(_grey(_step(32, 32, 16, 26)))[:, 15].all()   # 104 > high
    assert _edges(_grey(_step(32, 32, 16, 3)), 10, 11)[:, 15].all()   # 12 > 11 is strong
    assert not _edges(_grey(_step(32, 32, 16, 3)), 12, 13).any()       # 12 is not > 12


def test_weak_step_isolated_from_strong_edge_is_dropped():
    a = torch.zeros(48, 48)
    a[:, 32:] = 20                  # weak vertical step, magnitude 80
    a[4:12, 4:12] = 200             # strong square far away
    e = _edges(_grey(a))
    assert not e[:, 20:].any()
    assert e[:, :20].sum() > 0


def test_weak_step_touching_strong_edge_is_kept():
    a = torch.zeros(48, 48)
    a[:, 24:] = 20                  # weak step (magnitude 80) in rows 24.. ...
    a[:24, 24:] = 150               # ... below a strong one (600) in rows ..23
    e = _edges(_grey(a))
    # Strong upper part at column 23, weak lower part at column 23 from row 25 on, linked through
    # the strong corner pixel (24, 24) (|dx| + |dy| = 210 + 390).
    assert e[:23, 23].all() and e[24, 24] and e[25:, 23].all()
    assert not e[25:, :23].any() and not e[25:, 24:].any()
    only_strong = _edges(_grey(a), max_iterations=0)
    assert only_strong[24, 24] and not only_strong[25:].any()
    # Each growth step reaches one more pixel down the weak chain.
    bounded = _edges(_grey(a), max_iterations=5)
    assert bounded[25:30, 23].all() and not bounded[30:].any()
    assert np.array_equal(_edges(_grey(a), max_iterations=100), e)


def test_uint8_and_float_agree_and_batch_matches_single():
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(2, 3, 40, 56, generator=g) * 255
    images = F.avg_pool2d(noise, 5, stride=1, padding=2, count_include_pad=False).round().to(torch.uint8)
    out = canny(images)
    assert out.dtype == torch.float32 and out.shape == (2, 1, 40, 56)
    assert set(out.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(out, canny(images.float()))
    for i in range(2):
        assert torch.equal(out[i:i + 1], canny(images[i:i + 1]))
    assert torch.equal(canny(images, 100, 10), out)  # thresholds are swapped like OpenCV


def test_output_has_no_grad():
    x = (torch.rand(1, 3, 32, 32) * 255).requires_grad_()
    out = canny(x)
    assert not out.requires_grad


def test_blue_only_edge_is_found():
    # Grey conversion would weaken this step to 0.114 * 200 ~ 23 (magnitude ~91 < high) and lose it.
    rgb = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    rgb[:, 2, :, 16:] = 200
    e = _edges(rgb)
    assert e[:, 15].all() and e.sum() == 32


def test_channel_gradients_are_not_averaged():
    # Red steps up where green steps down: R + G is constant, so summed or averaged channel
    # gradients would cancel; the strongest single channel still sees the step.
    rgb = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    rgb[:, 0, :, 16:] = 200
    rgb[:, 1, :, :16] = 200
    e = _edges(rgb)
    assert e[:, 15].all() and e.sum() == 32


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        canny(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError):
        canny(torch.zeros(1, 1, 16, 16), max_iterations=-1)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = int(3 * sigma + 0.5)
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-t * t / (2 * sigma * sigma))
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _parity_images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    out = []
    for sigma in (1.0, 1.5, 2.5):
        noise = torch.rand(1, 3, 64, 96, generator=g) * 255
        out.append(_gaussian_blur(noise, sigma).clamp(0, 255).round().to(torch.uint8))
    yy, xx = torch.meshgrid(torch.arange(72.0), torch.arange(80.0), indexing="ij")
    for k in range(2):
        img = torch.full((1, 3, 72, 80), 40.0)
        disc = (yy - 30 - 4 * k) ** 2 + (xx - 28 - 3 * k) ** 2 < (14 + k) ** 2
        rect = (yy > 40) & (yy < 66) & (xx > 44 - 5 * k) & (xx < 75)
        band = ((yy - 0.6 * xx - 10 * k).abs() < 2)
        for mask, colour in ((disc, (200, 80, 30)), (rect, (20, 180, 220)), (band, (250, 250, 250))):
            img[0, :, mask] = torch.tensor(colour, dtype=torch.float32)[:, None]
        out.append(_gaussian_blur(img, 0.8).round().to(torch.uint8))
    noise = (torch.rand(1, 1, 48, 48, generator=g) * 255).to(torch.uint8)
    out.append(noise)
    return out


@pytest.mark.parametrize("low,high,l2", [(10, 100, False), (30, 60, False), (10, 100, True)])
def test_matches_cv2(low, high, l2):
    cv2 = pytest.importorskip("cv2", reason="OpenCV not installed; parity with cv2.Canny not checked")
    for img in _parity_images():
        hwc = np.ascontiguousarray(img[0].permute(1, 2, 0).numpy())
        if hwc.shape[2] == 1:
            hwc = hwc[..., 0]
        ref = cv2.Canny(hwc, low, high, L2gradient=l2) > 0
        ours = _edges(img, low, high, l2_gradient=l2)
        assert ref.any()
        assert (ours == ref).mean() >= 0.99
