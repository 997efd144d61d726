"""SegViT Shrunk / Shrunk++ full-size presets against the official design (zbwxp/SegVit @ 763137e: vit_shrink,
TPNATMHead, ATMSingleHead, configs/segvit/shrink/*, configs/_base_/models/seg_vit-b16.py), and the learned
query grid of qu_mode grid: training and sliding windows at the crop, padding of smaller inputs, the error
for larger ones."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from omniseg.config import load_config
from omniseg.models.registry import build_model

# A 6-block ViT with 8 px patches: a 64 px crop is an 8 x 8 patch grid, so qu_grid 8.
TINY_GRID = ["model.backbone=vit_tiny_patch16_224",
             "model.backbone_kwargs={patch_size: 8, embed_dim: 32, depth: 6, num_heads: 2}",
             "model.qd_index=2", "model.vit_out_indices=[1,5]", "model.qu_grid=8", "model.hidden_dim=32",
             "model.nheads=2", "model.dropout=0.0", "model.drop_path_rate=0.0"]


def tiny_grid_model(*extra: str, num_classes: int = 5, preset: str = "segvit_shrunk_vit_b"):
    cfg = OmegaConf.to_container(load_config(preset, [*TINY_GRID, *extra]).model, resolve=True)
    torch.manual_seed(0)
    return build_model(cfg, num_classes=num_classes)


def full_size_model(preset: str):
    from omniseg.data.meta import DatasetMeta
    from omniseg.models.registry import build_model_from_config

    with torch.device("meta"):
        return build_model_from_config(load_config(preset), DatasetMeta(classes=[f"c{i}" for i in range(150)]),
                                       with_backbone_weights=False)


@pytest.mark.parametrize("preset, qd_index, shrink", [("segvit_shrunk_vit_b", 6, "shrunk"),
                                                      ("segvit_shrunkpp_vit_b", 2, "shrunkpp")])
def test_full_size_presets_build_the_official_query_upsampling_design(preset, qd_index, shrink):
    cfg = load_config(preset)
    m = cfg.model
    assert (m.shrink, m.qd_index, m.qu_mode, m.qu_grid, m.qu_layers, m.dec_layers) == (shrink, qd_index, "grid", 32, 3, 3)
    assert (m.hidden_dim, m.nheads, m.upsample_mask_logits, m.edge_tau) == (384, 12, True, 0.7)
    assert m.qu_grid * 16 == cfg.data.crop_size == 512  # the learned queries are the training crop's patch grid
    assert (cfg.inference.mode, cfg.inference.crop_size, cfg.inference.stride) == ("slide", 512, 341)

    model = full_size_model(preset)
    assert model.backbone.embed_dim == 768 and len(model.backbone.body.blocks) == 12
    assert model.backbone.qd_index == qd_index and (model.backbone.edge_head is not None) == (shrink == "shrunkpp")
    qu = model.qu
    assert tuple(qu.queries.weight.shape) == (32 * 32, 384)
    assert len(qu.stages) == 2 and [len(stage) for stage in qu.stages] == [3, 3]
    for proj in qu.input_proj:  # Linear(768 -> 384) + LayerNorm per stack, as input_proj_i / proj_norm_i
        assert (proj[0].in_features, proj[0].out_features, proj[1].normalized_shape) == (768, 384, (384,))
    for layer in (layer for stage in qu.stages for layer in stage):
        assert isinstance(layer, nn.TransformerDecoderLayer) and not layer.norm_first
        assert (layer.self_attn.embed_dim, layer.self_attn.num_heads, layer.linear1.out_features) == (384, 12, 1536)
    decoder = model.decoders[0]
    assert decoder.stages == 1 and len(decoder.layers[0]) == 3
    assert isinstance(decoder.input_proj[0], nn.Identity)
    layer = decoder.layers[0][0]
    assert (layer.cross_attn.heads, layer.cross_attn.head_dim, layer.ffn[0].out_features) == (12, 32, 1536)
    assert tuple(decoder.class_tokens.weight.shape) == (150, 384)


def test_grid_model_trains_on_the_crop_with_two_stacks_and_one_atm_stage():
    model = tiny_grid_model().train()
    assert len(model.qu.stages) == 2 and model.decoders[0].stages == 1
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = torch.zeros(2, 64, 64, dtype=torch.long)
    labels[:, 16:48, 8:40] = 2
    targets = [{"labels": torch.tensor([0, 2]), "masks": torch.stack([labels[i] == 0, labels[i] == 2])}
               for i in range(2)]
    feats, _, grid, enc = model.decoder_inputs(model.normalize(images))
    assert tuple(feats[0].shape) == (2, 8 * 8, 32) and grid == (8, 8)  # QU output: the query grid's tokens
    assert tuple(enc.deep.shape) == (2, 16, 32)  # after QD: a quarter of the 64 tokens
    losses = model.losses(images, targets)
    # one ATM stage: every layer supervised (the last unsuffixed, as the official dec_layers=3)
    assert sorted(losses) == sorted(f"loss_{k}{s}" for k in ("ce", "focal", "dice") for s in ("", "_0", "_1"))
    sum(losses.values()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert model.qu.queries.weight.grad.abs().sum() > 0


def test_smaller_inputs_are_padded_to_the_grid_and_their_masks_cropped_back():
    model = tiny_grid_model().eval()
    image = torch.randint(0, 256, (1, 3, 32, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    padded = torch.zeros(1, 3, 64, 64, dtype=torch.uint8)  # black, as batches are padded
    padded[..., :32, :48] = image
    with torch.no_grad():
        small = model.network(model.normalize(image))[0][0]
        full = model.network(model.normalize(padded))[0][0]
    for s, f in zip(small, full):
        assert tuple(s["pred_masks"].shape) == (1, 5, 4, 6)
        torch.testing.assert_close(s["pred_masks"], f["pred_masks"][..., :4, :6])
        torch.testing.assert_close(s["pred_logits"], f["pred_logits"])
    strict = tiny_grid_model("model.qu_grid_pad=false").eval()
    with pytest.raises(ValueError, match=r"input is 32x48 px and model.qu_grid_pad is false"):
        strict.predict(image, [(32, 48)])


def test_whole_image_larger_than_the_query_grid_is_refused_with_the_slide_advice():
    model = tiny_grid_model().eval()
    image = torch.zeros(1, 3, 64, 96, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"8x8 query-upsampling queries.*64x64 px training crop.*input is 64x96 px\. "
                                         r".*inference\.mode=slide inference\.crop_size=64 inference\.stride=42"):
        model.predict(image, [(64, 96)])


def test_sliding_windows_predict_any_image_size_with_the_query_grid():
    from omniseg.test_time import InferenceMode, predict_semantic

    model = tiny_grid_model().eval()
    image = torch.randint(0, 256, (3, 100, 75), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    mode = InferenceMode.from_settings({"mode": "slide", "crop_size": 64, "stride": 40})
    out = predict_semantic(model, image, mode, min_size_test=None, with_scores=True)
    assert out["semantic"].shape == (100, 75) and out["semantic_scores"].shape == (5, 100, 75)
    # windows start at rows 0, 36 and columns 0, 11: pixels above row 36 and left of column 11 see only the
    # first window, whose scores are the model's on that 64 x 64 crop
    with torch.no_grad():
        first = model.forward_raw(model.normalize(image[None, :, :64, :64]))["sem_seg"][0]
    torch.testing.assert_close(out["semantic_scores"][:, :36, :11], first[:, :36, :11])
    # rows 64..99 come from the second window row only: not the first window's scores
    assert not torch.allclose(out["semantic_scores"][:, 64:, :11], first[:, 28:, :11])
    # an image shorter than the crop: its windows are padded to the grid inside the model
    short = predict_semantic(model, image[:, :24], mode, min_size_test=None)["semantic"]
    assert short.shape == (24, 75) and int(short.max()) < 5


def test_converting_the_official_shrunk_release_slides_its_crop(monkeypatch):
    """The ViT-L Shrunk release learns a 40 x 40 query grid (640 px): the conversion evaluates it as the
    official test_cfg does (slide, crop 640, stride 608)."""
    from helpers.checkpoint_layouts import load_layout

    from omniseg.hub.converters.segvit import convert as convert_segvit

    tensors = load_layout("segvit_vit-l_shrunk_ade20k")["tensors"]
    monkeypatch.setattr("omniseg.hub.converters.segvit.load_state_dict_file",
                        lambda source: {k: torch.empty(v, device="meta") for k, v in tensors.items()})
    overrides = convert_segvit("segvit_vit-l_shrunk_ade20k", load_config("segvit_shrunk_vit_b")).overrides
    for expected in ("model.qu_grid=40", "model.qd_index=8", "model.nheads=16", "model.hidden_dim=512",
                     "inference.mode=slide", "inference.crop_size=640", "inference.stride=608"):
        assert expected in overrides, overrides
