"""Per-pixel family: PSPNet, DANet, FastFCN's JPU, Gated-SCNN — formulas on hand cases, shapes, losses,
training through the engine, and the command line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from omniseg.config import load_config
from omniseg.models.per_pixel import PerPixelSegmenter, label_map_from_targets
from omniseg.models.per_pixel.blocks import ChannelAttention, JointPyramidUpsampling, PositionAttention, PyramidPooling
from omniseg.models.per_pixel.gscnn import (
    GatedConv, balanced_edge_bce, dual_task_loss, gradient_magnitude, label_boundaries,
)
from omniseg.models.registry import build_model

# A small dilated ResNet-18 and narrow heads: builds and trains in seconds on 64 px images.
TINY_PER_PIXEL = [
    "model.backbone_kwargs={layers: [1, 1, 1, 1], channels: [16, 32, 64, 64]}",
    "model.head_width=32", "model.jpu_width=16", "model.shape_width=16", "model.aspp_rates=[1,2,3]",
]


def tiny_model(arch: str, *extra: str, num_classes: int = 5) -> PerPixelSegmenter:
    cfg = load_config("pspnet_demo", [f"model.arch={arch}", *TINY_PER_PIXEL, *extra])
    return build_model(OmegaConf.to_container(cfg.model, resolve=True), num_classes=num_classes)


def targets_for(labels: torch.Tensor, seed: int = 0) -> dict:
    classes = [int(c) for c in labels.unique() if c != 255]
    return {"labels": torch.tensor(classes), "masks": torch.stack([labels == c for c in classes]), "seed": seed}


# ----------------------------------------------------------------------------- building blocks


def test_position_attention_is_the_official_formula_and_starts_as_identity():
    torch.manual_seed(0)
    pam = PositionAttention(16)
    x = torch.randn(2, 16, 3, 4)
    torch.testing.assert_close(pam(x), x)  # gamma = 0 at initialisation
    with torch.no_grad():
        pam.gamma.fill_(0.7)
    q, k, v = pam.query(x).flatten(2), pam.key(x).flatten(2), pam.value(x).flatten(2)  # [B,C',N]
    expected = torch.empty_like(v)
    for b in range(2):
        for i in range(12):  # out_i = sum_j softmax_j(q_i . k_j) v_j, no 1/sqrt(d)
            w = torch.softmax(q[b, :, i] @ k[b], dim=0)
            expected[b, :, i] = v[b] @ w
    torch.testing.assert_close(pam(x), 0.7 * expected.view_as(x) + x)


def test_channel_attention_uses_rowmax_minus_energy_and_starts_as_identity():
    torch.manual_seed(1)
    cam = ChannelAttention()
    x = torch.randn(1, 4, 2, 3)
    torch.testing.assert_close(cam(x), x)
    with torch.no_grad():
        cam.beta.fill_(2.0)
    flat = x.flatten(2)[0]
    energy = flat @ flat.T
    attn = torch.softmax(-energy, dim=-1)  # softmax(rowmax - E) == softmax(-E): least similar channels weigh most
    torch.testing.assert_close(cam(x)[0], (2.0 * attn @ flat + flat).view(4, 2, 3))


def test_pyramid_pooling_bins_and_channels():
    ppm = PyramidPooling(8, bins=(1, 2, 3, 6)).eval()
    x = torch.randn(1, 8, 12, 12)
    y = ppm(x)
    assert y.shape == (1, 8 + 4 * 2, 12, 12)
    torch.testing.assert_close(y[:, :8], x)  # the input passes through
    # the 1x1-bin branch is constant over the map (global context)
    g = y[:, 8:10]
    torch.testing.assert_close(g, g[..., :1, :1].expand_as(g))


def test_jpu_reads_three_levels_and_gives_four_dilated_branches_at_stride_8():
    jpu = JointPyramidUpsampling([16, 32, 64], width=8)
    assert [b[0][0].dilation for b in jpu.dilated] == [(1, 1), (2, 2), (4, 4), (8, 8)]
    assert all(isinstance(b[0][1], torch.nn.BatchNorm2d) for b in jpu.dilated)  # BN between depthwise and pointwise
    out = jpu([torch.randn(2, 16, 16, 16), torch.randn(2, 32, 8, 8), torch.randn(2, 64, 4, 4)])
    assert out.shape == (2, 32, 16, 16) and jpu.out_channels == 32


def test_dilated_backbone_and_jpu_give_stride_8_features_for_the_head():
    for extra, res5_stride in ((["model.output_stride=8"], 8), (["model.output_stride=16"], 16), (["model.neck=jpu"], 32)):
        model = tiny_model("pspnet", *extra).eval()
        assert model.backbone.specs["res5"].stride == res5_stride
        x = torch.randn(1, 3, 64, 96)
        assert model.network(x)["sem_seg"].shape[-2:] == ((8, 12) if res5_stride != 16 else (4, 6))


def test_jpu_costs_fewer_flops_than_dilation_at_the_same_head():
    def flops(model):
        with FlopCounterMode(display=False) as counter:
            model.eval().forward_raw(torch.randn(1, 3, 128, 128))
        return counter.get_total_flops()

    extra = ["model.backbone_kwargs={layers: [2, 2, 2, 2], channels: [32, 64, 128, 256]}", "model.head_width=128",
             "model.jpu_width=64"]
    dilated, jpu = flops(tiny_model("pspnet", *extra)), flops(tiny_model("pspnet", "model.neck=jpu", *extra))
    assert jpu < 0.75 * dilated


# ----------------------------------------------------------------------------- Gated-SCNN


def test_gated_conv_is_one_plus_alpha_times_s():
    torch.manual_seed(0)
    gate = GatedConv(3).eval()
    s, r = torch.randn(1, 3, 4, 4), torch.randn(1, 1, 4, 4)
    out, alpha = gate(s, r)
    assert alpha.shape == (1, 1, 4, 4) and bool(((alpha > 0) & (alpha < 1)).all())
    torch.testing.assert_close(out, F.conv2d(s * (1 + alpha), gate.conv.weight))


def test_label_boundaries_radius_and_ignore():
    labels = torch.zeros(1, 4, 10, dtype=torch.long)
    labels[..., 5:] = 1
    b = label_boundaries(labels, radius=2)
    # left pixels within 2 columns of column 5 (3, 4) and right pixels within 2 of column 4 (5, 6)
    assert b[0, 0].nonzero().flatten().tolist() == [3, 4, 5, 6]
    assert bool((b == b[:, :1]).all())  # same in every row
    labels[..., 5:] = 255  # a transition into void is not a boundary
    assert not label_boundaries(labels, radius=2).any()


def test_balanced_edge_bce_hand_case():
    logits = torch.tensor([[[2.0, -1.0, 0.0, 0.5]]])
    edges = torch.tensor([[[True, False, False, False]]])
    valid = torch.tensor([[[True, True, True, False]]])
    # 1 boundary, 2 non-boundary valid pixels: weights 2/3 on the boundary, 1/3 elsewhere, 0 for the invalid one
    terms = [2 / 3 * F.softplus(torch.tensor(-2.0)), 1 / 3 * F.softplus(torch.tensor(-1.0)),
             1 / 3 * F.softplus(torch.tensor(0.0)), torch.tensor(0.0)]
    torch.testing.assert_close(balanced_edge_bce(logits, edges, valid), torch.stack(terms).mean())


def test_dual_task_loss_vanishes_for_a_perfect_prediction_and_grows_with_errors():
    labels = torch.zeros(1, 32, 32, dtype=torch.long)
    labels[:, 8:24, 8:24] = 1
    perfect = F.one_hot(labels, 3).permute(0, 3, 1, 2).float() * 50
    wrong = torch.roll(perfect, shifts=6, dims=-1)
    gens = [torch.Generator().manual_seed(0)]
    good = dual_task_loss(perfect, labels, 3, generators=gens)
    bad = dual_task_loss(wrong, labels, 3, generators=[torch.Generator().manual_seed(0)])
    assert float(good) < 1e-3 and float(bad) > 0.05
    g = gradient_magnitude(F.one_hot(labels, 3).permute(0, 3, 1, 2).float())
    assert g.max() == 1.0 and g[0, 1, 16, 16] == 0.0  # normalised per image; flat inside the square


def test_gscnn_uses_canny_edges_of_the_raw_image():
    model = tiny_model("gscnn").eval()
    seen = []
    model.edge_fusion.register_forward_hook(lambda m, args, out: seen.append(args))
    images = torch.zeros(1, 3, 64, 64, dtype=torch.uint8)
    images[..., 16:48, 16:48] = 200
    model.predict(images, [(64, 64)])
    edge_logits, raw = seen[0]
    torch.testing.assert_close(raw, images)  # un-normalised back to the uint8 input exactly
    assert edge_logits.shape == (1, 1, 64, 64)


# ----------------------------------------------------------------------------- model, losses, training


def test_label_map_from_engine_targets():
    masks = torch.zeros(2, 3, 4, dtype=torch.bool)
    masks[0, 0] = True
    masks[1, 2, 1:] = True
    sem = label_map_from_targets([{"labels": torch.tensor([3, 7]), "masks": masks}], (3, 4))
    assert sem.tolist() == [[[3, 3, 3, 3], [255, 255, 255, 255], [255, 7, 7, 7]]]


@pytest.mark.parametrize("arch,extra,expected", [
    ("pspnet", [], {"loss_ce", "loss_aux"}),
    ("danet", [], {"loss_ce", "loss_pam", "loss_cam"}),
    ("pspnet", ["model.neck=jpu"], {"loss_ce", "loss_aux"}),
    ("deeplabv3", [], {"loss_ce", "loss_aux"}),
    ("gscnn", [], {"loss_ce", "loss_edge", "loss_edge_att", "loss_dual"}),
])
def test_training_lowers_the_loss_and_reaches_every_parameter(arch, extra, expected):
    torch.manual_seed(0)
    model = tiny_model(arch, *extra).train()
    images = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    labels = torch.zeros(2, 64, 64, dtype=torch.long)
    labels[:, 20:44, 10:40] = 2
    labels[1, :, 50:] = 4
    labels[0, :4] = 255
    images.permute(0, 2, 3, 1)[labels == 2] = 230  # learnable: class 2 is a bright box
    targets = [targets_for(labels[i], seed=i) for i in range(2)]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = model.losses(images, targets)
    assert set(losses) == expected
    sum(losses.values()).backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert unused == []
    first = float(losses["loss_ce"].detach())
    for _ in range(25):
        opt.zero_grad()
        losses = model.losses(images, targets)
        sum(losses.values()).backward()
        opt.step()
    assert float(losses["loss_ce"].detach()) < 0.6 * first


def test_class_weights_weight_the_cross_entropy():
    model = tiny_model("fcn", "model.loss.class_weights=[1, 1, 1, 1, 0.1]", "model.loss.aux_weight=0").eval()
    images = torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8)
    labels = torch.full((1, 64, 64), 4)
    labels[:, :16] = 1
    out = model.network(model.normalize(images))["sem_seg"]
    logits = F.interpolate(out, size=(64, 64), mode="bilinear", align_corners=False)
    nll = -torch.log_softmax(logits, 1).gather(1, labels[:, None])[:, 0]
    w = torch.where(labels == 4, 0.1, 1.0)
    expected = (nll * w).sum() / w.sum()
    torch.testing.assert_close(model.losses(images, [targets_for(labels[0])])["loss_ce"], expected)
    with pytest.raises(ValueError, match="3 entries for 5 classes"):
        tiny_model("fcn", "model.loss.class_weights=[1, 1, 1]")


def test_predict_crops_the_padding_and_resizes_to_the_output_size():
    model = tiny_model("pspnet").eval()
    images = torch.randint(0, 255, (2, 3, 64, 96), dtype=torch.uint8)
    preds = model.predict(images, [(60, 90), (64, 96)], [(120, 180), (64, 96)], return_raw=True)
    assert preds[0]["semantic"].shape == (120, 180) and preds[0]["semantic"].dtype == torch.int64
    logits = model.forward_raw(model.normalize(images))["sem_seg"]
    torch.testing.assert_close(preds[1]["semantic"], logits[1].argmax(0))
    with pytest.raises(ValueError, match="predicts semantic, not panoptic"):
        model.predict(images, [(64, 96)] * 2, tasks=["panoptic"])


def test_engine_trains_and_evaluates_every_demo_preset(synth_root, tmp_path):
    from omniseg.engine.trainer import train

    for preset in ("pspnet_demo", "danet_demo", "fastfcn_jpu_demo", "gscnn_demo"):
        cfg = load_config(preset, [
            *TINY_PER_PIXEL, f"data.train.root={synth_root}", f"data.val.root={synth_root}", "data.crop_size=64",
            "data.batch_size=2", "data.num_workers=0", "train.max_iters=2", "train.eval_period=2",
            f"train.output_dir={tmp_path / preset}", "train.log_period=1", "eval_boundary_f=true",
        ])
        result = train(cfg, progress=False)
        assert 0.0 <= result["mIoU"] <= 100.0 and 0.0 <= result["BF@0.00375"] <= 100.0, preset


def test_cli_predict_writes_label_pngs_named_after_the_images(synth_root, tmp_path):
    """What a CamVid test-set evaluation needs: one label PNG per image, same name, dataset ids."""
    from omniseg.cli import app

    runner = CliRunner()
    root = tmp_path / "camvid"
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for i in range(3):
            image = np.full((48, 64, 3), 40 * i, dtype=np.uint8)
            label = np.full((48, 64), i, dtype=np.uint8)
            label[:10] = 11  # CamVid's "Unlabelled"
            Image.fromarray(image).save(root / split / f"0001TP_{i:06d}.png")
            Image.fromarray(label).save(root / f"{split}annot" / f"0001TP_{i:06d}.png")
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "pspnet_demo", *TINY_PER_PIXEL,
                                 "data.train={format: semantic_folder, preset: camvid, root: " + str(root) + ", split: train}",
                                 "data.val={format: semantic_folder, preset: camvid, root: " + str(root) + ", split: val}",
                                 "data.crop_size=32", "data.batch_size=2", "data.num_workers=0", "train.max_iters=2",
                                 "train.eval_period=2", f"train.output_dir={run}"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "pred"
    result = runner.invoke(app, ["predict", "--weights", str(run / "model_final.safetensors"),
                                 "--input", str(root / "val"), "--output", str(out), "--no-overlay"])
    assert result.exit_code == 0, result.output
    for i in range(3):
        sem = np.array(Image.open(out / "semantic" / f"0001TP_{i:06d}.png"))
        assert sem.shape == (48, 64) and sem.dtype == np.uint8 and set(np.unique(sem).tolist()) <= set(range(11))
    result = runner.invoke(app, ["predict", "--weights", str(run / "model_final.safetensors"),
                                 "--input", str(root / "val"), "--output", str(out), "--task", "panoptic"])
    assert result.exit_code != 0 and "predicts semantic, not panoptic" in result.output


@pytest.mark.parametrize("arch,extra", [("pspnet", ["model.neck=jpu"]), ("gscnn", [])])
def test_export_matches_predict_and_leaves_the_aux_head_out(tmp_path, arch, extra):
    from omniseg.export import export_model, load_exported, semantic_from_exported

    torch.manual_seed(0)
    model = tiny_model(arch, *extra, "model.loss.aux_weight=0.4").eval()
    assert model.aux_head is not None
    path = export_model(model, tmp_path / "m.pt2", height=64, width=96, batch=2)
    assert not any("aux_head" in n for n, _ in torch.export.load(path).module().named_parameters())
    images = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    images[:, :, 16:48, 20:70] = 230  # a strong edge, so the Canny input is not empty
    (logits,) = load_exported(path)(images)
    with torch.no_grad():
        eager = model.forward_raw(model.normalize(images))["sem_seg"]
    torch.testing.assert_close(logits, eager, atol=1e-4, rtol=0)
    ours = semantic_from_exported(logits, [(60, 90), (64, 96)], [(120, 180), (64, 96)])
    preds = model.predict(images, [(60, 90), (64, 96)], [(120, 180), (64, 96)])
    for a, b in zip(ours, preds):
        assert (a["semantic"] == b["semantic"]).float().mean() > 0.999
