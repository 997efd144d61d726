"""MMSegmentation UPerNet-ViT checkpoints (VisionTransformer + MultiLevelNeck + UPerHead) become omniseg
`upernet` weights files computing what MMSeg computes: parity against mmseg's own modules with random
weights, at the pre-training size and at another size (position-embedding resizing)."""

from __future__ import annotations


import pytest
import torch
from torch.nn import functional as F

from helpers.mmseg_reference import mmseg

from omniseg.api import Predictor, load_model
from omniseg.hub.converters.mmseg_vit import convert_vit_checkpoint, read_vit_layout, vit_backbone_tensors
from omniseg.hub.errors import CheckpointError

EMBED, DEPTH, HEADS, IMG, CLASSES = 128, 4, 2, 128, 7


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere (norm scales around 1), BatchNorm statistics far from (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            for name, p in m.named_parameters(recurse=False):
                scale = isinstance(m, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)) and name == "weight"
                p.copy_(torch.randn(p.shape, generator=g) * (0.2 if scale else 0.05) + (1.0 if scale else 0.0))
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.num_batches_tracked.fill_(1000)


def _mmseg_upernet_vit(final_norm: bool, neck: bool = True):
    """MMSeg's upernet_vit-b16_mln modules (config values, small sizes): backbone, neck, heads; without
    the neck as the upernet_deit configs (`neck=None`)."""
    models = mmseg()
    from mmseg.models.backbones import VisionTransformer
    from mmseg.models.decode_heads import FCNHead, UPerHead
    from mmseg.models.necks import MultiLevelNeck

    torch.manual_seed(0)
    backbone = VisionTransformer(img_size=(IMG, IMG), patch_size=16, embed_dims=EMBED, num_layers=DEPTH,
                                 num_heads=HEADS, mlp_ratio=4, out_indices=(0, 1, 2, 3), qkv_bias=True,
                                 with_cls_token=True, final_norm=final_norm, norm_cfg=dict(type="LN", eps=1e-6),
                                 act_cfg=dict(type="GELU"), interpolate_mode="bicubic",
                                 patch_bias=final_norm)  # the 0.x releases have a patch bias, 1.x's default not
    with_neck = neck
    neck = MultiLevelNeck(in_channels=[EMBED] * 4, out_channels=EMBED, scales=[4, 2, 1, 0.5])
    bn = dict(type="BN", requires_grad=True)
    head = UPerHead(in_channels=[EMBED] * 4, in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3, 6), channels=64,
                    dropout_ratio=0.1, num_classes=CLASSES, norm_cfg=bn, align_corners=False)
    aux = FCNHead(in_channels=EMBED, in_index=3, channels=32, num_convs=1, concat_input=False, dropout_ratio=0.1,
                  num_classes=CLASSES, norm_cfg=bn, align_corners=False)
    parts = {"backbone": backbone, "neck": neck, "decode_head": head, "auxiliary_head": aux}
    if not with_neck:
        del parts["neck"]
    for i, m in enumerate(parts.values()):
        _randomise(m, i)
        m.eval()
    assert models is not None
    return parts


def _save_mmseg_checkpoint(parts: dict, path) -> None:
    """As MMSeg's runner saves it: {"meta": ..., "state_dict": prefixed module tensors}."""
    sd = {f"{prefix}.{k}": v for prefix, m in parts.items() for k, v in m.state_dict().items()}
    torch.save({"meta": {"mmseg_version": "1.2.2", "dataset_meta": {"classes": [f"c{i}" for i in range(CLASSES)]}},
                "state_dict": sd}, path)


def _mmseg_logits(parts: dict, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        feats = parts["backbone"](x)
        logits = parts["decode_head"](list(parts["neck"](feats) if "neck" in parts else feats))
    return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _convert(tmp_path, path, **kwargs) -> dict:
    """Through `--from mmseg`, which hands ViT checkpoints to `convert_vit_checkpoint`."""
    from omniseg.hub.convert import convert

    return convert(path, "mmseg", "upernet_vit_b", tmp_path / "m.safetensors", **kwargs)


def test_vit_backbone_mapping_matches_mmseg_tokens():
    """The shared backbone mapping alone: omniseg's PlainViT (class token kept, MMSeg resizing) taps
    the same feature maps as MMSeg's VisionTransformer, at the pre-training grid and at another."""
    from omniseg.models.segvit.vit import PlainViT

    backbone = _mmseg_upernet_vit(final_norm=True)["backbone"]
    sd = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    layout = read_vit_layout(sd, "test")
    assert (layout.embed_dim, layout.depth, layout.num_heads, layout.img_size, layout.final_norm) == \
        (EMBED, DEPTH, HEADS, IMG, True)
    tensors, used = vit_backbone_tensors(sd, "backbone.", "body.")
    assert used == set(sd)
    ours = PlainViT("vit_base_patch16_224", out_indices=(0, 1, 2, 3), keep_cls_token=True, final_norm=True,
                    pos_resize="mmseg", img_size=IMG, embed_dim=EMBED, depth=DEPTH, num_heads=HEADS).eval()
    assert set(tensors) == set(ours.state_dict())
    ours.load_state_dict(tensors)
    g = torch.Generator().manual_seed(3)
    for size in ((IMG, IMG), (96, 160)):
        x = torch.randn(2, 3, *size, generator=g)
        with torch.no_grad():
            theirs = backbone(x)
            enc = ours(x)
        h, w = enc.grid
        assert (h, w) == (size[0] // 16, size[1] // 16)
        for tap, ref in zip(enc.taps, theirs):
            torch.testing.assert_close(tap.transpose(1, 2).reshape(ref.shape), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("final_norm, neck", [(False, True), (True, True), (False, False)],
                         ids=["mln", "ln_mln", "deit_no_neck"])
def test_upernet_vit_converts_to_the_same_network(tmp_path, final_norm, neck):
    parts = _mmseg_upernet_vit(final_norm, neck)
    _save_mmseg_checkpoint(parts, tmp_path / "upernet_vit.pth")
    report = _convert(tmp_path, tmp_path / "upernet_vit.pth")
    assert report["unmapped"] == [] and report["missing"] == []
    assert report["initialised"] == [] and report["ignored"] == {}  # the auxiliary head maps too (last level)
    assert "model.aux_level=res5" in report["overrides"] and "model.aux_width=32" in report["overrides"]
    model, cfg, meta = load_model(tmp_path / "m.safetensors")
    assert meta.num_classes == CLASSES and cfg.model.head_width == 64
    assert cfg.model.backbone_kwargs.final_norm is final_norm and cfg.model.backbone_kwargs.keep_cls_token is True
    assert cfg.model.backbone_kwargs.multilevel_neck is neck
    model.eval()
    g = torch.Generator().manual_seed(1)
    for size in ((IMG, IMG), (96, 160)):  # the pre-training grid, then a resized position embedding
        x = torch.randn(1, 3, *size, generator=g)
        with torch.no_grad():
            ours = model.forward_raw(x)["sem_seg"]
        theirs = _mmseg_logits(parts, x)
        assert theirs.abs().max() > 0.1
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
        with torch.no_grad():  # the auxiliary head's logits, which fine-tuning trains at weight 0.4
            aux = model.network(x, training_outputs=True)["aux"]
            feats = parts["backbone"](x)
            aux_theirs = parts["auxiliary_head"](list(parts["neck"](feats) if "neck" in parts else feats))
        torch.testing.assert_close(aux, aux_theirs, rtol=1e-4, atol=1e-4)

    # timm's antialiased resizing is a different network away from the pre-training grid
    model.backbone.vit.pos_resize = "timm"
    with torch.no_grad():
        timm_resized = model.forward_raw(x)["sem_seg"]
    assert (timm_resized - theirs).abs().max() > 1e-3

    # and the whole predict path: ImageNet normalisation of RGB uint8 images, as MMSeg's preprocessor
    image = torch.randint(0, 256, (3, IMG, IMG), dtype=torch.uint8, generator=g)
    pred = Predictor(tmp_path / "m.safetensors", min_size_test=IMG)(image)["semantic"]
    mean = torch.tensor([123.675, 116.28, 103.53])[:, None, None]
    std = torch.tensor([58.395, 57.12, 57.375])[:, None, None]
    expected = _mmseg_logits(parts, ((image.float() - mean) / std)[None])[0].argmax(0)
    assert pred.shape == expected.shape and (pred == expected).float().mean() > 0.99


def test_non_upernet_vit_checkpoints_are_refused(tmp_path):
    parts = _mmseg_upernet_vit(final_norm=False)
    sd = {f"backbone.{k}": v for k, v in parts["backbone"].state_dict().items()}
    sd.update({"decode_head.conv_seg.weight": torch.zeros(CLASSES, 64, 1, 1), "decode_head.convs.0.conv.weight":
               torch.zeros(64, EMBED, 3, 3)})
    with pytest.raises(CheckpointError, match=r"only UPerNet \(UPerHead\) decode heads.*conv_seg, convs"):
        convert_vit_checkpoint(sd, "fcn_vit.pth")
    full = {f"{p}.{k}": v for p, m in parts.items() for k, v in m.state_dict().items()}
    three_levels = {k: v for k, v in full.items() if not k.startswith(("neck.lateral_convs.3.", "neck.convs.3."))}
    with pytest.raises(CheckpointError, match=r"MultiLevelNeck must have 4 levels .*found 3"):
        convert_vit_checkpoint(three_levels, "vit.pth")
    no_bias = {k: v for k, v in full.items() if "attn.attn.in_proj_bias" not in k}
    with pytest.raises(CheckpointError, match="without qkv bias"):
        convert_vit_checkpoint(no_bias, "vit.pth")
