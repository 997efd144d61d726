"""Point sampling, Hungarian matcher and set criterion: hand-computed cases, brute force and HF parity."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
import torchvision

from omniseg.models.layers.point_sampling import (
    calculate_uncertainty,
    get_uncertain_point_coords_with_randomness,
    point_sample,
)
from omniseg.models.maskformer.criterion import SetCriterion, dice_loss, sigmoid_ce_loss, sigmoid_focal_loss
from omniseg.models.maskformer.matcher import (
    HungarianMatcher,
    pairwise_dice,
    pairwise_sigmoid_ce,
    pairwise_sigmoid_focal,
)


def _hf_modeling():
    """HF transformers' Mask2Former module, the parity reference (skipped when transformers is absent)."""
    return pytest.importorskip("transformers.models.mask2former.modeling_mask2former")


def _random_batch(seed: int, batch: int = 2, queries: int = 6, classes: int = 4, num_gt=(3, 2), aux: int = 2):
    """Random outputs at 1/4 resolution (16x16) and padded 64x64 GT built from rectangles."""
    g = torch.Generator().manual_seed(seed)

    def level():
        return {
            "pred_logits": torch.randn(batch, queries, classes + 1, generator=g),
            "pred_masks": 3 * torch.randn(batch, queries, 16, 16, generator=g),
        }

    outputs = level()
    outputs["aux_outputs"] = [level() for _ in range(aux)]
    targets = []
    for b in range(batch):
        n = num_gt[b]
        masks = torch.zeros(n, 64, 64, dtype=torch.bool)
        for i in range(n):
            y0, x0 = torch.randint(0, 40, (2,), generator=g).tolist()
            h, w = torch.randint(8, 24, (2,), generator=g).tolist()
            masks[i, y0 : y0 + h, x0 : x0 + w] = True
        targets.append({"labels": torch.randint(0, classes, (n,), generator=g), "masks": masks})
    return outputs, targets


# ----------------------------------------------------------------------------------- point sampling
def test_point_sample_hand_computed():
    grid = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # [1, 1, 2, 2]
    coords = torch.tensor([[[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.5, 0.5], [0.5, 0.25]]])  # (x, y)
    out = point_sample(grid, coords)
    assert out.shape == (1, 1, 5)
    # pixel centres read exact values, the image centre averages all four, (0.5, 0.25) averages the top row
    assert torch.allclose(out[0, 0], torch.tensor([1.0, 2.0, 3.0, 2.5, 1.5]))


def test_importance_sampling_picks_most_uncertain_candidates():
    logits = 4 * torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    coords = get_uncertain_point_coords_with_randomness(
        logits, calculate_uncertainty, 40, 3.0, 0.75, generator=torch.Generator().manual_seed(1)
    )
    assert coords.shape == (3, 40, 2) and coords.min() >= 0 and coords.max() < 1
    # replay the generator: the 120 uniform candidates per mask, then the 10 extra uniform points
    replay = torch.Generator().manual_seed(1)
    candidates = torch.rand(3, 120, 2, generator=replay)
    extra = torch.rand(3, 10, 2, generator=replay)
    uncertainty = -point_sample(logits, candidates)[:, 0].abs()
    chosen = -point_sample(logits, coords[:, :30])[:, 0].abs()
    expected = uncertainty.topk(30, dim=1).values
    assert torch.allclose(chosen.sort(dim=1, descending=True).values, expected)
    assert torch.equal(coords[:, 30:], extra)


def test_importance_sampling_matches_hf():
    hf = _hf_modeling()

    logits = torch.randn(5, 1, 12, 12)
    hf_loss = hf.Mask2FormerLoss.__new__(hf.Mask2FormerLoss)  # only its sampling method is used
    torch.manual_seed(3)
    ref = hf_loss.sample_points_using_uncertainty(logits, lambda x: -x.abs(), 100, 3.0, 0.75)
    torch.manual_seed(3)
    ours = get_uncertain_point_coords_with_randomness(logits, calculate_uncertainty, 100, 3.0, 0.75)
    # the same uncertain points (in top-k's unsorted order), then the same uniform ones
    def as_set(coords):
        return coords[torch.arange(len(coords))[:, None], (coords[..., 0] * 2 + coords[..., 1]).argsort(dim=1)]
    assert torch.equal(as_set(ours[:, :75]), as_set(ref[:, :75]))
    assert torch.equal(ours[:, 75:], ref[:, 75:])


# ----------------------------------------------------------------------------------- matcher
def test_pairwise_costs_equal_elementwise_definitions():
    g = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(4, 50, generator=g)
    targets = torch.rand(3, 50, generator=g)  # soft targets, as bilinear point samples of GT are
    x = logits[:, None, :].expand(4, 3, 50)
    t = targets[None].expand(4, 3, 50)
    bce = F.binary_cross_entropy_with_logits(x, t, reduction="none").mean(-1)
    # the matmul form of focal is linear in the target: it equals the elementwise loss for binary targets
    binary = (targets > 0.5).float()
    tb = binary[None].expand(4, 3, 50)
    focal = torchvision.ops.sigmoid_focal_loss(x, tb, alpha=0.25, gamma=2.0, reduction="none").mean(-1)
    p = x.sigmoid()
    dice = 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)
    assert torch.allclose(pairwise_sigmoid_ce(logits, targets), bce, atol=1e-6)
    assert torch.allclose(pairwise_sigmoid_focal(logits, binary), focal, atol=1e-6)
    assert torch.allclose(pairwise_dice(logits, targets), dice, atol=1e-6)


@pytest.mark.parametrize("queries,num_gt,mask_loss", [(4, 3, "bce"), (3, 3, "focal"), (5, 2, "bce"), (2, 3, "bce")])
def test_matcher_equals_brute_force(queries, num_gt, mask_loss):
    outputs, targets = _random_batch(seed=queries * 10 + num_gt, batch=1, queries=queries, num_gt=(num_gt,), aux=0)
    matcher = HungarianMatcher(num_points=200, mask_loss=mask_loss)
    (rows, cols), = matcher(outputs, targets, generator=torch.Generator().manual_seed(7))
    coords = torch.rand(200, 2, generator=torch.Generator().manual_seed(7))  # the points the matcher drew
    cost = matcher.cost_matrix(
        outputs["pred_logits"][0], outputs["pred_masks"][0], targets[0]["labels"], targets[0]["masks"], coords
    )
    assert len(rows) == len(cols) == min(queries, num_gt)
    best = float("inf")
    if queries >= num_gt:  # every GT gets a distinct query
        for perm in itertools.permutations(range(queries), num_gt):
            best = min(best, sum(cost[q, t].item() for t, q in enumerate(perm)))
    else:  # every query gets a distinct GT
        for perm in itertools.permutations(range(num_gt), queries):
            best = min(best, sum(cost[q, t].item() for q, t in enumerate(perm)))
    assert cost[rows, cols].sum().item() == pytest.approx(best, abs=1e-5)


def test_matcher_matches_hf_matcher():
    hf = _hf_modeling()

    outputs, targets = _random_batch(seed=1, aux=0)
    ref_matcher = hf.Mask2FormerHungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=300)
    torch.manual_seed(11)
    ref = ref_matcher(
        outputs["pred_masks"],
        outputs["pred_logits"],
        [t["masks"].float() for t in targets],
        [t["labels"] for t in targets],
    )
    torch.manual_seed(11)  # same global RNG stream -> same points
    ours = HungarianMatcher(num_points=300)(outputs, targets)
    for (r_rows, r_cols), (o_rows, o_cols) in zip(ref, ours):
        assert torch.equal(r_rows, o_rows) and torch.equal(r_cols, o_cols)
        assert o_rows.dtype == o_cols.dtype == torch.int64


def test_matcher_perfect_prediction_and_empty_targets():
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[0, :16] = True
    masks[1, 16:] = True
    coarse = masks[:, ::4, ::4].float()  # [2, 8, 8] exact at 1/4 resolution
    pred_masks = torch.full((1, 4, 8, 8), -10.0)
    pred_masks[0, 3] = 20 * coarse[0] - 10
    pred_masks[0, 1] = 20 * coarse[1] - 10
    pred_logits = torch.full((1, 4, 4), -5.0)
    pred_logits[0, 3, 2] = 5.0
    pred_logits[0, 1, 0] = 5.0
    outputs = {"pred_logits": pred_logits, "pred_masks": pred_masks}
    targets = [{"labels": torch.tensor([2, 0]), "masks": masks}]
    (rows, cols), = HungarianMatcher(num_points=500)(outputs, targets)
    assert dict(zip(cols.tolist(), rows.tolist())) == {0: 3, 1: 1}

    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 32, 32, dtype=torch.bool)}]
    (rows, cols), = HungarianMatcher(num_points=500)(outputs, empty)
    assert rows.numel() == cols.numel() == 0 and rows.dtype == torch.int64


# ----------------------------------------------------------------------------------- criterion
def _hf_loss(num_classes: int, num_points: int):
    hf = _hf_modeling()
    config = hf.Mask2FormerConfig(
        num_labels=num_classes, train_num_points=num_points, oversample_ratio=3.0,
        importance_sample_ratio=0.75, no_object_weight=0.1,
    )  # fmt: skip
    return hf.Mask2FormerLoss(config, weight_dict={"loss_cross_entropy": 2.0, "loss_mask": 5.0, "loss_dice": 5.0})


def _hf_weighted(hf_losses: dict) -> dict:
    """HF names and unweighted values -> omniseg names with 2/5/5 weights."""
    out = {}
    for key, value in hf_losses.items():
        name = key.replace("loss_cross_entropy", "loss_ce")
        weight = 2.0 if name.startswith("loss_ce") else 5.0
        out[name] = value * weight
    return out


def _hf_inputs(outputs, targets):
    aux = [
        {"masks_queries_logits": a["pred_masks"], "class_queries_logits": a["pred_logits"]}
        for a in outputs["aux_outputs"]
    ]
    return dict(
        masks_queries_logits=outputs["pred_masks"],
        class_queries_logits=outputs["pred_logits"],
        mask_labels=[t["masks"].float() for t in targets],
        class_labels=[t["labels"] for t in targets],
        auxiliary_predictions=aux,
    )


def test_criterion_matches_hf_with_injected_indices():
    outputs, targets = _random_batch(seed=2, aux=2)
    # fixed assignment per level (deliberately not the optimal one), injected into both implementations
    fixed = [
        [(torch.tensor([0, 2, 5]), torch.tensor([1, 0, 2])), (torch.tensor([4, 1]), torch.tensor([0, 1]))],
        [(torch.tensor([3, 1, 0]), torch.tensor([0, 1, 2])), (torch.tensor([2, 5]), torch.tensor([1, 0]))],
        [(torch.tensor([1, 4, 2]), torch.tensor([2, 1, 0])), (torch.tensor([0, 3]), torch.tensor([0, 1]))],
    ]

    class FixedMatcher(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = iter(fixed)

        def forward(self, *args, **kwargs):
            return next(self.calls)

    hf_loss = _hf_loss(num_classes=4, num_points=500)
    hf_loss.matcher = FixedMatcher()
    ours = SetCriterion(4, FixedMatcher(), num_points=500)
    torch.manual_seed(5)
    ref = _hf_weighted(hf_loss(**_hf_inputs(outputs, targets)))
    torch.manual_seed(5)  # same global RNG stream -> same importance-sampled points
    got = ours(outputs, targets)
    assert set(got) == set(ref) == {f"loss_{n}{s}" for n in ("ce", "mask", "dice") for s in ("", "_0", "_1")}
    for key in ref:
        assert got[key].item() == pytest.approx(ref[key].item(), abs=1e-5), key


def test_criterion_matches_hf_end_to_end():
    """With the same RNG stream even the Hungarian matching points coincide."""
    outputs, targets = _random_batch(seed=3, aux=1)
    torch.manual_seed(9)
    ref = _hf_weighted(_hf_loss(4, 400)(**_hf_inputs(outputs, targets)))
    torch.manual_seed(9)
    got = SetCriterion(4, HungarianMatcher(num_points=400), num_points=400)(outputs, targets)
    for key in ref:
        assert got[key].item() == pytest.approx(ref[key].item(), abs=1e-5), key


def test_focal_loss_matches_torchvision():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(3, 40, generator=g), torch.rand(3, 40, generator=g)
    ref = torchvision.ops.sigmoid_focal_loss(logits, labels, alpha=0.25, gamma=2.0, reduction="none").mean(1).sum() / 2
    assert sigmoid_focal_loss(logits, labels, 2.0).item() == pytest.approx(ref.item(), abs=1e-6)
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1).sum() / 2
    assert sigmoid_ce_loss(logits, labels, 2.0).item() == pytest.approx(bce.item(), abs=1e-6)
    p = logits.sigmoid()
    dice = (1 - (2 * (p * labels).sum(1) + 1) / (p.sum(1) + labels.sum(1) + 1)).sum() / 2
    assert dice_loss(logits, labels, 2.0).item() == pytest.approx(dice.item(), abs=1e-6)


def _perfect_outputs(targets, queries=6, classes=4):
    batch = len(targets)
    pred_logits = torch.full((batch, queries, classes + 1), -8.0)
    pred_logits[..., classes] = 8.0  # no-object by default
    pred_masks = torch.full((batch, queries, 16, 16), -12.0)
    for b, t in enumerate(targets):
        for i, (label, mask) in enumerate(zip(t["labels"], t["masks"])):
            q = queries - 1 - i
            pred_logits[b, q] = -8.0
            pred_logits[b, q, label] = 8.0
            coarse = F.interpolate(mask[None, None].float(), size=(16, 16), mode="area")[0, 0]
            pred_masks[b, q] = 24 * coarse - 12
    return {"pred_logits": pred_logits, "pred_masks": pred_masks}


@pytest.mark.parametrize("mask_loss", ["bce", "focal"])
def test_perfect_predictions_beat_random_and_gradients_flow(mask_loss):
    outputs, targets = _random_batch(seed=4, aux=1)
    matcher = HungarianMatcher(num_points=300, mask_loss=mask_loss)
    criterion = SetCriterion(4, matcher, num_points=300, mask_loss=mask_loss)
    perfect = criterion(_perfect_outputs(targets), targets, generator=torch.Generator().manual_seed(0))
    leaves = [outputs["pred_logits"], outputs["pred_masks"], outputs["aux_outputs"][0]["pred_masks"]]
    for leaf in leaves:
        leaf.requires_grad_(True)
    rand = criterion(outputs, targets, generator=torch.Generator().manual_seed(0))
    for key in ("loss_ce", "loss_mask", "loss_dice"):
        assert perfect[key] < 0.5 * rand[key], key
    sum(rand.values()).backward()
    for leaf in leaves:
        assert leaf.grad is not None and leaf.grad.abs().sum() > 0


def test_generator_makes_losses_reproducible():
    outputs, targets = _random_batch(seed=5, aux=1)
    criterion = SetCriterion(4, HungarianMatcher(num_points=200), num_points=200)
    a = criterion(outputs, targets, generator=torch.Generator().manual_seed(1))
    b = criterion(outputs, targets, generator=torch.Generator().manual_seed(1))
    c = criterion(outputs, targets, generator=torch.Generator().manual_seed(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in ("loss_mask", "loss_dice"))


def test_batch_without_ground_truth():
    outputs, _ = _random_batch(seed=6, aux=1)
    outputs["pred_masks"].requires_grad_(True)
    outputs["pred_logits"].requires_grad_(True)
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 64, 64, dtype=torch.bool)}] * 2
    losses = SetCriterion(4, HungarianMatcher(num_points=100), num_points=100)(outputs, targets)
    # every query targets no-object: weighted mean of -log p(no-object) (all weights equal 0.1 cancel)
    expected_ce = -F.log_softmax(outputs["pred_logits"], -1)[..., 4].mean()
    assert losses["loss_ce"].item() == pytest.approx(2.0 * expected_ce.item(), rel=1e-6)
    assert losses["loss_mask"].item() == losses["loss_dice"].item() == losses["loss_mask_0"].item() == 0.0
    sum(losses.values()).backward()
    assert outputs["pred_masks"].grad is not None  # graph stays connected (DDP needs every parameter used)
    assert torch.count_nonzero(outputs["pred_masks"].grad) == 0


def test_compute_losses_for_fixed_indices():
    _, targets = _random_batch(seed=7, aux=0)
    perfect = _perfect_outputs(targets)  # GT i is predicted by query 5 - i
    criterion = SetCriterion(4, matcher=None, num_points=300)
    right = [(torch.tensor([5, 4, 3]), torch.tensor([0, 1, 2])), (torch.tensor([5, 4]), torch.tensor([0, 1]))]
    wrong = [(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2])), (torch.tensor([0, 1]), torch.tensor([0, 1]))]
    g = torch.Generator().manual_seed(0)
    good = criterion.compute_losses_for_indices(perfect, targets, right, generator=g)
    bad = criterion.compute_losses_for_indices(perfect, targets, wrong, generator=g)
    assert set(good) == {"loss_ce", "loss_mask", "loss_dice"}
    assert all(good[k] < 0.25 * bad[k] for k in good)
    # num_masks override divides the mask terms (e.g. MP-Former groups)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    base = criterion.compute_losses_for_indices(perfect, targets, wrong, generator=g1)
    halved = criterion.compute_losses_for_indices(perfect, targets, wrong, num_masks=10.0, generator=g2)
    assert halved["loss_dice"].item() == pytest.approx(base["loss_dice"].item() * 5 / 10, rel=1e-6)
    assert halved["loss_ce"].item() == pytest.approx(base["loss_ce"].item(), rel=1e-6)


def test_matched_target_points_equal_reading_zero_padded_copies():
    """GT masks are read where the official code reads its zero-padded copies of the matched masks:
    images with smaller masks than the batch's largest, unmatched GTs, and GTs matched twice."""
    g = torch.Generator().manual_seed(7)
    targets = [{"masks": torch.rand(3, 12, 16, generator=g) > 0.5}, {"masks": torch.rand(4, 9, 10, generator=g) > 0.5},
               {"masks": torch.zeros(0, 12, 16, dtype=torch.bool)}]
    indices = [(torch.tensor([5, 0]), torch.tensor([2, 0])),  # GT 1 unmatched
               (torch.tensor([1, 3, 4]), torch.tensor([3, 1, 3])),  # GT 3 twice
               (torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64))]
    coords = torch.rand(5, 40, 2, generator=g)
    padded = torch.zeros(5, 1, 12, 16)
    for row, (t, b) in enumerate([(0, 2), (0, 0), (1, 3), (1, 1), (1, 3)]):
        mask = targets[t]["masks"][b].float()
        padded[row, 0, :mask.shape[0], :mask.shape[1]] = mask
    expected = point_sample(padded, coords, align_corners=False)[:, 0]
    got = SetCriterion._matched_target_points(targets, indices, coords)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert (expected > 0).any() and (expected < 1).any()
