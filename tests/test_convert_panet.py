"""omniseg convert --from panet: the released PyTorch PANet mask model (Detectron.pytorch, e2e_panet_R-50-FPN_2x_mask).

Layout: tests/fixtures/checkpoint_layouts/panet_r50_fpn_2x_mask.json (every tensor, from the official modules).
A random checkpoint in that layout, saved as the official tools/train_net_step.py saves it, converts with nothing
unmapped or missing and predicts; the GroupNorm FPN + bottom-up path, the conv box head and the GN mask head are
checked against the official computation written out here with torch.nn.functional on the checkpoint's own tensors,
and the legacy geometry (anchors, box coding, clipping, RoIAlign) against values computed by hand from Detectron's
formulas."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch.nn import functional as F
from torchvision.ops import roi_align
from typer.testing import CliRunner

from helpers.checkpoint_layouts import load_layout, random_state_dict, write_torch_checkpoint
from omniseg.api import Predictor, load_model
from omniseg.cli import app
from omniseg.hub.convert import convert
from omniseg.hub.errors import CheckpointError
from omniseg.models.rcnn.model import LegacyAnchorGenerator, LegacyBoxCoder, RCNNSegmenter, legacy_cell_anchors

LAYOUT = "panet_r50_fpn_2x_mask"


def _checkpoint(tmp_path, sd):
    """The official save_ckpt wrapping (tools/train_net_step.py)."""
    return write_torch_checkpoint(tmp_path / "panet.pth", sd, "model", step=179999, train_size=117266,
                                  batch_size=16, optimizer={"state": {}, "param_groups": []})


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("panet")
    sd = random_state_dict(load_layout(LAYOUT))
    # GroupNorm scales near 1 (as trained ones), so values do not vanish through the stacked heads
    sd = {k: (v + 1.0 if k.endswith(".1.weight") and v.dim() == 1 else v) for k, v in sd.items()}
    sd["Box_Outs.cls_score.bias"][1] = 10.0  # Detectron's class 1 (person, omniseg's 0) scores above threshold
    path = _checkpoint(tmp_path, sd)
    with pytest.warns(UserWarning, match="no RPN minimum proposal size"):
        report = convert(path, "panet", "panet_r50", tmp_path / "p.safetensors", classes="coco")
    model, cfg, meta = load_model(tmp_path / "p.safetensors")
    return {"sd": sd, "report": report, "model": model.eval(), "cfg": cfg, "meta": meta,
            "path": tmp_path / "p.safetensors"}


def test_every_tensor_of_the_release_converts_and_the_config_follows_it(converted):
    report, model, cfg, sd = converted["report"], converted["model"], converted["cfg"], converted["sd"]
    assert report["unmapped"] == [] and report["missing"] == [] and report["ignored"] == {}
    # 273 tensors + running mean/var for each of the 53 AffineChannel2d norms
    assert len(sd) == 273 and report["mapped"] == 273 + 2 * 53
    m = cfg.model
    assert (m.arch, m.backbone, m.backbone_norm, m.fpn_norm, m.roi.head_norm) == ("panet", "resnet50", "frozen_bn",
                                                                                   "gn", "gn")
    assert (m.roi.box_head, m.roi.box_head_convs, m.roi.box_head_dim, m.roi.aligned, m.roi.box_geometry) == \
        ("conv_fc", 4, 1024, False, "legacy")
    assert m.rpn.anchors == "detectron_legacy" and m.backbone_kwargs.stride_in_1x1 is True
    assert list(m.pixel_mean) == [122.7717, 115.9465, 102.9801] and list(m.pixel_std) == [1.0, 1.0, 1.0]
    assert cfg.data.min_size_test == 1000 and converted["meta"].num_classes == 80
    state = model.state_dict()
    body = "detector.backbone.body.body."
    assert torch.equal(state[body + "conv1.weight"], sd["Conv_Body.conv_body.res1.conv1.weight"].flip(1))
    assert torch.equal(state[body + "layer3.5.bn2.weight"], sd["Conv_Body.conv_body.res4.5.bn2.weight"])
    assert torch.equal(state[body + "layer4.0.downsample.1.bias"], sd["Conv_Body.conv_body.res5.0.downsample.1.bias"])
    assert model.detector.backbone.body.body.layer2[0].conv1.stride == (2, 2)  # MSRA: stride in the 1x1
    # AffineChannel2d as frozen BN: exactly x * weight + bias
    bn = model.detector.backbone.body.body.bn1
    x = torch.randn(1, 64, 3, 3)
    expected = x * sd["Conv_Body.conv_body.res1.bn1.weight"].view(1, -1, 1, 1) + \
        sd["Conv_Body.conv_body.res1.bn1.bias"].view(1, -1, 1, 1)
    assert torch.allclose(bn(x), expected, atol=1e-6)
    # background first in both: no permutation
    assert torch.equal(state["detector.roi_heads.box_predictor.cls_score.weight"], sd["Box_Outs.cls_score.weight"])
    assert torch.equal(state["detector.roi_heads.mask_head.predictor.bias"], sd["Mask_Outs.classify.bias"])


def _conv_gn(x, sd, prefix, stride=1, conv_bias=False, relu=True):
    """Detectron.pytorch's nn.Sequential(conv, GroupNorm(32), [ReLU]) written out."""
    w = sd[prefix + ".0.weight"]
    y = F.conv2d(x, w, sd[prefix + ".0.bias"] if conv_bias else None, stride=stride, padding=w.shape[-1] // 2)
    y = F.group_norm(y, 32, sd[prefix + ".1.weight"], sd[prefix + ".1.bias"], eps=1e-5)
    return F.relu(y) if relu else y


def test_gn_fpn_and_bottom_up_path_compute_the_official_forward(converted):
    sd, model = converted["sd"], converted["model"]
    backbone = model.detector.backbone
    g = torch.Generator().manual_seed(1)
    feats = OrderedDict((n, torch.randn(1, c, s, s, generator=g)) for n, c, s in
                        (("res2", 256, 16), ("res3", 512, 8), ("res4", 1024, 4), ("res5", 2048, 2)))
    with torch.no_grad():
        ours = list(backbone.fpn(feats).values())
        ours = backbone.bottom_up(ours)
    c = list(feats.values())[::-1]  # res5..res2, the official order
    inner = [_conv_gn(c[0], sd, "Conv_Body.conv_top", relu=False)]
    for i in range(3):
        lateral = _conv_gn(c[i + 1], sd, f"Conv_Body.topdown_lateral_modules.{i}.conv_lateral", relu=False)
        inner.append(lateral + F.interpolate(inner[-1], scale_factor=2, mode="nearest"))
    middle = [_conv_gn(x, sd, f"Conv_Body.posthoc_modules.{i}", relu=False) for i, x in enumerate(inner)]
    out = [middle[-1]]  # N2 = P2, then N_{i+1} = conv2(conv1(N_i) + P_{i+1})
    for i in range(3):
        down = _conv_gn(out[-1], sd, f"Conv_Body.panet_buttomup_conv1_modules.{i}", stride=2, conv_bias=True)
        out.append(_conv_gn(down + middle[2 - i], sd, f"Conv_Body.panet_buttomup_conv2_modules.{i}", conv_bias=True))
    for level, (a, b) in enumerate(zip(ours, out)):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4), f"N{level + 2}"
    assert isinstance(backbone.fpn.layer_blocks[0][1], torch.nn.GroupNorm)
    assert backbone.fpn.layer_blocks[0][1].num_groups == 32 and backbone.fpn.layer_blocks[0][0].bias is None


def test_conv_box_head_and_gn_mask_head_compute_the_official_forward(converted):
    sd, heads = converted["sd"], converted["model"].detector.roi_heads
    g = torch.Generator().manual_seed(2)
    pooled = torch.randn(4, 3, 256, 7, 7, generator=g)  # [levels, RoIs, C, 7, 7]
    with torch.no_grad():
        features = heads.box_head(pooled)
    h = torch.stack([_conv_gn(pooled[i], sd, f"Box_Head.conv1_head.{i}") for i in range(4)]).amax(0)
    for index in (0, 3, 6):  # Box_Head.convs: (conv, GN, ReLU) x 3
        h = F.relu(F.group_norm(F.conv2d(h, sd[f"Box_Head.convs.{index}.weight"], padding=1), 32,
                                sd[f"Box_Head.convs.{index + 1}.weight"], sd[f"Box_Head.convs.{index + 1}.bias"]))
    expected = F.relu(F.linear(h.flatten(1), sd["Box_Head.fc.weight"], sd["Box_Head.fc.bias"]))
    assert features.shape == (3, 1024) and torch.allclose(features, expected, atol=1e-4)
    assert features.abs().max() > 1e-3

    pooled = torch.randn(4, 2, 256, 14, 14, generator=g)
    with torch.no_grad():
        logits = heads.mask_head(pooled)
    h = torch.stack([_conv_gn(pooled[i], sd, f"Mask_Head.mask_conv1.{i}") for i in range(4)]).amax(0)
    for index in (0, 3):  # conv_fcn: (conv, GN, ReLU) x 2
        h = F.relu(F.group_norm(F.conv2d(h, sd[f"Mask_Head.conv_fcn.{index}.weight"], padding=1), 32,
                                sd[f"Mask_Head.conv_fcn.{index + 1}.weight"], sd[f"Mask_Head.conv_fcn.{index + 1}.bias"]))
    fcn = F.relu(F.conv_transpose2d(_conv_gn(h, sd, "Mask_Head.mask_conv4"), sd["Mask_Head.upconv.weight"],
                                    sd["Mask_Head.upconv.bias"], stride=2))
    fcn = F.conv2d(fcn, sd["Mask_Outs.classify.weight"], sd["Mask_Outs.classify.bias"])
    ff = _conv_gn(_conv_gn(h, sd, "Mask_Head.mask_conv4_fc"), sd, "Mask_Head.mask_conv5_fc")
    ff = F.relu(F.linear(ff.flatten(1), sd["Mask_Head.mask_fc.0.weight"], sd["Mask_Head.mask_fc.0.bias"]))
    expected = fcn + ff.view(-1, 1, 28, 28)
    assert logits.shape == (2, 81, 28, 28) and torch.allclose(logits, expected, atol=1e-4)


def test_legacy_anchors_are_detectrons_generate_anchors():
    # by hand, stride 4, size 32: reference window 4x4 centred at 1.5; ratio 0.5 -> w round(sqrt(32)) = 6,
    # h round(3) = 3, scaled x8 -> 48 x 24 -> (1.5 -+ 23.5, 1.5 -+ 11.5); ratio 1 -> 32 x 32; ratio 2 -> 3, 6 -> 24 x 48
    assert legacy_cell_anchors(4, [32], [0.5, 1.0, 2.0]).tolist() == [[-22, -10, 25, 13], [-14, -14, 17, 17],
                                                                      [-10, -22, 13, 25]]
    # stride 64, size 512: w round(sqrt(8192)) = 91, h round(45.5) = 46 (half to even), x8 -> 728 x 368 around 31.5
    assert legacy_cell_anchors(64, [512], [0.5, 1.0, 2.0]).tolist() == [[-332, -152, 395, 215],
                                                                        [-224, -224, 287, 287],
                                                                        [-148, -328, 211, 391]]
    generator = LegacyAnchorGenerator(((32,), (64,)), ((0.5, 1.0, 2.0),) * 2, strides=[4, 8])
    from torchvision.models.detection.image_list import ImageList
    images = ImageList(torch.zeros(1, 3, 8, 8), [(8, 8)])
    anchors = generator(images, [torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 1, 1)])[0]
    assert anchors.shape == (2 * 2 * 3 + 3, 4)
    # location (y 0, x 1) of stride 4: the cell anchors shifted 4 px right; order (location, ratio)
    assert anchors[3:6].tolist() == [[-18, -10, 29, 13], [-10, -14, 21, 17], [-6, -22, 17, 25]]
    assert anchors[12].tolist() == [-40, -20, 47, 27]  # stride 8, size 64, ratio 0.5 (Detectron's fpn3 anchor)


def test_legacy_box_coding_adds_one_to_widths():
    coder = LegacyBoxCoder((1.0, 1.0, 1.0, 1.0))
    box = torch.tensor([[0.0, 0.0, 9.0, 19.0]])  # 10 x 20 pixels, centre (5, 10)
    deltas = torch.tensor([[0.1, -0.1, float(torch.log(torch.tensor(2.0))), 0.0]])
    # centre x 5 + 0.1 * 10 = 6, width 20 -> x1 = 6 - 10 = -4, x2 = 6 + 10 - 1 = 15; centre y 10 - 2 = 8, height 20
    decoded = coder.decode_single(deltas, box)
    assert torch.allclose(decoded, torch.tensor([[-4.0, -2.0, 15.0, 17.0]]), atol=1e-5)
    assert torch.allclose(coder.encode_single(decoded, box), deltas, atol=1e-5)
    weighted = LegacyBoxCoder((10.0, 10.0, 5.0, 5.0))
    two_classes = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]])  # class 2: dx 1 / 10 -> +1 px
    assert torch.allclose(weighted.decode_single(two_classes, box),
                          torch.tensor([[0.0, 0.0, 9.0, 19.0, 1.0, 0.0, 10.0, 19.0]]), atol=1e-5)


def test_legacy_geometry_clips_to_the_last_pixel_and_pools_unaligned(converted):
    heads = converted["model"].detector.roi_heads
    proposals = [torch.tensor([[50.0, 40.0, 90.0, 70.0]])]
    logits = torch.full((1, 81), -10.0)
    logits[0, 5] = 10.0
    regression = torch.zeros(1, 81 * 4)
    with torch.no_grad():
        boxes, scores, labels = heads.postprocess_detections(logits, regression, proposals, [(64, 80)])
    assert labels[0].tolist() == [5] and boxes[0].tolist() == [[50.0, 40.0, 79.0, 63.0]]  # W - 1, H - 1
    # NMS IoU with +1 widths: [0, 0, 9, 9] and [3.2, 0, 12.2, 9] overlap 6.8 x 10 = 68 of 100 + 100 - 68 -> 0.515
    # > 0.5, suppressed (continuous areas: 5.8 x 9 / (81 + 81 - 52.2) = 0.475, both kept)
    proposals = [torch.tensor([[0.0, 0.0, 9.0, 9.0], [3.2, 0.0, 12.2, 9.0]])]
    logits = torch.full((2, 81), -10.0)
    logits[:, 5] = torch.tensor([10.0, 9.0])
    with torch.no_grad():
        boxes, scores, labels = heads.postprocess_detections(logits, torch.zeros(2, 81 * 4), proposals, [(64, 80)])
    assert boxes[0].tolist() == [[0.0, 0.0, 9.0, 9.0]]
    # RPN, NMS 0.7: [0, 0, 3, 3] and [0.7, 0, 3.7, 3] overlap 3.3 x 4 = 13.2 of 16 + 16 - 13.2 -> 0.702, suppressed
    # (continuous: 2.3 x 3 / (9 + 9 - 6.9) = 0.622); the third proposal is clipped to (W - 1, H - 1)
    rpn = converted["model"].detector.rpn
    candidates = torch.tensor([[[0.0, 0.0, 3.0, 3.0], [0.7, 0.0, 3.7, 3.0], [70.0, 50.0, 90.0, 70.0]]])
    with torch.no_grad():
        kept, kept_scores = rpn.filter_proposals(candidates, torch.tensor([[3.0, 2.0, 1.0]]), [(64, 80)], [3])
    assert torch.allclose(kept[0], torch.tensor([[0.0, 0.0, 3.0, 3.0], [70.0, 50.0, 79.0, 63.0]]))
    assert torch.allclose(kept_scores[0], torch.sigmoid(torch.tensor([3.0, 1.0])))

    pool = heads.box_roi_pool
    assert pool.aligned is False and pool.sampling_ratio == 2
    g = torch.Generator().manual_seed(3)
    feats = {name: torch.randn(1, 2, 64 // s, 64 // s, generator=g) for name, s in zip(pool.featmap_names, (4, 8, 16, 32))}
    box = torch.tensor([[4.0, 6.0, 40.0, 30.0]])
    pooled = pool(feats, [box], [(64, 64)])
    legacy = roi_align(feats["n3"], torch.tensor([[0.0, 4.0, 6.0, 40.0, 30.0]]), 7, spatial_scale=1 / 8,
                       sampling_ratio=2, aligned=False)
    assert pooled.shape == (4, 1, 2, 7, 7) and torch.allclose(pooled[1], legacy)


def test_the_converted_file_predicts(converted):
    image = torch.randint(0, 256, (96, 128, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(4)).numpy()
    result = Predictor(converted["path"], min_size_test=96)(image)["instances"]
    assert result["masks"].shape[1:] == (96, 128) and len(result["scores"]) > 0
    assert (result["labels"] == 0).all() and (result["scores"] > 0.9).all()
    assert (result["boxes"][:, 2] <= 127).all() and (result["boxes"][:, 3] <= 95).all()  # clipped to W - 1, H - 1


def test_default_presets_keep_their_network():
    settings = {"arch": "panet", "backbone": "resnet18", "fpn_dim": 64,
                "rpn": {"anchor_sizes": [16, 32, 64, 128, 256]}, "roi": {"box_head_dim": 128, "mask_head_dim": 64}}
    model = RCNNSegmenter(settings, 3)
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    assert type(model.detector.roi_heads.box_coder).__name__ == "BoxCoder"
    assert type(model.detector.rpn.anchor_generator).__name__ == "AnchorGenerator"
    assert model.detector.roi_heads.box_roi_pool.aligned is True
    assert "detector.roi_heads.box_head.fc6.0.weight" in model.state_dict()


def test_detection_models_other_heads_and_other_files_are_refused(tmp_path):
    sd = random_state_dict(load_layout(LAYOUT))
    cases = {"Mask_Head.": "no mask head", "Box_Head.conv1_head.": "a box head other than",
             "Conv_Body.panet_buttomup_conv1_modules.": "no bottom-up path augmentation"}
    for drop, message in cases.items():
        path = _checkpoint(tmp_path, {k: v for k, v in sd.items() if not k.startswith(drop)})
        with pytest.raises(CheckpointError, match=message):
            convert(path, "panet", "panet_r50", tmp_path / "p.safetensors")
    no_gn = {k: v for k, v in sd.items() if not k.startswith("Conv_Body.conv_top.1.")}
    with pytest.raises(CheckpointError, match="without GroupNorm"):
        convert(_checkpoint(tmp_path, no_gn), "panet", "panet_r50", tmp_path / "p.safetensors")
    other = write_torch_checkpoint(tmp_path / "other.pth", {"backbone.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"other.pth: not a PANet \(Detectron.pytorch\) checkpoint"):
        convert(other, "panet", "panet_r50", tmp_path / "p.safetensors")
    assert not (tmp_path / "p.safetensors").exists()


def test_cli_converts_the_release(tmp_path, converted):
    path = _checkpoint(tmp_path, converted["sd"])
    with pytest.warns(UserWarning, match="differs from the official inference"):
        result = CliRunner().invoke(app, ["convert", str(path), "--from", "panet", "--preset", "panet_r50",
                                          "--classes", "coco", "-o", str(tmp_path / "p.safetensors")])
    assert result.exit_code == 0, result.output
    assert "model.roi.box_geometry=legacy" in result.output and (tmp_path / "p.safetensors").exists()
