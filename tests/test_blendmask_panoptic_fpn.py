"""The panoptic BlendMask's Panoptic-FPN stuff head (model.blendmask.stuff_head: panoptic_fpn, detectron2's
SemSegFPNHead on P2-P5 as AdelaiDet's release) and the R-50 presets' released structure (panoptic head, RT levels
and attention size)."""

from __future__ import annotations

import math

import pytest
import torch

from omniseg.config import load_config
from omniseg.models.blendmask import BlendMask
from omniseg.models.blendmask.basis import SemanticHead
from omniseg.models.blendmask.family import BlendMaskSettings
from omniseg.models.blendmask.model import stuff_loss
from omniseg.models.blendmask.panoptic_fpn import SemanticFPNHead

from test_blendmask import THINGS, scene, tiny_cfg


def fpn_cfg(**blendmask) -> dict:
    return tiny_cfg("panoptic", stuff_head="panoptic_fpn", stuff_channels=16, **blendmask)


def test_head_brings_every_level_to_stride_4_with_the_panoptic_fpn_depths():
    torch.manual_seed(0)
    head = SemanticFPNHead(8, 5, channels=64)
    assert [len(blocks) for blocks in head.scale_heads] == [1, 1, 2, 3]  # P2, P3, P4, P5
    assert all(b[1].num_groups == 32 and b[0].bias is None for blocks in head.scale_heads for b in blocks)
    for h, w in ((64, 64), (48, 56)):  # a multiple of 32, and not (levels of ceil sizes)
        sizes = [(math.ceil(h / s), math.ceil(w / s)) for s in (4, 8, 16, 32)]
        feats = [torch.randn(2, 8, *size) for size in sizes]
        maps = head.branches(feats)
        assert [tuple(m.shape) for m in maps] == [(2, 64, *sizes[0])] * 4
        logits = head(feats)
        assert logits.shape == (2, 5, *sizes[0])
        torch.testing.assert_close(logits, head.predictor(sum(maps)))
    # Stride 4 from P3: one block, then x2 bilinear (what detectron2's nn.Upsample does on even sizes).
    feats = [torch.randn(1, 8, 16, 16), torch.randn(1, 8, 8, 8), torch.randn(1, 8, 4, 4), torch.randn(1, 8, 2, 2)]
    p3 = torch.nn.functional.interpolate(head.scale_heads[1][0](feats[1]), scale_factor=2, mode="bilinear",
                                         align_corners=False)
    torch.testing.assert_close(head.branches(feats)[1], p3)
    with pytest.raises(ValueError, match="4 levels"):
        head(feats[1:])


def test_fpn_builds_p2_for_the_head_only_and_fcos_keeps_p3_p7(monkeypatch):
    torch.manual_seed(0)
    model = BlendMask(fpn_cfg(), 6, THINGS).eval()
    basis = BlendMask(tiny_cfg("panoptic"), 6, THINGS)
    assert len(model.fpn.inner_blocks) == 4 and len(basis.fpn.inner_blocks) == 3
    assert isinstance(model.stuff_head, SemanticFPNHead) and isinstance(basis.stuff_head, SemanticHead)
    assert len(BlendMask(tiny_cfg("rt"), 6, THINGS).fpn.inner_blocks) == 3
    seen = []
    real = model.stuff_head.forward
    monkeypatch.setattr(model.stuff_head, "forward", lambda feats: seen.append(feats) or real(feats))
    with torch.no_grad():
        out = model.network(torch.zeros(1, 3, 64, 64))
        logits = model.stuff_logits(out)
    assert [tuple(f.shape[-2:]) for f in seen[0]] == [(16, 16), (8, 8), (4, 4), (2, 2)]  # P2..P5: strides 4..32
    assert seen[0][0] is out["p2"] and all(a is b for a, b in zip(seen[0][1:], out["pyramid"][:3]))
    assert [tuple(x.shape[-2:]) for x in out["logits"]] == [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    assert logits.shape == (1, 3, 16, 16)  # stuff 4, 5 + "things", stride 4


def test_stuff_loss_is_the_weighted_ce_by_hand():
    """Constant logits (zero predictor weights, chosen biases) through the model: the loss is 0.5 x the mean over
    pixels of -log softmax(b)[label], "things" on thing pixels, j on stuff class stuff_ids[j-1]."""
    torch.manual_seed(0)
    model = BlendMask(fpn_cfg(), 6, THINGS).train()
    bias = [0.5, -1.0, 2.0]
    with torch.no_grad():
        model.stuff_head.predictor.weight.zero_()
        model.stuff_head.predictor.bias.copy_(torch.tensor(bias))
    images, targets = scene(stuff=True)
    counts = [0, 0, 0]  # pixels labelled "things", stuff 4 (j = 1), stuff 5 (j = 2)
    for t in targets:
        for m, c in zip(t["masks"], t["labels"].tolist()):
            counts[0 if c in THINGS else c - 3] += int(m.sum())
    assert sum(counts) == 2 * 64 * 64  # the scene's stuff covers what its things leave
    lse = math.log(sum(math.exp(b) for b in bias))
    nll = [lse - b for b in bias]
    expected = 0.5 * sum(n * x for n, x in zip(counts, nll)) / sum(counts)
    assert float(model.losses(images, targets)["loss_stuff"].detach()) == pytest.approx(expected, rel=1e-5)
    # Ignored pixels (255) leave the mean; class weights weigh both sums, as F.cross_entropy's weight.
    logits = torch.tensor(bias).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    labels = torch.tensor([[0, 1, 255, 2], [2, 2, 255, 0], [0, 0, 1, 255], [2, 1, 1, 0]])[None]
    w = torch.tensor([1.0, 3.0, 0.5])
    n = [int((labels == c).sum()) for c in range(3)]
    weighted = 0.5 * sum(n[c] * float(w[c]) * nll[c] for c in range(3)) / sum(n[c] * float(w[c]) for c in range(3))
    assert float(stuff_loss(logits, labels, 0.5, w)) == pytest.approx(weighted, rel=1e-6)


def test_tiny_panoptic_blendmask_with_the_head_trains_a_step_and_predicts():
    torch.manual_seed(0)
    test = {"score_threshold": 0.0, "detections_per_image": 5, "instance_score_threshold": 0.0,
            "stuff_area_threshold": 1}
    model = BlendMask(fpn_cfg(test=test), 6, THINGS).train()
    images, targets = scene(stuff=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = model.losses(images, targets)
    assert set(losses) >= {"loss_stuff", "loss_mask", "loss_fcos_cls"}
    assert all(torch.isfinite(v) for v in losses.values())
    before = model.stuff_head.scale_heads[3][2][0].weight.detach().clone()
    sum(losses.values()).backward()
    assert not [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    opt.step()
    assert not torch.equal(before, model.stuff_head.scale_heads[3][2][0].weight)  # P5's last block learns
    model.eval()
    with torch.no_grad():
        model.head.bbox_pred.bias.fill_(1.5)
        model.basis.bases.bias.fill_(2.0)
        model.stuff_head.predictor.bias.copy_(torch.tensor([-4.0, 4.0, 0.0]))
    preds = model.predict(images, [(64, 64), (48, 56)], [(50, 70), (48, 56)], return_raw=True)
    for pred, (oh, ow) in zip(preds, [(50, 70), (48, 56)]):
        seg, infos = pred["panoptic"]["segment_map"], pred["panoptic"]["segments_info"]
        assert seg.shape == (oh, ow) and pred["semantic"].shape == (oh, ow)
        assert any(not s["isthing"] for s in infos) and any(s["isthing"] for s in infos)
        assert pred["raw"]["stuff_logits"].shape == (3, 16, 16)
    raw = model.forward_raw(model.normalize(images[:1]))
    assert raw["stuff_logits"].shape == (3, 16, 16)


def test_presets_resolve_to_the_released_structures():
    rt = load_config("blendmask_rt_r50").model
    opt = BlendMaskSettings.coerce(rt).blendmask.for_variant("rt")
    assert (opt.num_levels, opt.attn_size, opt.sizes_of_interest) == (3, 14, [64, 128])  # Base-RT, ATTN_SIZE 14
    assert (opt.num_share_convs, opt.num_cls_convs, opt.tower_norm, opt.basis_num_convs) == (3, 0, "bn", 2)
    tiny = ["model.backbone=resnet18", "model.backbone_kwargs={layers: [1, 1, 1, 1], channels: [16, 32, 64, 64]}",
            "model.fpn_channels=32", "model.blendmask.basis_channels=16"]
    model = BlendMask(load_config("blendmask_rt_r50", tiny).model, 6, THINGS)
    assert model.strides == [8, 16, 32] and model.fpn.extra_blocks is None
    assert model.head.top_layer.out_channels == 4 * 14 * 14
    demo = BlendMaskSettings.coerce(load_config("blendmask_rt_demo").model).blendmask.for_variant("rt")
    assert (demo.num_levels, demo.attn_size) == (4, 7)  # the demo keeps the variant's P3-P6, M = 7
    pan = load_config("blendmask_panoptic_r50").model.blendmask
    assert (pan.stuff_head, pan.stuff_channels, pan.stuff_weight) == ("panoptic_fpn", 128, 0.5)
    assert (pan.test.instance_score_threshold, pan.test.overlap_threshold) == (0.45, 0.4)
    assert load_config("blendmask_panoptic_demo").model.blendmask.stuff_head == "basis"
