"""MP-Former: piloting reaches the attention, separation of groups and matching queries, noise rates,
fixed-assignment losses, and inference identical to Mask2Former."""

from __future__ import annotations


import pytest
import torch
from omegaconf import OmegaConf

from omniseg.models.mp_former import MaskPilot, PilotSettings
from omniseg.models.registry import build_model

from conftest import TINY_MODEL

NUM_CLASSES = 5


def tiny_model(**mp) -> torch.nn.Module:
    cfg = OmegaConf.from_dotlist([*TINY_MODEL, "model.arch=mask2former"]).model
    cfg = OmegaConf.to_container(cfg)
    cfg["backbone_kwargs"] = {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 64]}
    cfg["mp"] = {"enabled": True, **mp}
    torch.manual_seed(0)
    return build_model(cfg, num_classes=NUM_CLASSES, thing_ids=[2, 3, 4])


def block_targets(size=64) -> list[dict]:
    """Two images; masks aligned with the 1/32 grid (2x2 cells at 64 px) so coverage is 0 or 1."""
    m = torch.zeros((3, size, size), dtype=torch.bool)
    m[0, :32, :32] = True
    m[1, 32:, :] = True
    m[2, :32, 32:] = True
    n = torch.zeros((1, size, size), dtype=torch.bool)
    n[0, :, 32:] = True
    return [{"labels": torch.tensor([1, 3, 4]), "masks": m}, {"labels": torch.tensor([2]), "masks": n}]


def features(model, images):
    return model.pixel_features(model.normalize(images))


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)


def test_matching_queries_compute_exactly_what_mask2former_computes(images):
    model = tiny_model(groups=2, label_noise=0.3, point_noise=0.2).eval()
    targets = block_targets()
    with torch.no_grad():
        mask_features, multi_scale = features(model, images)
        plain = model.predictor(multi_scale, mask_features)
        piloted = model.mask_pilot.run_decoder(model.predictor, multi_scale, mask_features, targets)
    assert piloted.num_slots == 2 * 3
    plain_sets = plain["aux_outputs"] + [plain]
    piloted_sets = piloted.matching["aux_outputs"] + [piloted.matching]
    assert len(piloted_sets) == len(plain_sets) == 4 and len(piloted.piloted) == 4
    for a, b in zip(plain_sets, piloted_sets):
        torch.testing.assert_close(b["pred_logits"], a["pred_logits"], atol=1e-5, rtol=0)
        torch.testing.assert_close(b["pred_masks"], a["pred_masks"], atol=1e-5, rtol=0)


def _cross_attention_rows(model, multi_scale, mask_features, targets, layer=0):
    """Output of layer `layer`'s cross-attention sublayer (before self-attention mixes queries)."""
    captured = {}
    hook = model.predictor.transformer_cross_attention_layers[layer].register_forward_hook(
        lambda mod, args, out: captured.setdefault("out", out.detach().clone()))
    try:
        with torch.no_grad():
            model.mask_pilot.run_decoder(model.predictor, multi_scale, mask_features, targets)
    finally:
        hook.remove()
    return captured["out"]


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_piloted_queries_attend_only_inside_their_gt_mask(images, layer):
    model = tiny_model(groups=1, label_noise=0.0, point_noise=0.0).eval()
    targets = block_targets()
    with torch.no_grad():
        mask_features, multi_scale = features(model, images)
    level = layer % 3
    base = _cross_attention_rows(model, multi_scale, mask_features, targets, layer)
    h, w = multi_scale[level].shape[-2:]
    # GT 0 of image 0 covers the top-left quarter: changing features outside it must not change
    # that MP query's cross-attention output, changing them inside must.
    inside = torch.zeros((h, w), dtype=torch.bool)
    inside[: h // 2, : w // 2] = True
    for region, should_change in ((~inside, False), (inside, True)):
        perturbed = [f.clone() for f in multi_scale]
        perturbed[level][:, :, region] += 3.0 * torch.randn_like(perturbed[level][:, :, region])
        out = _cross_attention_rows(model, perturbed, mask_features, targets, layer)
        changed = (out[0, 0] - base[0, 0]).abs().max().item()
        if should_change:
            assert changed > 1e-3
        else:
            assert changed < 1e-5
    # A matching query (row >= P) attends through its predicted mask, independent of the GT.
    assert out.shape[1] == 3 + model.predictor.num_queries


def test_only_the_first_layer_is_piloted_when_asked(images):
    model = tiny_model(groups=1, label_noise=0.0, piloted_layers=1).eval()
    targets = block_targets()
    with torch.no_grad():
        mask_features, multi_scale = features(model, images)
    blocked_seen = []
    originals = model.predictor.forward_layer

    def spy(i, output, memory, pos, query_pos, blocked, self_blocked=None):
        blocked_seen.append(blocked[:, :3].clone())
        return originals(i, output, memory, pos, query_pos, blocked, self_blocked)

    model.predictor.forward_layer = spy
    with torch.no_grad():
        model.mask_pilot.run_decoder(model.predictor, multi_scale, mask_features, targets)
    gt0 = ~torch.tensor([[True, False], [False, False]]).flatten()  # top-left cell of the 2x2 level
    assert torch.equal(blocked_seen[0][0, 0], gt0)
    assert len(blocked_seen) == 3  # later layers use the MP queries' own predictions (not asserted equal to GT)


def test_self_attention_mask_hides_groups_and_mp_from_matching():
    pilot = MaskPilot(NUM_CLASSES, 8, PilotSettings(groups=3))
    blocked = pilot.self_attention_mask(num_slots=6, num_queries=4)
    assert blocked.shape == (10, 10)
    assert blocked[6:, :6].all() and not blocked[6:, 6:].any()  # matching rows: no MP column
    assert not blocked[:6, 6:].any()  # MP rows see the matching queries
    for g in range(3):
        rows = slice(2 * g, 2 * g + 2)
        own = torch.zeros(6, dtype=torch.bool)
        own[2 * g: 2 * g + 2] = True
        assert not blocked[rows, :6][:, own].any()
        assert blocked[rows, :6][:, ~own].all()


def test_groups_cannot_see_each_other(images, monkeypatch):
    model = tiny_model(groups=2, label_noise=0.0).eval()
    targets = block_targets()
    with torch.no_grad():
        mask_features, multi_scale = features(model, images)
        base = model.mask_pilot.run_decoder(model.predictor, multi_scale, mask_features, targets)
    original = MaskPilot.query_content

    def perturbed_group_1(self, targets, max_num):
        content = original(self, targets, max_num).clone()
        content[:, max_num:] += 5.0 * torch.randn_like(content[:, max_num:])  # only group 1
        return content

    monkeypatch.setattr(MaskPilot, "query_content", perturbed_group_1)
    with torch.no_grad():
        other = model.mask_pilot.run_decoder(model.predictor, multi_scale, mask_features, targets)
    group0 = slice(0, 3)
    for a, b in zip(base.piloted, other.piloted):
        torch.testing.assert_close(b["pred_masks"][:, group0], a["pred_masks"][:, group0], atol=1e-5, rtol=0)
        assert (b["pred_masks"][:, 3:] - a["pred_masks"][:, 3:]).abs().max() > 1e-3
    torch.testing.assert_close(other.matching["pred_masks"], base.matching["pred_masks"], atol=1e-5, rtol=0)


def test_slot_layout_and_empty_slots():
    pilot = MaskPilot(NUM_CLASSES, 8, PilotSettings(groups=2, label_noise=0.0))
    targets = block_targets()
    max_num, indices = pilot.slot_layout(targets)
    assert max_num == 3
    assert indices[0][0].tolist() == [0, 1, 2, 3, 4, 5] and indices[0][1].tolist() == [0, 1, 2, 0, 1, 2]
    assert indices[1][0].tolist() == [0, 3] and indices[1][1].tolist() == [0, 0]
    content = pilot.query_content(targets, max_num)
    assert content.shape == (2, 6, 8)
    torch.testing.assert_close(content[1, 0], pilot.label_enc.weight[2])
    assert content[1, 1].abs().sum() == 0 and content[1, 2].abs().sum() == 0  # empty slots are zero


def test_label_noise_rate():
    torch.manual_seed(0)
    pilot = MaskPilot(10, 8, PilotSettings(label_noise=0.3))
    labels = torch.zeros(200_000, dtype=torch.int64)
    changed = (pilot.noisy_labels(labels) != labels).float().mean().item()
    assert changed == pytest.approx(0.3 * 0.9, abs=0.005)  # a random class coincides 1 time in 10


def test_point_noise_flips_about_noise_scale_times_the_area():
    torch.manual_seed(0)
    pilot = MaskPilot(NUM_CLASSES, 8, PilotSettings(point_noise=0.2))
    allowed = torch.zeros((2000, 32, 32), dtype=torch.bool)
    allowed[:, 8:24, 4:20] = True  # area 256
    flips = (pilot.point_noise(allowed) ^ allowed).flatten(1).sum(1).float()
    assert flips.mean().item() == pytest.approx(0.2 * 256, rel=0.03)
    # redrawn on every call
    assert not torch.equal(pilot.point_noise(allowed), pilot.point_noise(allowed))
    assert torch.equal(MaskPilot(NUM_CLASSES, 8, PilotSettings(point_noise=0.0)).point_noise(allowed), allowed)
    empty = torch.zeros((4, 32, 32), dtype=torch.bool)
    assert not pilot.point_noise(empty).any()  # an empty slot stays empty (attends globally later)


def test_shift_and_scale_noise_move_and_grow_masks():
    torch.manual_seed(0)
    cov = torch.zeros((1, 400, 32, 32))
    cov[:, :, 12:20, 12:20] = 1.0
    shifted = MaskPilot(NUM_CLASSES, 8, PilotSettings(shift_noise=1.0)).shift_scale(cov)
    centres = (shifted[0] * torch.arange(32.0)[None, None, :]).sum((1, 2)) / shifted[0].sum((1, 2))
    assert centres.std() > 1.0 and (centres - 15.5).abs().max() <= 4.0 + 0.5  # |shift| <= half width
    scaled = MaskPilot(NUM_CLASSES, 8, PilotSettings(scale_noise=0.5)).shift_scale(cov)
    areas = (scaled[0] > 1e-8).flatten(1).sum(1).float()
    grown = areas > 64
    assert 0.4 < grown.float().mean().item() < 0.6  # with probability 0.5
    assert areas[grown].min() >= 144 - 1e-6  # 8 px x 1.5 -> 12 px side (plus bilinear rim)
    assert areas[~grown].eq(64).all()


def test_mp_losses_cover_every_prediction_set_and_train_label_embedding(images):
    model = tiny_model(groups=2, label_noise=0.2, point_noise=0.2).train()
    losses = model(images, block_targets())
    mp_keys = sorted(k for k in losses if "_mp" in k)
    assert mp_keys == sorted([f"{n}_mp" for n in ("loss_ce", "loss_mask", "loss_dice")]
                             + [f"{n}_mp_{i}" for i in range(3) for n in ("loss_ce", "loss_mask", "loss_dice")])
    assert len(losses) == 2 * 12
    sum(losses.values()).backward()
    assert model.mask_pilot.label_enc.weight.grad is not None
    assert model.mask_pilot.label_enc.weight.grad[[1, 2, 3, 4]].abs().sum() > 0


def test_mp_losses_use_the_fixed_assignment(images):
    """A slot's loss is against its own GT: swap two GT and the MP mask loss changes, while
    Hungarian-matched losses of a plain criterion would not care about GT order."""
    model = tiny_model(groups=1, label_noise=0.0).train()
    targets = block_targets()
    with torch.no_grad():
        mask_features, multi_scale = features(model, images)
        piloted = model.mask_pilot.run_decoder(model.predictor, multi_scale, mask_features, targets)
    # Make slot 0 of image 0 predict GT 0 perfectly, the others nothing: loss of slot 0 is ~0.
    perfect = {"pred_logits": torch.full((2, 3, NUM_CLASSES + 1), -10.0), "pred_masks": torch.full((2, 3, 16, 16), -20.0)}
    perfect["pred_logits"][..., -1] = 10.0  # every other slot: no-object
    perfect["pred_logits"][0, 0, 1], perfect["pred_logits"][0, 0, -1] = 10.0, -10.0
    perfect["pred_masks"][0, 0, :8, :8] = 20.0
    piloted.piloted = [perfect]
    single = [targets[0], {"labels": targets[1]["labels"][:0], "masks": targets[1]["masks"][:0]}]
    piloted.indices = [(torch.tensor([0]), torch.tensor([0])), (torch.empty(0, dtype=torch.int64),) * 2]
    good = model.mask_pilot.losses(model.criterion, piloted, single)
    piloted.indices = [(torch.tensor([0]), torch.tensor([1])), (torch.empty(0, dtype=torch.int64),) * 2]
    bad = model.mask_pilot.losses(model.criterion, piloted, single)
    assert good["loss_ce_mp"] < 1e-3 and bad["loss_ce_mp"] > 1.0
    # mask terms: only boundary points (bilinear 16 -> 64 px) are not perfect
    assert good["loss_mask_mp"] < 0.1 * bad["loss_mask_mp"]
    assert good["loss_dice_mp"] < 0.1 * bad["loss_dice_mp"]


def test_batch_without_ground_truth_gives_zero_mp_losses_with_gradient_path(images):
    model = tiny_model().train()
    empty = [{"labels": torch.empty(0, dtype=torch.int64), "masks": torch.zeros((0, 64, 64), dtype=torch.bool)}] * 2
    losses = model(images, empty)
    mp = {k: v for k, v in losses.items() if "_mp" in k}
    assert len(mp) == 12 and all(v.item() == 0 for v in mp.values())
    sum(losses.values()).backward()
    assert model.mask_pilot.label_enc.weight.grad is not None  # DDP sees every parameter used


def test_inference_is_mask2former_inference(images):
    mp_model = tiny_model().eval()
    cfg = OmegaConf.to_container(OmegaConf.from_dotlist([*TINY_MODEL]).model)
    cfg["backbone_kwargs"] = {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 64]}
    plain = build_model(cfg, num_classes=NUM_CLASSES, thing_ids=[2, 3, 4]).eval()
    state = {k: v for k, v in mp_model.state_dict().items() if not k.startswith("mask_pilot.")}
    plain.load_state_dict(state)
    a = mp_model.predict(images, [(64, 64)] * 2, return_raw=True)
    b = plain.predict(images, [(64, 64)] * 2, return_raw=True)
    for pa, pb in zip(a, b):
        assert torch.equal(pa["raw"]["pred_masks"], pb["raw"]["pred_masks"])
        assert torch.equal(pa["semantic"], pb["semantic"])
        assert torch.equal(pa["panoptic"]["segment_map"], pb["panoptic"]["segment_map"])
    # and no MP code runs at inference
    mp_model.mask_pilot.run_decoder = None
    mp_model.predict(images, [(64, 64)] * 2)


def test_mp_requires_masked_attention():
    cfg = OmegaConf.to_container(OmegaConf.from_dotlist([*TINY_MODEL, "model.arch=maskformer"]).model)
    cfg["mp"] = {"enabled": True}
    with pytest.raises(ValueError, match="mask2former"):
        build_model(cfg, num_classes=3)
    with pytest.raises(ValueError, match=r"unknown key model.mp.grops \(did you mean groups\?\)"):
        build_model({"arch": "mask2former", "mp": {"enabled": True, "grops": 2}}, num_classes=3)


def test_mp_former_trains_end_to_end(make_tiny_config):
    from omniseg.engine.trainer import train

    cfg = make_tiny_config("model.mp.enabled=true", "model.mp.point_noise=0.2", "train.max_iters=60",
                           "train.lr=1e-3", "train.checkpoint_period=1000")
    train(cfg, progress=False)
    import json
    from pathlib import Path

    rows = [json.loads(line) for line in (Path(cfg.train.output_dir) / "metrics.jsonl").read_text().splitlines()]
    mp = [r["loss_mask_mp"] + r["loss_dice_mp"] for r in rows if "loss_mask_mp" in r]
    assert len(mp) >= 50
    assert sum(mp[-10:]) / 10 < 0.9 * sum(mp[:10]) / 10
