"""Mask R-CNN / PANet (omniseg.models.rcnn): PANet's components against hand computations, training on
hand-built images, the predict contract, and the demo presets through the engine."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.ops import roi_align

from omniseg.config import load_config
from omniseg.models.rcnn.model import BatchOnlyTransform, LevelRoIAlign, RCNNSegmenter
from omniseg.models.rcnn.panet import AdaptiveRoIAlign, AdaptiveTwoMLPHead, BottomUpPath, FusedMaskHead
from omniseg.models.registry import build_model

NAMES, STRIDES = ["n2", "n3", "n4", "n5"], [4, 8, 16, 32]


def tiny_cfg(arch: str, **extra) -> dict:
    """A model that trains in well under a second per step on 64 px images."""
    cfg = {
        "arch": arch, "backbone": "resnet18", "backbone_norm": "bn",
        "backbone_kwargs": {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 64]},
        "fpn_dim": 32,
        "rpn": {"anchor_sizes": [8, 16, 32, 64, 128], "batch_size_per_image": 64, "pre_nms_topk_train": 300,
                "post_nms_topk_train": 100, "pre_nms_topk_test": 200, "post_nms_topk_test": 50},
        "roi": {"batch_size_per_image": 64, "box_head_dim": 64, "mask_head_dim": 32},
    }
    cfg.update(extra)
    return cfg


def hand_built_batch():
    """Two 64 px images: image 0 has a red square (class 0) and a blue disc (class 2), image 1 a green bar
    (class 1); background grey. Returns uint8 images and engine-style targets."""
    images = torch.full((2, 3, 64, 64), 100, dtype=torch.uint8)
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    square = (yy >= 8) & (yy < 28) & (xx >= 6) & (xx < 26)
    disc = (yy - 44) ** 2 + (xx - 42) ** 2 < 12 ** 2
    bar = (yy >= 20) & (yy < 44) & (xx >= 10) & (xx < 54)
    for img, mask, color in ((0, square, (230, 30, 30)), (0, disc, (30, 30, 230)), (1, bar, (30, 230, 30))):
        for c in range(3):
            images[img, c][mask] = color[c]
    targets = [{"labels": torch.tensor([0, 2]), "masks": torch.stack([square, disc])},
               {"labels": torch.tensor([1]), "masks": bar[None]}]
    return images, targets


# -- PANet components ----------------------------------------------------------------------------

def test_adaptive_pooling_is_max_over_levels_of_per_level_fc_and_uses_every_level():
    torch.manual_seed(0)
    channels, size = 2, 3
    pool = AdaptiveRoIAlign(NAMES, STRIDES, size, sampling_ratio=2)
    head = AdaptiveTwoMLPHead(len(NAMES), channels * size * size, representation_size=5)
    # Four RoIs in a 64 px image; level l carries a bright blob exactly where RoI l lies (in its own stride's
    # coordinates), so RoI l's strongest response is on level l only if each level is pooled at its own scale.
    boxes = torch.tensor([[4.0, 4, 20, 20], [40, 4, 60, 20], [4, 40, 28, 60], [36, 36, 60, 60]])
    feats = {}
    for level, (name, stride) in enumerate(zip(NAMES, STRIDES)):
        f = torch.rand(1, channels, 64 // stride, 64 // stride) * 0.1
        x1, y1, x2, y2 = (boxes[level] / stride).tolist()
        m = 1 if stride < 32 else 0  # one cell of margin, except on the 2x2 top level
        f[..., max(0, int(y1) - m):int(y2) + 1 + m, max(0, int(x1) - m):int(x2) + 1 + m] += 5.0
        feats[name] = f
    with torch.no_grad():
        for fc in head.fc6:  # fc6 = channel-and-bin mean: the pooled response, the same in every output unit
            fc.weight.fill_(1.0 / (channels * size * size))
            fc.bias.zero_()
    pooled = pool(feats, [boxes], [(64, 64)])
    assert pooled.shape == (4, 4, channels, size, size)  # [levels, RoIs, C, S, S]

    # Reference: torchvision's roi_align on each level at 1/stride (aligned, ratio 2), own fc6, max, fc7.
    rois = torch.cat([torch.zeros(4, 1), boxes], dim=1)
    per_level = torch.stack([
        F.relu(fc(roi_align(feats[n], rois, size, spatial_scale=1.0 / s, sampling_ratio=2, aligned=True).flatten(1)))
        for n, s, fc in zip(NAMES, STRIDES, head.fc6)])
    torch.testing.assert_close(pooled, torch.stack([roi_align(feats[n], rois, size, 1.0 / s, 2, True)
                                                    for n, s in zip(NAMES, STRIDES)]))
    assert per_level[..., 0].argmax(0).tolist() == [0, 1, 2, 3]  # every level wins for one RoI
    assert per_level[..., 0].max(0).values.min() > 4.0  # ... with the blob's full response
    torch.testing.assert_close(head.fuse(pooled), per_level.max(0).values)
    torch.testing.assert_close(head(pooled), F.relu(head.fc7(per_level.max(0).values)))

    # Random weights too, and every level's own fc6 receives gradient through the max.
    torch.nn.init.normal_(head.fc6[2].weight)
    out = head(pooled)
    expected = torch.stack([F.relu(fc(p.flatten(1))) for fc, p in zip(head.fc6, pooled)]).max(0).values
    torch.testing.assert_close(out, F.relu(head.fc7(expected)))
    out.sum().backward()
    assert all(fc.weight.grad.abs().sum() > 0 for fc in head.fc6)


def test_fc_fusion_adds_the_class_agnostic_fc_mask_to_every_class():
    torch.manual_seed(0)
    levels, cin, classes, dim, res = 3, 6, 4, 8, 5
    head = FusedMaskHead(levels, cin, classes, dim=dim, resolution=res).eval()
    for p in head.fc.parameters():  # make the fc term clearly non-zero after its ReLU
        torch.nn.init.normal_(p, std=0.5)
    assert head.conv5_fc.out_channels == dim // 2 and head.fc.in_features == dim // 2 * res * res
    assert head.fc.out_features == (2 * res) ** 2
    seen = {}
    head.predictor.register_forward_hook(lambda m, i, o: seen.__setitem__("fcn", o))
    head.fc.register_forward_hook(lambda m, i, o: seen.__setitem__("fc", o))
    head.conv3.register_forward_hook(lambda m, i, o: seen.__setitem__("conv3", o))
    x = torch.randn(levels, 7, cin, res, res)
    out = head(x)
    assert out.shape == (7, classes, 2 * res, 2 * res)
    # Output = FCN logits + ReLU(fc) reshaped to 2S x 2S, the same map added to every class.
    fc_map = F.relu(seen["fc"]).view(7, 1, 2 * res, 2 * res)
    torch.testing.assert_close(out, seen["fcn"] + fc_map.expand(-1, classes, -1, -1))
    assert (fc_map > 0).any()
    diff = out - seen["fcn"]
    torch.testing.assert_close(diff, diff[:, :1].expand_as(diff))

    # Whole head by hand: per-level conv1 -> max -> conv2..4 -> deconv -> 1x1; fc branch from conv3.
    h = torch.stack([F.relu(c(lv)) for c, lv in zip(head.conv1, x)]).max(0).values
    c3 = F.relu(head.conv3(F.relu(head.conv2(h))))
    torch.testing.assert_close(c3, F.relu(seen["conv3"]))
    fcn = head.predictor(F.relu(head.deconv(F.relu(head.conv4(c3)))))
    branch = F.relu(head.conv5_fc(F.relu(head.conv4_fc(c3))))
    fc = F.relu(head.fc(branch.flatten(1))).view(7, 1, 2 * res, 2 * res)
    torch.testing.assert_close(out, fcn + fc)
    plain = FusedMaskHead(levels, cin, classes, dim=dim, resolution=res, fc_fusion=False)
    plain.load_state_dict(head.state_dict(), strict=False)
    torch.testing.assert_close(plain(x), fcn)


def test_bottom_up_path_follows_the_formula_and_keeps_fpn_strides():
    torch.manual_seed(0)
    path = BottomUpPath(channels=8, num_levels=4)
    p = [torch.randn(2, 8, 64 // s, 96 // s) for s in STRIDES]
    n = path(p)
    assert n[0] is p[0]  # N2 = P2
    assert [tuple(t.shape) for t in n] == [tuple(t.shape) for t in p]
    for i in range(3):  # N_{i+1} = ReLU(conv3x3(ReLU(conv3x3_s2(N_i)) + P_{i+1}))
        expected = F.relu(path.fuse[i](F.relu(path.down[i](n[i])) + p[i + 1]))
        torch.testing.assert_close(n[i + 1], expected)
        assert path.down[i].stride == (2, 2) and path.fuse[i].stride == (1, 1)

    for arch, prefix in (("panet", "n"), ("maskrcnn", "p")):
        model = RCNNSegmenter(tiny_cfg(arch), num_classes=3).eval()
        with torch.no_grad():
            feats = model.detector.backbone(torch.randn(1, 3, 64, 96))
        assert list(feats) == [f"{prefix}{k}" for k in (2, 3, 4, 5)] + ["pool"]
        assert [tuple(f.shape[-2:]) for f in feats.values()] == [(-(-64 // s), -(-96 // s)) for s in (4, 8, 16, 32, 64)]
        assert all(f.shape[1] == 32 for f in feats.values())
        assert (model.detector.backbone.bottom_up is not None) == (arch == "panet")
        assert isinstance(model.detector.roi_heads.box_roi_pool,
                          AdaptiveRoIAlign if arch == "panet" else LevelRoIAlign)


def test_level_pooler_uses_the_fpn_level_of_each_box():
    torch.manual_seed(0)
    pool = LevelRoIAlign(NAMES, STRIDES, 7, sampling_ratio=2, aligned=True)
    feats = {n: torch.randn(1, 4, 512 // s, 512 // s) for n, s in zip(NAMES, STRIDES)}
    # sqrt(area) 224 -> level 4 (canonical), 112 -> 3, 40 -> 2 (clamped from lower), 480 -> 5
    boxes = torch.tensor([[10.0, 10, 234, 234], [0, 0, 112, 112], [5, 5, 45, 45], [0, 0, 480, 480]])
    out = pool(feats, [boxes], [(512, 512)])
    rois = torch.cat([torch.zeros(4, 1), boxes], 1)
    for i, level in enumerate([2, 1, 0, 3]):
        ref = roi_align(feats[NAMES[level]], rois[i:i + 1], 7, 1.0 / STRIDES[level], 2, True)
        torch.testing.assert_close(out[i:i + 1], ref)


# -- the segmenter --------------------------------------------------------------------------------

def test_registry_builds_both_archs_and_the_transform_only_batches():
    for arch in ("maskrcnn", "panet"):
        model = build_model(tiny_cfg(arch), num_classes=3)
        assert isinstance(model, RCNNSegmenter) and model.arch == arch
        assert isinstance(model.detector.transform, BatchOnlyTransform)
    with pytest.raises(ValueError, match="model.arch must be one of 'maskrcnn', 'panet', got 'fasterrcnn'"):
        RCNNSegmenter(tiny_cfg("fasterrcnn"), num_classes=3)
    image = torch.randn(3, 50, 70)
    batch, _ = BatchOnlyTransform(32)([image])
    assert batch.image_sizes == [(50, 70)] and batch.tensors.shape == (1, 3, 64, 96)
    torch.testing.assert_close(batch.tensors[0, :, :50, :70], image)  # no resize, no re-normalisation
    assert batch.tensors[0, :, 50:].abs().sum() == 0
    frozen = RCNNSegmenter(tiny_cfg("maskrcnn", backbone_freeze_at=2), num_classes=3)
    body = frozen.backbone.body
    assert not any(p.requires_grad for m in (body.conv1, body.layer1) for p in m.parameters())
    assert all(p.requires_grad for p in body.layer2.parameters())


@pytest.mark.parametrize("arch", ["maskrcnn", "panet"])
def test_losses_are_finite_and_fall_when_overfitting_two_images(arch):
    torch.manual_seed(0)
    images, targets = hand_built_batch()
    model = RCNNSegmenter(tiny_cfg(arch), num_classes=3).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    history = []
    for _ in range(25):
        losses = model(images, targets)
        assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
        assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in losses.items()})
    first = sum(sum(h.values()) for h in history[:3]) / 3
    last = sum(sum(h.values()) for h in history[-3:]) / 3
    assert last < 0.6 * first, (first, last)
    for key in ("loss_objectness", "loss_classifier", "loss_mask"):
        assert sum(h[key] for h in history[-3:]) < sum(h[key] for h in history[:3]), key

    # Images without instances: background-only targets, zero mask and box-regression losses.
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 64, 64, dtype=torch.bool)}] * 2
    losses = model(images, empty)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"].item() == 0.0 and losses["loss_box_reg"].item() == 0.0
    assert losses["loss_rpn_box_reg"].item() == 0.0 and losses["loss_classifier"].item() > 0
    sum(losses.values()).backward()  # still differentiable
    mixed = model(images, [targets[0], empty[0]])
    assert all(torch.isfinite(v) for v in mixed.values()) and mixed["loss_mask"].item() > 0
    with pytest.raises(ValueError, match="labels must be in"):
        model(images, [{"labels": torch.tensor([3]), "masks": targets[1]["masks"]}, targets[1]])


@pytest.mark.parametrize("arch", ["maskrcnn", "panet"])
def test_predict_returns_instances_at_the_output_size(arch):
    torch.manual_seed(0)
    model = RCNNSegmenter(tiny_cfg(arch, test={"detections_per_img": 30}), num_classes=3).eval()
    images, _ = hand_built_batch()
    images[1, :, :, 48:] = 0  # image 1 is 64x48 inside the padded 64x64 batch
    image_sizes, output_sizes = [(64, 64), (64, 48)], [(96, 80), (128, 96)]
    preds = model.predict(images, image_sizes, output_sizes, return_raw=True)
    assert len(preds) == 2
    for pred, (h, w), (oh, ow) in zip(preds, image_sizes, output_sizes):
        inst = pred["instances"]
        n = inst["masks"].shape[0]
        assert 0 < n <= 30  # untrained: near-uniform class scores are above the 0.05 threshold
        assert inst["masks"].dtype == torch.bool and inst["masks"].shape == (n, oh, ow)
        assert inst["labels"].dtype == torch.int64 and inst["labels"].shape == (n,)
        assert int(inst["labels"].min()) >= 0 and int(inst["labels"].max()) < 3  # 0-based, no background
        assert inst["scores"].dtype == torch.float32 and bool((inst["scores"] >= 0.05).all())
        assert bool((inst["scores"] <= 1).all()) and bool((inst["scores"][:-1] >= inst["scores"][1:]).all())
        boxes = inst["boxes"]
        assert boxes.dtype == torch.float32 and boxes.shape == (n, 4)
        raw = pred["raw"]
        # Boxes detected at the input size (clipped to the unpadded image), scaled to the output size.
        assert float(raw["boxes"][:, 2].max()) <= w and float(raw["boxes"][:, 3].max()) <= h
        scale = torch.tensor([ow / w, oh / h, ow / w, oh / h])
        torch.testing.assert_close(boxes, raw["boxes"] * scale)
        torch.testing.assert_close(inst["labels"], raw["labels"])
        # Masks: the 28x28 probabilities pasted into the scaled boxes at the output size, > 0.5.
        pasted = paste_masks_in_image(raw["mask_probs"][:, None], boxes, (oh, ow))[:, 0] > 0.5
        assert torch.equal(inst["masks"], pasted)
    # Default output size = image size; no detection above a score threshold of 1; only "instance".
    default = model.predict(images, image_sizes)
    assert default[1]["instances"]["masks"].shape[1:] == (64, 48)
    none = RCNNSegmenter(tiny_cfg(arch, test={"score_thresh": 1.0}), num_classes=3).eval()
    inst = none.predict(images, image_sizes, output_sizes)[0]["instances"]
    assert inst["masks"].shape == (0, 96, 80) and inst["masks"].dtype == torch.bool and inst["labels"].numel() == 0
    with pytest.raises(ValueError, match="predicts instance, not panoptic"):
        model.predict(images, image_sizes, tasks=("panoptic",))
    model.train()  # predict picks the inference branch even when called in training mode
    assert model.predict(images, image_sizes)[0]["instances"]["masks"].shape[1:] == (64, 64)


def test_engine_trains_and_evaluates_the_demo_presets(synth_root, tmp_path):
    from omniseg.api import Predictor
    from omniseg.engine.trainer import train

    for preset, arch in (("maskrcnn_demo", "maskrcnn"), ("panet_demo", "panet")):
        cfg = load_config(preset, [
            f"data.train.root={synth_root}", f"data.val.root={synth_root}", "data.crop_size=64",
            "data.batch_size=2", "data.num_workers=0", "train.max_iters=2", "train.eval_period=2",
            f"train.output_dir={tmp_path / preset}", "train.log_period=1",
            "model.backbone_kwargs={layers: [1, 1, 1, 1], channels: [16, 32, 64, 64]}", "model.fpn_dim=32",
            "model.roi.box_head_dim=64", "model.roi.mask_head_dim=32"])
        assert cfg.model.arch == arch and cfg.task == "instance" and list(cfg.eval_tasks) == ["instance"]
        result = train(cfg, progress=False)
        assert 0.0 <= result["AP"] <= 100.0, preset
        # The saved weights reload strictly through the public API and predict instances at the image size.
        predictor = Predictor(tmp_path / preset / "model_final.safetensors", device="cpu")
        assert predictor.tasks == ["instance"] and predictor.model.arch == arch
        pred = predictor.predict_batch([torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8)])[0]
        assert pred["instances"]["masks"].shape[1:] == (40, 56)


@pytest.mark.parametrize("switches", [{"bottom_up": False}, {"adaptive_pooling": False}, {"fc_fusion": False},
                                      {"fusion_relu": False}])
def test_panet_ablation_switches_build_train_and_predict(switches):
    torch.manual_seed(0)
    model = RCNNSegmenter(tiny_cfg("panet", panet=switches), num_classes=3)
    detector = model.detector
    assert (detector.backbone.bottom_up is None) == (switches.get("bottom_up") is False)
    assert isinstance(detector.roi_heads.box_roi_pool,
                      LevelRoIAlign if switches.get("adaptive_pooling") is False else AdaptiveRoIAlign)
    head = detector.roi_heads.mask_head
    head = getattr(head, "head", head)  # without adaptive pooling the fused head sees one level
    assert isinstance(head, FusedMaskHead) and head.fc_fusion == (switches.get("fc_fusion") is not False)
    images, targets = hand_built_batch()
    losses = model.train()(images, targets)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_mask"].item() > 0
    sum(losses.values()).backward()
    inst = model.eval().predict(images, [(64, 64)] * 2, [(32, 32)] * 2)[0]["instances"]
    assert inst["masks"].shape[1:] == (32, 32) and inst["masks"].shape[0] == inst["scores"].shape[0]


def test_backbone_multiplier_reaches_the_wrapped_backbone():
    from omniseg.engine.optim import build_optimizer

    model = build_model(tiny_cfg("maskrcnn"), num_classes=3)
    opt = build_optimizer(model, {"lr": 1e-3, "weight_decay": 0.05, "backbone_multiplier": 0.1})
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    backbone = {id(p) for p in model.backbone.parameters() if p.requires_grad}
    assert backbone and all(lr_of[i] == pytest.approx(1e-4) for i in backbone)
    others = [lr for i, lr in lr_of.items() if i not in backbone]
    assert others and all(lr == pytest.approx(1e-3) for lr in others)
