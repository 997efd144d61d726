"""BlendMask: the blender against a hand computation, GT-box proposals in training, the batched paste,
training, prediction formats, the Panoptic-FPN merge and the engine on the three demo presets."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from omniseg.config import load_config
from omniseg.masks import boxes_from_masks
from omniseg.models.blendmask import BlendMask
from omniseg.models.blendmask import model as bm_model
from omniseg.models.blendmask.blender import blend, crop_masks, paste_masks, pool_bases
from omniseg.masks import combine_panoptic

THINGS = [0, 1, 2, 3]  # the synthetic set's layout: 4 thing classes, then stuff 4 and 5


def tiny_cfg(variant: str = "standard", **blendmask) -> dict:
    sizes = [16, 32, 64] if variant == "rt" else [16, 32, 64, 128]
    return {"variant": variant, "backbone": "resnet18", "backbone_norm": "bn",
            "backbone_kwargs": {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 64]}, "fpn_channels": 32,
            "blendmask": {"basis_channels": 16, "bottom_resolution": 16, "sizes_of_interest": sizes, **blendmask}}


def scene(stuff: bool = False):
    """Two 64 px images: squares / rectangles of thing classes (+ one stuff mask per image with `stuff`)."""
    torch.manual_seed(0)
    images = torch.randint(0, 60, (2, 3, 64, 64), dtype=torch.uint8)
    boxes = [[(8, 6, 30, 28, 0), (36, 30, 60, 58, 2)], [(20, 10, 50, 40, 1)]]
    targets = []
    for i, objs in enumerate(boxes):
        masks, labels = [], []
        for x0, y0, x1, y1, c in objs:
            m = torch.zeros(64, 64, dtype=torch.bool)
            m[y0:y1, x0:x1] = True
            images[i, c % 3, y0:y1, x0:x1] = 220
            masks.append(m)
            labels.append(c)
        if stuff:
            masks.append(~torch.stack(masks).any(0))
            labels.append(4 + i)
        targets.append({"labels": torch.tensor(labels), "masks": torch.stack(masks)})
    return images, targets


# -- blender ---------------------------------------------------------------------------------------

def _bilinear(img: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """Explicit bilinear sample of [C,H,W] at an interior point (no border cases)."""
    y0, x0 = math.floor(y), math.floor(x)
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * img[:, y0, x0] + (1 - ly) * lx * img[:, y0, x0 + 1]
            + ly * (1 - lx) * img[:, y0 + 1, x0] + ly * lx * img[:, y0 + 1, x0 + 1])


def _upsample_1d_weights(m: int, r: int) -> torch.Tensor:
    """[r,m] weights of bilinear upsampling m -> r with align_corners=False (source index clamped at 0)."""
    w = torch.zeros(r, m, dtype=torch.float64)
    for i in range(r):
        src = max((i + 0.5) * m / r - 0.5, 0.0)
        i0 = math.floor(src)
        i1 = min(i0 + 1, m - 1)
        lam = src - i0
        w[i, i0] += 1 - lam
        w[i, i1] += lam
    return w


def test_blender_equals_hand_computation():
    torch.manual_seed(1)
    k, m, r, stride = 2, 2, 3, 2
    bases = torch.randn(1, k, 6, 6, dtype=torch.float64)
    box = torch.tensor([[2.0, 3.0, 9.0, 10.0]], dtype=torch.float64)  # input pixels; bases at stride 2
    attn = torch.randn(1, k * m * m, dtype=torch.float64)
    got = blend(pool_bases(bases, box, torch.zeros(1, dtype=torch.int64), r, stride), attn)[0]

    # RoIAlign, aligned, sampling_ratio 1: one bilinear sample at each bin centre, box shifted by half a pixel.
    x0, y0, x1, y1 = (box[0] / stride).tolist()
    bw, bh = (x1 - x0) / r, (y1 - y0) / r
    crop = torch.zeros(k, r, r, dtype=torch.float64)
    for i in range(r):
        for j in range(r):
            crop[:, i, j] = _bilinear(bases[0], y0 - 0.5 + (i + 0.5) * bh, x0 - 0.5 + (j + 0.5) * bw)
    # M x M attentions -> R x R (bilinear, separable), softmax over K, weighted sum over K.
    w = _upsample_1d_weights(m, r)
    up = torch.stack([w @ a @ w.T for a in attn.view(k, m, m)])
    soft = up.exp() / up.exp().sum(0, keepdim=True)
    expected = (soft * crop).sum(0)
    torch.testing.assert_close(got, expected)


def test_gt_mask_crops_follow_the_boxes():
    masks = torch.zeros(2, 20, 20, dtype=torch.bool)
    masks[0, 4:12, 2:10] = True  # fills its box: crop all ones
    masks[1, 0:10, 0:20] = True  # the top half of the box (0,0)-(20,20)
    crops = crop_masks(masks, torch.tensor([[2.0, 4.0, 10.0, 12.0], [0.0, 0.0, 20.0, 20.0]]), 4)
    assert crops[0].all()
    assert crops[1, :2].all() and not crops[1, 2:].any()


# -- training --------------------------------------------------------------------------------------

def test_training_proposals_are_the_gt_boxes(monkeypatch):
    model = BlendMask(tiny_cfg("panoptic"), num_classes=6, thing_ids=THINGS).train()
    images, targets = scene(stuff=True)
    pooled, proposals = [], []
    real_pool, real_proposals = bm_model.pool_bases, model.mask_proposals

    def spy_pool(bases, boxes, batch_idx, resolution, stride):
        pooled.append((boxes.clone(), batch_idx.clone(), resolution, stride))
        return real_pool(bases, boxes, batch_idx, resolution, stride)

    def spy_proposals(*args):
        out = real_proposals(*args)
        proposals.append(out)
        return out

    monkeypatch.setattr(bm_model, "pool_bases", spy_pool)
    monkeypatch.setattr(model, "mask_proposals", spy_proposals)
    losses = model.losses(images, targets)
    assert torch.isfinite(losses["loss_mask"]) and losses["loss_mask"] > 0
    # Exactly the thing GT boxes are pooled (the stuff masks are not instances), each from its own image.
    things = [t["masks"][t["labels"] < 4] for t in targets]
    expected = torch.cat([boxes_from_masks(m) for m in things])
    assert len(pooled) == 1
    boxes, batch_idx, resolution, stride = pooled[0]
    torch.testing.assert_close(boxes, expected)
    assert batch_idx.tolist() == [0, 0, 1] and resolution == 16 and stride == 4
    # Every positive location is a proposal with its GT's box; every GT has positives.
    index, prop_boxes, prop_image = proposals[0]
    torch.testing.assert_close(prop_boxes, expected[index])
    assert torch.equal(prop_image, batch_idx[index])
    assert sorted(set(index.tolist())) == [0, 1, 2] and len(index) > 3


def test_losses_finite_and_decrease_when_overfitting_two_images():
    torch.manual_seed(0)
    model = BlendMask(tiny_cfg(), num_classes=6, thing_ids=THINGS).train()
    images, targets = scene()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    totals, mask = [], []
    for _ in range(25):
        losses = model.losses(images, targets)
        assert set(losses) == {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr", "loss_mask", "loss_aux_semantic"}
        assert all(torch.isfinite(v) for v in losses.values())
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(float(total.detach()))
        mask.append(float(losses["loss_mask"].detach()))
    assert sum(totals[-3:]) / 3 < 0.7 * sum(totals[:3]) / 3, totals
    assert mask[-1] < 0.5 * mask[0], mask  # the blender fits the GT masks, not only the detector its boxes


def test_images_without_instances_give_finite_losses_and_gradients_everywhere():
    model = BlendMask(tiny_cfg("panoptic"), num_classes=6, thing_ids=THINGS).train()
    images = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    stuff = torch.ones(1, 64, 64, dtype=torch.bool)
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 64, 64, dtype=torch.bool)},
               {"labels": torch.tensor([5]), "masks": stuff}]  # no things at all; one stuff-only image
    losses = model.losses(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert float(losses["loss_mask"].detach()) == 0.0 and float(losses["loss_fcos_loc"].detach()) == 0.0
    assert float(losses["loss_fcos_cls"].detach()) > 0 and float(losses["loss_stuff"].detach()) > 0
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing  # DDP without find_unused_parameters needs every parameter in the graph


def test_variants_build_the_configured_heads():
    std = BlendMask(tiny_cfg(), num_classes=6, thing_ids=THINGS)
    rt = BlendMask(tiny_cfg("rt"), num_classes=6, thing_ids=THINGS)
    assert std.strides == [8, 16, 32, 64, 128] and rt.strides == [8, 16, 32, 64]
    levels = rt.eval().network(torch.zeros(1, 3, 64, 64))["logits"]
    assert [tuple(x.shape[-2:]) for x in levels] == [(8, 8), (4, 4), (2, 2), (1, 1)]
    assert len(std.head.cls_tower.convs) == 4 and len(std.head.box_tower.convs) == 4
    assert len(std.head.share_tower.convs) == 0 and isinstance(std.head.cls_tower.norms[0][0], torch.nn.GroupNorm)
    assert len(rt.head.share_tower.convs) == 3 and len(rt.head.cls_tower.convs) == 0
    assert len(rt.head.share_tower.norms[0]) == 4  # one BatchNorm per level
    assert std.head.top_layer.out_channels == 4 * 14 * 14 and rt.head.top_layer.out_channels == 4 * 7 * 7
    assert len(std.basis.tower) == 3 and len(rt.basis.tower) == 2
    assert std.tasks == ("instance",) and std.stuff_head is None
    pan = BlendMask(tiny_cfg("panoptic"), num_classes=6, thing_ids=THINGS)
    assert pan.tasks == ("panoptic", "instance", "semantic")
    assert pan.stuff_head.logits.out_channels == 3  # stuff 4, 5 + "things"
    assert pan.head.cls_logits.out_channels == 4
    with pytest.raises(ValueError, match="variant"):
        BlendMask(tiny_cfg("fast"), num_classes=6, thing_ids=THINGS)


# -- inference -------------------------------------------------------------------------------------

def _reference_paste(masks: torch.Tensor, boxes: torch.Tensor, size) -> torch.Tensor:
    """detectron2's _do_paste_mask, one instance at a time over the whole image."""
    h, w = size
    out = []
    for m, (x0, y0, x1, y1) in zip(masks, boxes.tolist()):
        ys = (torch.arange(h) + 0.5 - y0) / (y1 - y0) * 2 - 1
        xs = (torch.arange(w) + 0.5 - x0) / (x1 - x0) * 2 - 1
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        out.append(F.grid_sample(m[None, None], torch.stack([gx, gy], -1)[None], align_corners=False)[0, 0])
    return torch.stack(out)


def test_batched_paste_equals_per_instance_paste():
    torch.manual_seed(0)
    masks = torch.rand(6, 8, 8)
    boxes = torch.tensor([[3.0, 2.0, 20.0, 15.0], [-5.0, -3.0, 10.0, 12.0], [20.0, 30.0, 40.0, 45.0],
                          [0.0, 0.0, 29.0, 37.0], [10.2, 11.7, 11.9, 13.1], [5.5, 6.25, 17.75, 30.5]])
    size = (37, 29)
    got = paste_masks(masks, boxes, size)
    ref = _reference_paste(masks, boxes, size)
    assert got.shape == (6, 37, 29)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    binary = paste_masks(masks, boxes, size, threshold=0.5)
    assert binary.dtype == torch.bool
    undecided = (ref - 0.5).abs() < 1e-5
    assert torch.equal(binary[~undecided], (ref >= 0.5)[~undecided]) and binary.any()
    assert paste_masks(masks[:0], boxes[:0], size, 0.5).shape == (0, 37, 29)


def test_predict_formats_at_another_output_size():
    torch.manual_seed(0)
    model = BlendMask(tiny_cfg(test={"score_threshold": 0.0, "detections_per_image": 7}), 6, THINGS).eval()
    images, _ = scene()
    image_sizes, output_sizes = [(64, 64), (48, 56)], [(100, 90), (30, 40)]
    preds = model.predict(images, image_sizes, output_sizes, return_raw=True)
    assert len(preds) == 2
    for pred, (h, w), (oh, ow) in zip(preds, image_sizes, output_sizes):
        inst = pred["instances"]
        n = inst["masks"].shape[0]
        assert n == 7 and inst["masks"].dtype == torch.bool and inst["masks"].shape == (n, oh, ow)
        assert inst["labels"].dtype == torch.int64 and inst["labels"].shape == (n,)
        assert set(inst["labels"].tolist()) <= set(THINGS)
        assert inst["scores"].dtype == torch.float32 and bool((inst["scores"][:-1] >= inst["scores"][1:]).all())
        assert bool(((inst["scores"] > 0) & (inst["scores"] <= 1)).all())
        boxes = inst["boxes"]
        assert boxes.dtype == torch.float32 and boxes.shape == (n, 4)
        assert bool((boxes[:, 2] >= boxes[:, 0]).all() & (boxes[:, 3] >= boxes[:, 1]).all())
        assert float(boxes[:, [0, 2]].max()) <= ow and float(boxes[:, [1, 3]].max()) <= oh and float(boxes.min()) >= 0
        raw = pred["raw"]  # detector boxes live in the un-padded input; the output scales them
        assert float(raw["boxes"][:, [0, 2]].max()) <= w and float(raw["boxes"][:, [1, 3]].max()) <= h
        torch.testing.assert_close(boxes, raw["boxes"] * torch.tensor([ow / w, oh / h, ow / w, oh / h]))
        expected = paste_masks(raw["mask_logits"].sigmoid(), boxes, (oh, ow), 0.5)
        assert torch.equal(inst["masks"], expected)
    # The default output size is the image size.
    assert model.predict(images, image_sizes)[1]["instances"]["masks"].shape[1:] == (48, 56)
    with pytest.raises(ValueError, match="instance"):
        model.predict(images, image_sizes, tasks=("semantic",))
    model.test_cfg.score_threshold = 1.1  # nothing passes: empty, well-formed outputs
    empty = model.predict(images, image_sizes, output_sizes)[1]["instances"]
    assert empty["masks"].shape == (0, 30, 40) and empty["masks"].dtype == torch.bool
    assert empty["boxes"].shape == (0, 4) and empty["labels"].dtype == torch.int64 and empty["scores"].shape == (0,)


def test_mask_branch_runs_once_per_batch_whatever_the_number_of_detections(monkeypatch):
    """What keeps inference time flat in the number of instances: one RoIAlign and one blend per batch,
    one paste per image, for 3 or 60 detections alike."""
    model = BlendMask(tiny_cfg(test={"score_threshold": 0.0}), 6, THINGS).eval()
    images, _ = scene()
    calls = {}
    for name in ("pool_bases", "blend", "paste_masks"):
        real = getattr(bm_model, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(bm_model, name, spy)
    counts = []
    for d in (3, 60):
        model.test_cfg.detections_per_image = d
        calls.clear()
        preds = model.predict(images, [(64, 64), (64, 64)])
        assert [p["instances"]["masks"].shape[0] for p in preds] == [d, d]
        counts.append(dict(calls))
    assert counts[0] == counts[1] == {"pool_bases": 1, "blend": 1, "paste_masks": 2}


def test_panoptic_variant_predicts_all_three_formats():
    torch.manual_seed(0)
    test = {"score_threshold": 0.0, "detections_per_image": 5, "instance_score_threshold": 0.0,
            "stuff_area_threshold": 1}
    model = BlendMask(tiny_cfg("panoptic", test=test), 6, THINGS).eval()
    with torch.no_grad():  # an untrained model's boxes are points: give them extent, masks and stuff
        model.head.bbox_pred.bias.fill_(1.5)
        model.basis.bases.bias.fill_(2.0)
        model.stuff_head.logits.bias.copy_(torch.tensor([-4.0, 4.0, 0.0]))
    images, _ = scene(stuff=True)
    preds = model.predict(images, [(64, 64), (48, 56)], [(50, 70), (48, 56)],
                          tasks=("panoptic", "instance", "semantic"))
    for pred, (oh, ow) in zip(preds, [(50, 70), (48, 56)]):
        pan = pred["panoptic"]
        seg, infos = pan["segment_map"], pan["segments_info"]
        assert seg.dtype == torch.int64 and seg.shape == (oh, ow)
        assert all(set(s) == {"id", "category", "isthing", "score"} for s in infos)
        assert {int(i) for i in torch.unique(seg).tolist()} - {0} == {s["id"] for s in infos}
        assert all(s["isthing"] == (s["category"] in THINGS) for s in infos)
        assert any(not s["isthing"] for s in infos) and any(s["isthing"] for s in infos)
        sem = pred["semantic"]
        assert sem.dtype == torch.int64 and sem.shape == (oh, ow) and 0 <= int(sem.min()) and int(sem.max()) < 6
        for s in infos:  # the semantic map agrees with every panoptic segment
            assert bool((sem[seg == s["id"]] == s["category"]).all())
        assert pred["instances"]["masks"].shape[1:] == (oh, ow)
    only = model.predict(images, [(64, 64)] * 2, tasks=("instance",))[0]
    assert set(only) == {"instances"}


def test_panoptic_merge_hand_case():
    h = w = 10
    masks = torch.zeros(6, h, w, dtype=torch.bool)
    masks[0, 0:5, 0:5] = True   # A .9: first, 25 px
    masks[1, 1:5, 1:5] = True   # B .8: inside A, 100% taken > 0.5: dropped
    masks[2, 3:7, 3:7] = True   # C .7: 4 of 16 px taken (25%): kept with its 12 free px
    masks[3, 0:2, 7:10] = True  # F .65: free, 6 px
    masks[4, 0:4, 7:10] = True  # E .6: 6 of 12 px taken by F (50%, not > 0.5): kept with the other 6
    masks[5, 8:10, 0:3] = True  # D .3: below the score threshold: dropped
    scores = torch.tensor([0.9, 0.8, 0.7, 0.65, 0.6, 0.3])
    labels = torch.tensor([0, 1, 2, 1, 3, 1])
    stuff_map = torch.ones(h, w, dtype=torch.int64)  # stuff class 4 (j = 1) ...
    stuff_map[9, :] = 2                              # ... stuff class 5 (j = 2) on the last row: 10 px
    stuff_map[7:9, 8:10] = 0                         # "things" without an instance: stays void
    seg, infos = combine_panoptic(masks, scores, labels, stuff_map, None, [4, 5], overlap_threshold=0.5,
                                  stuff_area_threshold=11, instance_score_threshold=0.5)
    assert [(s["id"], s["category"], s["isthing"]) for s in infos] == [
        (1, 0, True), (2, 2, True), (3, 1, True), (4, 3, True), (5, 4, False)]
    assert [s["score"] for s in infos] == pytest.approx([0.9, 0.7, 0.65, 0.6, 1.0])
    expected = torch.full((h, w), 5, dtype=torch.int64)  # stuff 4 fills the free pixels (37 >= 11)
    expected[9, :] = 0                                   # stuff 5: 10 px < 11 -> void
    expected[7:9, 8:10] = 0
    expected[3:7, 3:7] = 2
    expected[0:5, 0:5] = 1
    expected[0:2, 7:10] = 3
    expected[2:4, 7:10] = 4
    assert torch.equal(seg, expected)
    # With a stuff area threshold of 10 the last row becomes a stuff-5 segment; its score is the mean probability.
    probs = torch.zeros(3, h, w)
    probs[2] = 0.75
    seg2, infos2 = combine_panoptic(masks, scores, labels, stuff_map, probs, [4, 5], stuff_area_threshold=10)
    assert infos2[-1]["category"] == 5 and infos2[-1]["score"] == pytest.approx(0.75)
    assert torch.equal(seg2 == infos2[-1]["id"], stuff_map == 2)


# -- engine ----------------------------------------------------------------------------------------

TINY_OVERRIDES = ["model.backbone_kwargs={layers: [1, 1, 1, 1], channels: [16, 32, 64, 64]}",
                  "model.fpn_channels=32", "model.blendmask.basis_channels=16", "model.blendmask.bottom_resolution=16"]


def test_engine_trains_and_evaluates_the_blendmask_demo_presets(synth_root, tmp_path):
    from omniseg.engine.trainer import train

    for preset in ("blendmask_demo", "blendmask_rt_demo", "blendmask_panoptic_demo"):
        cfg = load_config(preset, [*TINY_OVERRIDES, f"data.train.root={synth_root}", f"data.val.root={synth_root}",
                                   "data.crop_size=64", "data.batch_size=2", "data.num_workers=0",
                                   "train.max_iters=2", "train.eval_period=2", f"train.output_dir={tmp_path / preset}",
                                   "train.log_period=1",
                                   "model.blendmask.test.score_threshold=0.0"])  # detections even untrained
        assert cfg.model.arch == "blendmask"
        result = train(cfg, progress=False)
        assert 0.0 <= result["AP"] <= 100.0, preset
        if preset == "blendmask_panoptic_demo":
            assert 0.0 <= result["PQ"] <= 100.0
        assert (tmp_path / preset / "model_final.safetensors").is_file()
        if preset == "blendmask_demo":  # the CLI writes COCO results and overlays for the trained model
            from typer.testing import CliRunner

            from omniseg.cli import app

            out = tmp_path / "pred"
            res = CliRunner().invoke(app, ["predict", "-w", str(tmp_path / preset / "model_final.safetensors"),
                                           "-i", str(synth_root / "val" / "images"), "-o", str(out)])
            assert res.exit_code == 0, res.output
            import json

            results = json.loads((out / "instances_results.json").read_text())
            assert results and {"image_id", "category_id", "segmentation", "score"} <= set(results[0])
            assert list((out / "overlay").glob("*_instances.png"))
