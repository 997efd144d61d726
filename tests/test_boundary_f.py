"""Boundary F-score (Gated-SCNN / DAVIS definition): hand-computed cases and a brute-force reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from omniseg.data.meta import DatasetMeta
from omniseg.evaluation import DatasetEvaluator
from omniseg.evaluation.boundary import (
    BoundaryFScoreEvaluator,
    boundary_f_score,
    boundary_map,
    threshold_to_radius,
)

IGNORE = 255


def square(size, rows, cols, height=None) -> torch.Tensor:
    mask = torch.zeros(height or size, size, dtype=torch.bool)
    mask[rows[0]:rows[1] + 1, cols[0]:cols[1] + 1] = True
    return mask


# ============================================================================ boundary map
def test_boundary_map_is_the_ring_on_the_top_left_side_of_the_edge():
    # seg2bmap marks pixels differing from their right / bottom / bottom-right neighbour, so the
    # 3x3 square at rows/cols 2..4 gives the outline of rows/cols 1..4 (12 px), background included.
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[1, 1:5] = expected[4, 1:5] = expected[1:5, 1] = expected[1:5, 4] = True
    assert torch.equal(boundary_map(square(8, (2, 4), (2, 4))), expected)
    # The image border is no boundary: a full (or empty) mask has none; batch dims are kept.
    masks = torch.stack([torch.ones(5, 6, dtype=torch.bool), torch.zeros(5, 6, dtype=torch.bool)])
    assert boundary_map(masks).shape == (2, 5, 6) and not boundary_map(masks).any()


# ============================================================================ one binary pair
def test_identical_masks_score_one():
    mask = square(10, (1, 6), (3, 8))
    assert boundary_f_score(mask, mask, 0) == (1.0, 1.0, 1.0)


def test_square_shifted_by_one_pixel_radius_zero_and_one():
    gt = square(8, (2, 4), (2, 4))
    pred = square(8, (2, 4), (3, 5))
    # gt boundary: outline of rows 1..4 x cols 1..4; pred: outline of rows 1..4 x cols 2..5 (12 px each).
    # Radius 0: only rows 1 and 4, cols 2..4 coincide -> 6 of 12 -> P = R = F = 0.5.
    assert boundary_f_score(pred, gt, 0) == pytest.approx((0.5, 0.5, 0.5))
    # Radius 1: every pred pixel has a gt pixel one step left (and every gt pixel one step right).
    assert boundary_f_score(pred, gt, 1) == pytest.approx((1.0, 1.0, 1.0))


def test_square_shifted_by_two_pixels_radius_one():
    gt = square(10, (2, 4), (2, 4))
    pred = square(10, (2, 4), (4, 6))
    # pred outline rows 1..4 x cols 3..6 vs gt outline rows 1..4 x cols 1..4, disk of radius 1
    # (no diagonals). Matched pred pixels: rows 1 and 4 at cols 3, 4 (exact) and 5 (gt one step
    # left) = 6, rows 2 and 3 at col 3 (gt col 4 one step right) = 2; col 6 is 2 px away. 8 / 12.
    # The layout is mirror-symmetric, so recall is 8 / 12 too.
    assert boundary_f_score(pred, gt, 1) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert boundary_f_score(pred, gt, 2) == pytest.approx((1.0, 1.0, 1.0))


def test_spurious_blob_lowers_precision_only():
    gt = square(12, (2, 4), (2, 4))
    pred = gt | square(12, (8, 9), (8, 9))
    # pred boundary: the 12-px ring of the square + the 8-px ring (rows/cols 7..9) of the blob.
    # P = 12 / 20, R = 1, F = 2 * 0.6 / 1.6 = 0.75 (the blob is > 1 px from any gt boundary).
    assert boundary_f_score(pred, gt, 1) == pytest.approx((0.6, 1.0, 0.75))


def test_empty_boundaries_follow_the_gscnn_convention():
    empty = torch.zeros(8, 8, dtype=torch.bool)
    full = torch.ones(8, 8, dtype=torch.bool)
    mask = square(8, (2, 4), (2, 4))
    assert boundary_f_score(empty, mask, 2) == (1.0, 0.0, 0.0)  # nothing predicted: P = 1, R = 0
    assert boundary_f_score(mask, empty, 2) == (0.0, 1.0, 0.0)  # nothing to find: P = 0, R = 1
    assert boundary_f_score(empty, empty, 2) == (1.0, 1.0, 1.0)
    assert boundary_f_score(full, empty, 2) == (1.0, 1.0, 1.0)  # a full mask has no boundary either


def test_ignore_clears_both_masks_before_taking_boundaries():
    gt = square(12, (2, 4), (2, 4))
    pred = gt | square(12, (8, 9), (8, 9))
    ignore = square(12, (7, 10), (7, 10))
    assert boundary_f_score(pred, gt, 1, ignore=ignore) == (1.0, 1.0, 1.0)  # blob (0.75 above) ignored
    # GSCNN zeroes the *masks*: the edge along an ignored region is a boundary in both maps and
    # matches. Here gt = left half, pred = whole image, right half ignored -> identical masks.
    # (Clearing the boundary maps instead would leave gt's column-5 edge unmatched: F = 0.)
    left = torch.zeros(6, 12, dtype=torch.bool)
    left[:, :6] = True
    right = ~left
    assert boundary_f_score(torch.ones(6, 12, dtype=torch.bool), left, 0) == (1.0, 0.0, 0.0)
    assert boundary_f_score(torch.ones(6, 12, dtype=torch.bool), left, 0, ignore=right) == (1.0, 1.0, 1.0)


def _reference(pred, gt, radius, ignore):
    """Dense DAVIS formulation: boundary maps, dilation by a conv with a disk kernel, count matches."""
    pred, gt = pred & ~ignore, gt & ~ignore
    pred_edge, gt_edge = boundary_map(pred), boundary_map(gt)
    offsets = torch.arange(-radius, radius + 1) ** 2
    disk = ((offsets[:, None] + offsets[None, :]) <= radius * radius).float()[None, None]

    def dilate(x):
        return F.conv2d(x.float()[None, None], disk, padding=radius)[0, 0] > 0

    n_pred, n_gt = int(pred_edge.sum()), int(gt_edge.sum())
    if n_pred == 0 and n_gt == 0:
        return 1.0, 1.0, 1.0
    if n_pred == 0:
        return 1.0, 0.0, 0.0
    if n_gt == 0:
        return 0.0, 1.0, 0.0
    p = float((pred_edge & dilate(gt_edge)).sum()) / n_pred
    r = float((gt_edge & dilate(pred_edge)).sum()) / n_gt
    return p, r, 2 * p * r / (p + r) if p + r > 0 else 0.0


def test_matches_dense_disk_dilation_reference_on_random_masks():
    generator = torch.Generator().manual_seed(0)
    for trial in range(60):
        h, w = (int(v) for v in torch.randint(1, 30, (2,), generator=generator))
        density = torch.rand(2, generator=generator)
        pred = torch.rand(h, w, generator=generator) < density[0]
        gt = torch.rand(h, w, generator=generator) < density[1]
        ignore = torch.rand(h, w, generator=generator) < 0.1
        radius = trial % 7
        assert boundary_f_score(pred, gt, radius, ignore) == pytest.approx(_reference(pred, gt, radius, ignore))


# ============================================================================ thresholds
def test_thresholds_convert_to_pixel_radii_from_the_diagonal():
    # 2048x1024: diagonal 2289.7 -> 1.14, 4.29, 8.59, 11.45 px -> ceil 2, 5, 9, 12 (the GSCNN table).
    assert [threshold_to_radius(t, 1024, 2048) for t in (0.0005, 0.001875, 0.00375, 0.005)] == [2, 5, 9, 12]
    # 360x480 (CamVid): diagonal exactly 600 -> 0.3, 1.125, 2.25, 3.0 px -> 1, 2, 3, 3.
    assert BoundaryFScoreEvaluator(11).radii(360, 480) == [1, 2, 3, 3]
    evaluator = BoundaryFScoreEvaluator(11, radii_px=(3, 0))
    assert evaluator.radii(360, 480) == [3, 0] and evaluator.keys == ["BF@3px", "BF@0px"]
    assert BoundaryFScoreEvaluator(11).keys == ["BF@0.0005", "BF@0.001875", "BF@0.00375", "BF@0.005"]
    with pytest.raises(ValueError, match="radii_px"):
        BoundaryFScoreEvaluator(3, thresholds=(3,))


# ============================================================================ evaluator
def three_class_image():
    """16x16: class 1 predicted exactly, class 2 shifted right by 2 px, class 0 = background."""
    gt = torch.zeros(16, 16, dtype=torch.int64)
    gt[2:5, 2:5] = 1
    gt[8:11, 8:11] = 2
    pred = torch.zeros_like(gt)
    pred[2:5, 2:5] = 1
    pred[8:11, 10:13] = 2
    return gt, pred


# Per class F at radius 0 / 1 for `three_class_image` (same rings as the pair tests above):
#   class 1: 1 / 1; class 2 (shift 2): 4/12 exact matches -> 1/3, radius 1 -> 8/12 = 2/3;
#   class 0: its boundary is both rings (24 px): (12 + 4) / 24 = 2/3, radius 1 (12 + 8) / 24 = 5/6.
F_IMAGE = {0: {"0": 2 / 3, "1": 1.0, "2": 1 / 3}, 1: {"0": 5 / 6, "1": 1.0, "2": 2 / 3}}


def test_per_class_scores_and_mean_over_classes():
    evaluator = BoundaryFScoreEvaluator(3, radii_px=(0, 1))
    evaluator.process(*three_class_image())
    results = evaluator.evaluate()
    for radius, key in ((0, "BF@0px"), (1, "BF@1px")):
        expected = F_IMAGE[radius]
        assert results["BF_per_class"][key] == pytest.approx({c: v * 100 for c, v in expected.items()})
        assert results[key] == pytest.approx(sum(expected.values()) / 3 * 100)
    assert results["BF@0px"] == pytest.approx(200 / 3) and results["BF@1px"] == pytest.approx(250 / 3)


def test_images_without_a_class_count_as_one_unless_skip_absent():
    gt, pred = three_class_image()
    blank = torch.zeros(16, 16, dtype=torch.int64)  # no boundary of any class: F = 1 for all
    official = BoundaryFScoreEvaluator(3, radii_px=(0, 1))
    skipping = BoundaryFScoreEvaluator(3, radii_px=(0, 1), skip_absent=True)
    for evaluator in (official, skipping):
        evaluator.process(gt, pred)
        evaluator.process(blank, blank)
    # GSCNN: per class mean over both images -> radius 0: (2/3+1)/2, 1, (1/3+1)/2 -> mean 5/6;
    # radius 1: 11/12, 1, 5/6 -> mean 11/12.
    got = official.evaluate()
    assert got["BF_per_class"]["BF@0px"] == pytest.approx({"0": 500 / 6, "1": 100.0, "2": 200 / 3})
    assert got["BF@0px"] == pytest.approx(500 / 6) and got["BF@1px"] == pytest.approx(1100 / 12)
    # skip_absent: the blank image is left out for every class -> the one-image values.
    got = skipping.evaluate()
    assert got["BF@0px"] == pytest.approx(200 / 3) and got["BF@1px"] == pytest.approx(250 / 3)
    # A class never seen is left out of the mean with skip_absent (NaN), counted as 1 otherwise.
    lonely = BoundaryFScoreEvaluator(4, radii_px=(0,), skip_absent=True)
    lonely.process(gt, pred)
    assert math.isnan(lonely.evaluate()["BF_per_class"]["BF@0px"]["3"])
    assert lonely.evaluate()["BF@0px"] == pytest.approx(200 / 3)
    assert math.isnan(BoundaryFScoreEvaluator(2).evaluate()["BF@0.0005"])  # nothing processed


def test_class_predicted_where_ground_truth_has_none_scores_zero():
    gt = torch.zeros(16, 16, dtype=torch.int64)
    pred = gt.clone()
    pred[2:5, 2:5] = 1
    evaluator = BoundaryFScoreEvaluator(3, radii_px=(2,))
    evaluator.process(gt, pred)
    evaluator.process(gt, gt)
    # Image 1: classes 0 and 1 have a predicted boundary and no gt one (P = 0, R = 1, F = 0), class
    # 2 none anywhere (F = 1); image 2 is perfect. Per class over both images: 0.5, 0.5, 1.
    results = evaluator.evaluate()
    assert results["BF_per_class"]["BF@2px"] == pytest.approx({"0": 50.0, "1": 50.0, "2": 100.0})
    assert results["BF@2px"] == pytest.approx(200 / 3)


def test_evaluator_ignore_index_and_out_of_range_predictions():
    gt, pred = three_class_image()
    gt[12:16, 0:6] = IGNORE
    pred[12:16, 0:6] = 2  # wrong, but under ignore: cleared in both maps
    pred[0, 15] = IGNORE  # belongs to no class: background loses a pixel -> extra boundary
    evaluator = BoundaryFScoreEvaluator(3, radii_px=(1,))
    evaluator.process(gt, pred)
    per_class = evaluator.evaluate()["BF_per_class"]["BF@1px"]
    assert per_class["1"] == pytest.approx(100.0)
    assert per_class["2"] == pytest.approx(200 / 3)
    # class 0: the ignored block's edge is in both maps (row 11 at cols 0..5 and col 5 at rows
    # 12..15: 10 px, matched), the rings give 20 of 24 as before; the pixel at (0, 15) adds (0, 14) and
    # (0, 15) to pred's boundary, unmatched. P = 30 / 36, R = 30 / 34.
    p, r = 30 / 36, 30 / 34
    assert per_class["0"] == pytest.approx(2 * p * r / (p + r) * 100)
    with pytest.raises(ValueError, match="outside"):
        evaluator.process(torch.full((4, 4), 7), torch.zeros(4, 4, dtype=torch.int64))


def test_merged_state_equals_single_pass_and_evaluate_is_idempotent():
    gt, pred = three_class_image()
    single = BoundaryFScoreEvaluator(3)
    first, second = BoundaryFScoreEvaluator(3), BoundaryFScoreEvaluator(3)
    single.process(gt, pred)
    single.process(pred, gt)
    first.process(gt, pred)
    second.process(pred, gt)
    first.merge(second)
    a, b = single.evaluate(), first.evaluate()
    for key in single.keys:
        assert a[key] == pytest.approx(b[key])
        assert a["BF_per_class"][key] == pytest.approx(b["BF_per_class"][key])
    assert first.evaluate()["BF@0.005"] == pytest.approx(b["BF@0.005"])  # evaluating again: no double count
    single.reset()
    assert int(single.images) == 0 and single.f_sum.abs().sum() == 0


# ============================================================================ DatasetEvaluator
META = DatasetMeta(classes=["bg", "a", "b", "absent"])


def test_dataset_evaluator_reports_boundary_f_with_semantic_results():
    gt, pred = three_class_image()
    sample, prediction = {"sem_seg": gt, "file_name": "img.png"}, {"semantic": pred}
    evaluator = DatasetEvaluator(META, ["semantic"], boundary_f=True)
    evaluator.process(sample, prediction)
    results = evaluator.evaluate()["semantic"]
    # 16x16: diagonal 22.6 -> every default threshold is a 1-px radius. Per class 5/6, 1, 2/3 and
    # the absent class counts F = 1 (GSCNN averages every class over every image): mean 3.5 / 4.
    for key in ("BF@0.0005", "BF@0.001875", "BF@0.00375", "BF@0.005"):
        assert results[key] == pytest.approx(87.5)
    assert results["BF_per_class"]["BF@0.005"]["b"] == pytest.approx(200 / 3)
    scalars = evaluator.scalars()
    assert scalars["BF@0.00375"] == pytest.approx(87.5) and scalars["mIoU"] == results["mIoU"]
    assert evaluator.summary() == f"mIoU {results['mIoU']:.1f} | BF@0.0005 87.5 | BF@0.001875 87.5 | " \
                                  "BF@0.00375 87.5 | BF@0.005 87.5"
    evaluator.reset()
    evaluator.process(sample, {"semantic": gt})
    assert evaluator.evaluate()["semantic"]["BF@0.005"] == pytest.approx(100.0)


def test_dataset_evaluator_without_boundary_f_is_unchanged():
    gt, pred = three_class_image()
    evaluator = DatasetEvaluator(META, ["semantic"])
    evaluator.process({"sem_seg": gt, "file_name": "img.png"}, {"semantic": pred})
    results = evaluator.evaluate()["semantic"]
    assert not any(key.startswith("BF") for key in results)
    assert set(evaluator.scalars()) == {"mIoU", "fwIoU", "mAcc", "pAcc"}
    assert evaluator.summary() == f"mIoU {results['mIoU']:.1f}"
    # Without a semantic task there is nothing to attach the boundary score to.
    assert DatasetEvaluator(META, ["instance"], boundary_f=True).boundary is None
