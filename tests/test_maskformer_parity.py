"""Numerical parity of omniseg's MaskFormer modules with HF transformers' MaskFormer.

A small HF `MaskFormerForInstanceSegmentation` (ResNet or MaskFormerSwin backbone) is built offline with random weights,
every tensor (norm affines, biases and BatchNorm statistics included) is perturbed so that a swapped
or mis-mapped tensor cannot go unnoticed, and its state dict is converted with
`omniseg.hub.hf_maskformer`. Outputs must agree within 1e-4 (+1e-5 relative) in fp32 eval mode.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from omniseg.hub import CheckpointError, report_load  # noqa: E402
from omniseg.hub.hf_maskformer import (  # noqa: E402
    build_omniseg_modules_from_hf_maskformer_config,
    convert_hf_maskformer_state_dict,
    hf_maskformer_config_to_omniseg,
)

ATOL = 1e-4
# Mask logits reach ~50 with randomised weights; fp32 sums over 64 channels then differ by ~1e-6 relative.
RTOL = 1e-5
NUM_LABELS = 5
DEC_LAYERS = 3


def _hf_config(backbone: str = "resnet"):
    if backbone == "resnet":
        backbone_config = transformers.ResNetConfig(depths=[1, 1, 1, 1], hidden_sizes=[64, 128, 256, 512],
                                                    layer_type="basic",
                                                    out_features=["stage1", "stage2", "stage3", "stage4"])
    else:  # window 5 does not divide any stage size (32, 16, 8, 4): padding and shift masks are exercised
        backbone_config = transformers.SwinConfig(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4],
                                                  window_size=5, image_size=128,
                                                  out_features=["stage1", "stage2", "stage3", "stage4"])
    decoder = transformers.DetrConfig(d_model=64, decoder_layers=DEC_LAYERS, decoder_attention_heads=4,
                                      decoder_ffn_dim=128, num_queries=10, encoder_layers=0)
    return transformers.MaskFormerConfig(
        backbone_config=backbone_config, decoder_config=decoder, fpn_feature_size=64, mask_feature_size=64,
        num_labels=NUM_LABELS, use_auxiliary_loss=True, output_auxiliary_logits=True,
        id2label={i: f"class_{i}" for i in range(NUM_LABELS)}, label2id={f"class_{i}": i for i in range(NUM_LABELS)})


def _randomise_(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Add noise to every parameter and buffer, so no tensor keeps a value (0, 1) that would hide a mapping bug."""
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=generator) * 0.1
            if name.endswith("running_var"):
                t.copy_(t * (1.0 + noise.abs()) + 0.05)  # keep variances positive
            else:
                t.add_(noise)


@pytest.fixture(scope="module", params=["resnet", "swin"])
def models_and_outputs(request):
    torch.manual_seed(0)
    hf_config = _hf_config(request.param)
    hf = transformers.MaskFormerForInstanceSegmentation(hf_config).eval()
    _randomise_(hf, torch.Generator().manual_seed(1))

    cfg = hf_maskformer_config_to_omniseg(hf_config.to_dict())
    ours = build_omniseg_modules_from_hf_maskformer_config(cfg).eval()
    converted = convert_hf_maskformer_state_dict(hf.state_dict(), backbone=cfg)
    report_load(ours, converted, source="converted HF MaskFormer", strict=True)

    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hf_out = hf(images, output_hidden_states=True)
        features = ours["backbone"](images)
        mask_features, multi_scale = ours["pixel_decoder"](features)
        our_out = ours["predictor"](multi_scale, mask_features)
    return dict(kind=request.param, hf=hf, cfg=cfg, ours=ours, converted=converted, hf_out=hf_out, features=features, mask_features=mask_features,
                our_out=our_out)


def test_config_conversion(models_and_outputs):
    cfg, ours = models_and_outputs["cfg"], models_and_outputs["ours"]
    if models_and_outputs["kind"] == "resnet":
        assert cfg["backbone"] == "resnet18" and list(cfg["backbone_kwargs"]["layers"]) == [1, 1, 1, 1]
        assert [s.channels for s in ours["backbone"].specs.values()] == [64, 128, 256, 512]
        assert ours["backbone"].out_norms is None
    else:
        assert cfg["backbone_type"] == "swin" and cfg["backbone_kwargs"]["out_norms"]
        assert [s.channels for s in ours["backbone"].specs.values()] == [16, 32, 64, 128]
    assert [s.stride for s in ours["backbone"].specs.values()] == [4, 8, 16, 32]
    assert (cfg["num_classes"], cfg["hidden_dim"], cfg["num_queries"], cfg["nheads"]) == (NUM_LABELS, 64, 10, 4)
    assert (cfg["dim_feedforward"], cfg["dec_layers"], cfg["enc_layers"]) == (128, DEC_LAYERS, 0)
    assert (cfg["conv_dim"], cfg["mask_dim"]) == (64, 64)
    assert cfg["class_names"] == [f"class_{i}" for i in range(NUM_LABELS)]


def test_weights_saved_by_transformers_convert_the_same(models_and_outputs, tmp_path):
    """save_pretrained writes the older key names (fc1, out_proj, ...); both spellings must convert alike."""
    from omniseg.hub import load_state_dict_file

    models_and_outputs["hf"].save_pretrained(tmp_path)
    on_disk = load_state_dict_file(tmp_path / "model.safetensors")
    converted = convert_hf_maskformer_state_dict(on_disk, backbone=models_and_outputs["cfg"])
    expected = models_and_outputs["converted"]
    # buffers that transformers does not save (e.g. Swin's relative_position_index) are never converted
    assert sorted(converted) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(converted[key], value), key


def test_backbone_and_pixel_decoder_match(models_and_outputs):
    m = models_and_outputs
    hf_feats = m["hf_out"].encoder_hidden_states
    for name, hf_feat in zip(("res2", "res3", "res4", "res5"), hf_feats):
        torch.testing.assert_close(m["features"][name], hf_feat, atol=ATOL, rtol=RTOL)
    assert m["mask_features"].shape == (2, 64, 32, 32)
    torch.testing.assert_close(m["mask_features"], m["hf_out"].pixel_decoder_last_hidden_state, atol=ATOL, rtol=RTOL)


def test_final_predictions_match(models_and_outputs):
    m = models_and_outputs
    assert m["our_out"]["pred_logits"].shape == (2, 10, NUM_LABELS + 1)
    assert m["our_out"]["pred_masks"].shape == (2, 10, 32, 32)
    torch.testing.assert_close(m["our_out"]["pred_logits"], m["hf_out"].class_queries_logits, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(m["our_out"]["pred_masks"], m["hf_out"].masks_queries_logits, atol=ATOL, rtol=RTOL)


def test_every_decoder_layer_matches(models_and_outputs):
    """aux_outputs[l] = heads(decoder_norm(output of layer l+1)), as in the original MaskFormer.

    HF's own `auxiliary_logits` skip that shared LayerNorm (and add a prediction from the all-zero
    decoder input), so the reference is built from HF's per-layer hidden states and HF's own modules.
    """
    m = models_and_outputs
    hf, hf_out = m["hf"], m["hf_out"]
    hidden = hf_out.transformer_decoder_hidden_states  # (decoder input, layer 1, ..., layer L-1, norm(layer L))
    assert len(hidden) == DEC_LAYERS + 1
    aux = m["our_out"]["aux_outputs"]
    assert len(aux) == DEC_LAYERS - 1
    norm = hf.model.transformer_module.decoder.layernorm
    pixel_embeddings = hf_out.pixel_decoder_last_hidden_state
    with torch.no_grad():
        for layer, pred in enumerate(aux, start=1):
            queries = norm(hidden[layer])
            ref_logits = hf.class_predictor(queries)
            ref_masks = torch.einsum("bqc,bchw->bqhw", hf.mask_embedder(queries), pixel_embeddings)
            torch.testing.assert_close(pred["pred_logits"], ref_logits, atol=ATOL, rtol=RTOL)
            torch.testing.assert_close(pred["pred_masks"], ref_masks, atol=ATOL, rtol=RTOL)
    # The layers must really differ, or comparing them layer by layer would prove nothing.
    assert (aux[0]["pred_logits"] - m["our_out"]["pred_logits"]).abs().max() > 1e-2


def test_converter_refuses_unknown_keys(models_and_outputs):
    sd = dict(models_and_outputs["hf"].state_dict())
    sd["model.transformer_module.decoder.extra_head.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="extra_head"):
        convert_hf_maskformer_state_dict(sd, backbone=models_and_outputs["cfg"])


def test_unsupported_backbone_config_is_reported():
    cfg = _hf_config("resnet").to_dict()
    cfg["backbone_config"]["embedding_size"] = 32
    with pytest.raises(CheckpointError, match="embedding_size"):
        hf_maskformer_config_to_omniseg(cfg)


def test_encoder_and_pre_norm_variants_use_every_parameter():
    """The paths HF cannot check (a DETR encoder on res5, pre-norm layers) still wire every weight in."""
    from omniseg.models.maskformer.detr_decoder import DetrTransformerPredictor

    torch.manual_seed(0)
    for pre_norm in (False, True):
        predictor = DetrTransformerPredictor(48, num_classes=3, hidden_dim=32, num_queries=4, nheads=4,
                                             dim_feedforward=64, enc_layers=2, dec_layers=2, pre_norm=pre_norm,
                                             mask_dim=16)
        _randomise_(predictor, torch.Generator().manual_seed(3))  # no zero bias may hide an unused weight
        out = predictor([torch.randn(2, 48, 4, 4)], torch.randn(2, 16, 16, 16))
        assert out["pred_logits"].shape == (2, 4, 4) and out["pred_masks"].shape == (2, 4, 16, 16)
        assert len(out["aux_outputs"]) == 1
        loss = out["pred_logits"].square().sum() + out["pred_masks"].square().mean()
        loss = loss + sum(a["pred_logits"].square().sum() + a["pred_masks"].square().mean() for a in out["aux_outputs"])
        loss.backward()
        # The first layer's targets are all zeros (as in DETR): post-norm, its self-attention input
        # projection only ever sees zeros; pre-norm, LayerNorm(0) is its bias whatever the weight.
        inert = {"decoder_layers.0.norm1.weight"} if pre_norm else {"decoder_layers.0.self_attn.in_proj_weight"}
        unused = [n for n, p in predictor.named_parameters()
                  if n not in inert and (p.grad is None or not p.grad.abs().sum() > 0)]
        assert not unused, f"pre_norm={pre_norm}: parameters without gradient: {unused}"
