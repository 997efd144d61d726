"""omniseg convert --from detectron2: Mask2Former, MP-Former and MaskFormer checkpoints in the official layouts.

Two kinds of evidence. (1) Layout fixtures read from the official code (tests/fixtures/checkpoint_layouts):
random tensors in every released name and shape convert with nothing unmapped or missing, and predict.
(2) Parity with HF transformers, whose Mask2Former / MaskFormer checkpoints were converted from these very
files: a random HF model is written in the detectron2 layout with the name table below (read from the
official code, independent of the converter), converted, and must give HF's logits; the same HF model
converted with --from hf must give identical outputs.
"""

from __future__ import annotations

import os
import pickle
import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from helpers.checkpoint_layouts import load_layout, random_state_dict, write_detectron2_pkl, write_torch_checkpoint
from omniseg.api import Predictor, load_model
from omniseg.cli import app
from omniseg.hub.convert import convert
from omniseg.hub.errors import CheckpointError

transformers = pytest.importorskip("transformers")

STAGES = ["stage1", "stage2", "stage3", "stage4"]
ATOL = 1e-4


def pattern(name: str) -> str:
    return re.sub(r"\.\d+(?=\.)", ".N", name)


def _image(h: int = 64, w: int = 96) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------ released layouts

LAYOUT_CASES = {
    # fixture, preset, file format, expected overrides, expected ignored keys (patterns)
    "mask2former_r50": ("mask2former_r50", "pkl", {"model.backbone=resnet50", "model.num_queries=100",
                                                   "model.dec_layers=9", "model.enc_layers=6"},
                        {"criterion.empty_weight"}),
    "mask2former_swin_t": ("mask2former_swin_t", "pkl", {"model.backbone=swin_t", "model.dec_layers=9"},
                           {"criterion.empty_weight", "backbone.layers.N.blocks.N.attn.relative_position_index"}),
    "maskformer_r50": ("maskformer_r50", "pkl", {"model.arch=maskformer", "model.backbone=resnet50",
                                                 "model.dec_layers=6", "model.enc_layers=0"},
                       {"criterion.empty_weight"}),
    "mp_former_r50": ("mp_former_r50", "pth", {"model.backbone=resnet50", "model.num_queries=100"},
                      {"criterion.empty_weight"}),
}


@pytest.mark.parametrize("name", list(LAYOUT_CASES))
def test_released_layout_converts_completely_and_predicts(name, tmp_path):
    preset, fmt, overrides, ignored = LAYOUT_CASES[name]
    layout = load_layout(name)
    sd = random_state_dict(layout, seed=1)
    num_classes = int(sd["sem_seg_head.predictor.class_embed.weight"].shape[0]) - 1
    if fmt == "pkl":
        source = write_detectron2_pkl(tmp_path / "model_final.pkl", sd)
    else:  # detectron2's Checkpointer .pth: the state dict under "model", next to the iteration
        source = write_torch_checkpoint(tmp_path / "model_final.pth", sd, iteration=88500)
    report = convert(source, "detectron2", preset, tmp_path / "m.safetensors")
    assert report["unmapped"] == [] and report["missing"] == [] and report["initialised"] == []
    assert overrides <= set(report["overrides"])
    assert {pattern(k) for k in report["ignored"]} == ignored

    model, cfg, meta = load_model(tmp_path / "m.safetensors")
    ours = model.state_dict()
    assert meta.num_classes == num_classes
    if "resnet" in cfg.model.backbone:  # FrozenBN statistics and the shortcut land where timm reads them
        assert torch.equal(ours["backbone.body.layer1.0.bn2.running_var"], sd["backbone.res2.0.conv2.norm.running_var"])
        assert torch.equal(ours["backbone.body.layer4.0.downsample.0.weight"], sd["backbone.res5.0.shortcut.weight"])
    else:  # patch merging moves to the next stage; the per-level norms become out_norms
        assert torch.equal(ours["backbone.body.layers_3.downsample.reduction.weight"],
                           sd["backbone.layers.2.downsample.reduction.weight"])
        assert torch.equal(ours["backbone.out_norms.res5.bias"], sd["backbone.norm3.bias"])
    if cfg.model.arch == "mask2former":
        assert torch.equal(ours["pixel_decoder.adapter_1.1.weight"], sd["sem_seg_head.pixel_decoder.adapter_1.norm.weight"])
    if name == "mp_former_r50":  # no positional queries in the release; its label embedding feeds mask piloting
        assert cfg.model.mp.enabled and not ours["predictor.query_embed.weight"].any()
        assert torch.equal(ours["mask_pilot.label_enc.weight"], sd["sem_seg_head.predictor.label_enc.weight"])

    result = Predictor(tmp_path / "m.safetensors")(_image())
    assert result["semantic"].shape == (64, 96)
    assert 0 <= int(result["semantic"].min()) and int(result["semantic"].max()) < num_classes


def test_mp_former_checkpoint_under_a_mask2former_preset_sets_its_label_embedding_aside(tmp_path):
    sd = random_state_dict(load_layout("mp_former_r50"), seed=2)
    write_torch_checkpoint(tmp_path / "mp.pth", sd)
    report = convert(tmp_path / "mp.pth", "detectron2", "mask2former_r50", tmp_path / "m.safetensors")
    assert report["missing"] == [] and report["unmapped"] == []
    assert "mask piloting" in report["ignored"]["sem_seg_head.predictor.label_enc.weight"]


def test_unsupported_variants_are_refused_naming_the_component(tmp_path):
    sd = random_state_dict(load_layout("maskformer_r50"), seed=3)
    coco_panoptic = dict(sd)  # TransformerEncoderPixelDecoder: an encoder on res5 inside the pixel decoder
    coco_panoptic["sem_seg_head.pixel_decoder.transformer.encoder.layers.0.linear1.weight"] = torch.zeros(2048, 256)
    write_detectron2_pkl(tmp_path / "pan.pkl", coco_panoptic)
    with pytest.raises(CheckpointError, match="TransformerEncoderPixelDecoder"):
        convert(tmp_path / "pan.pkl", "detectron2", "maskformer_r50", tmp_path / "m.safetensors")
    deeplab_stem = dict(sd, **{"backbone.stem.conv2.weight": torch.zeros(64, 64, 3, 3)})
    write_detectron2_pkl(tmp_path / "r101c.pkl", deeplab_stem)
    with pytest.raises(CheckpointError, match="DeepLab stem"):
        convert(tmp_path / "r101c.pkl", "detectron2", "maskformer_r50", tmp_path / "m.safetensors")
    write_detectron2_pkl(tmp_path / "other.pkl", {"backbone.stem.conv1.weight": torch.zeros(64, 3, 7, 7)})
    with pytest.raises(CheckpointError, match="not a Mask2Former / MaskFormer / MP-Former"):
        convert(tmp_path / "other.pkl", "detectron2", "mask2former_r50", tmp_path / "m.safetensors")


def test_the_cli_converts_the_coco_panoptic_r50_layout_and_predicts(tmp_path):
    write_detectron2_pkl(tmp_path / "model_final_94dc52.pkl", random_state_dict(load_layout("mask2former_r50"), seed=4))
    out = tmp_path / "m2f.safetensors"
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "model_final_94dc52.pkl"), "--from", "detectron2",
                                      "--preset", "mask2former_r50", "--classes", "coco_panoptic", "-o", str(out)])
    assert result.exit_code == 0, result.output
    _, cfg, meta = load_model(out)
    assert meta.num_classes == 133 and meta.classes[0] == "person" and cfg.model.num_queries == 100
    from PIL import Image

    Image.fromarray(_image()).save(tmp_path / "img.png")
    result = CliRunner().invoke(app, ["predict", "-w", str(out), "-i", str(tmp_path / "img.png"), "-o", str(tmp_path / "pred"),
                                      "--task", "semantic"])
    assert result.exit_code == 0, result.output
    assert any((tmp_path / "pred").iterdir())


def test_a_malicious_pkl_is_refused_naming_the_global_and_never_runs(tmp_path):
    marker = tmp_path / "ran"

    class RunsShell:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "model_final.pkl", "wb") as f:
        pickle.dump({"model": {"backbone.stem.conv1.weight": np.zeros(3, np.float32)}, "__author__": RunsShell()}, f)
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "model_final.pkl"), "--from", "detectron2", "--preset",
                                      "mask2former_r50", "-o", str(tmp_path / "out.safetensors")])
    assert result.exit_code == 2 and "refused" in result.output and "system" in result.output, result.output
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


# ------------------------------------------------------------------------------ parity with HF transformers
# HF (as save_pretrained writes it) -> detectron2 names, from the official modules: ResNet stem/resN,
# D2SwinTransformer, MSDeformAttnPixelDecoder / BasePixelDecoder, the masked-attention / DETR decoders.

def _hf_backbone_to_d2(rest: str) -> str | None:
    rest = re.sub(r"^(resnet|swin|model)\.", "", rest)
    m = re.fullmatch(r"embedder\.embedder\.(convolution|normalization)\.(.+)", rest)
    if m:
        return "stem.conv1." + ("norm." if m[1] == "normalization" else "") + m[2]
    m = re.fullmatch(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(shortcut|layer\.(\d))\.(convolution|normalization)\.(.+)", rest)
    if m:
        conv = "shortcut" if m[3] == "shortcut" else f"conv{int(m[4]) + 1}"
        return f"res{int(m[1]) + 2}.{m[2]}.{conv}." + ("norm." if m[5] == "normalization" else "") + m[6]
    m = re.fullmatch(r"hidden_states_norms\.(?:stage)?(\d)\.(.+)", rest)
    if m:  # Mask2Former's SwinBackbone counts stage1..4, MaskFormerSwin 0..3
        return f"norm{int(m[1]) - 1 if 'stage' in rest else int(m[1])}.{m[2]}"
    if rest.startswith("embeddings.patch_embeddings.projection."):
        return "patch_embed.proj." + rest.rsplit(".", 1)[1]
    if rest.startswith("embeddings.norm."):
        return "patch_embed.norm." + rest.rsplit(".", 1)[1]
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(downsample\..+)", rest)
    if m:
        return f"layers.{m[1]}.{m[2]}"
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)", rest)
    if m:
        block = {"layernorm_before": "norm1", "layernorm_after": "norm2", "attention.output.dense": "attn.proj",
                 "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
                 "attention.self.relative_position_bias_table": "attn.relative_position_bias_table",
                 "attention.self.relative_position_index": "attn.relative_position_index"}
        for hf, d2 in block.items():
            if m[3] == hf or m[3].startswith(hf + "."):
                return f"layers.{m[1]}.blocks.{m[2]}.{d2}{m[3][len(hf):]}"
    return None


def _m2f_to_d2(key: str) -> str | None:
    px, tr = "model.pixel_level_module.decoder.", "model.transformer_module."
    if key.startswith(px):
        rest = key[len(px):]
        if rest == "level_embed":
            return "sem_seg_head.pixel_decoder.transformer.level_embed"
        rest = re.sub(r"^input_projections\.", "input_proj.", rest)
        rest = re.sub(r"^mask_projection\.", "mask_features.", rest)
        rest = re.sub(r"^(adapter_1|layer_1)\.0\.", r"\1.", rest)
        rest = re.sub(r"^(adapter_1|layer_1)\.1\.", r"\1.norm.", rest)
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.([a-z_0-9]+)\.(.+)", rest)
        if m:
            child = {"self_attn_layer_norm": "norm1", "fc1": "linear1", "fc2": "linear2",
                     "final_layer_norm": "norm2"}.get(m[2], m[2])
            rest = f"transformer.encoder.layers.{m[1]}.{child}.{m[3]}"
        return "sem_seg_head.pixel_decoder." + rest
    if key.startswith(tr):
        rest = key[len(tr):]
        simple = {"queries_embedder.weight": "query_embed.weight", "queries_features.weight": "query_feat.weight",
                  "level_embed.weight": "level_embed.weight", "decoder.layernorm.weight": "decoder_norm.weight",
                  "decoder.layernorm.bias": "decoder_norm.bias"}
        if rest in simple:
            return "sem_seg_head.predictor." + simple[rest]
        m = re.fullmatch(r"decoder\.mask_predictor\.mask_embedder\.(\d)\.0\.(.+)", rest)
        if m:
            return f"sem_seg_head.predictor.mask_embed.layers.{m[1]}.{m[2]}"
        m = re.fullmatch(r"decoder\.layers\.(\d+)\.([a-z_0-9]+)\.(.+)", rest)
        children = {"self_attn": "transformer_self_attention_layers.{}.self_attn",
                    "self_attn_layer_norm": "transformer_self_attention_layers.{}.norm",
                    "cross_attn": "transformer_cross_attention_layers.{}.multihead_attn",
                    "cross_attn_layer_norm": "transformer_cross_attention_layers.{}.norm",
                    "fc1": "transformer_ffn_layers.{}.linear1", "fc2": "transformer_ffn_layers.{}.linear2",
                    "final_layer_norm": "transformer_ffn_layers.{}.norm"}
        if m and m[2] in children:
            return "sem_seg_head.predictor." + children[m[2]].format(m[1]) + "." + m[3]
        return None
    if key.startswith("class_predictor."):
        return "sem_seg_head.predictor.class_embed." + key.rsplit(".", 1)[1]
    return None


def _maskformer_to_d2(key: str) -> str | None:
    px, tr = "model.pixel_level_module.decoder.", "model.transformer_module."
    if key.startswith(px):
        rest = key[len(px):]
        m = re.fullmatch(r"fpn\.(stem|layers\.(\d)\.(proj|block))\.([01])\.(.+)", rest)
        if m:  # BasePixelDecoder: layer_4 on res5; adapter_i / layer_i on res2..res4 (HF counts res4 first)
            name = "layer_4" if m[1] == "stem" else f"{'adapter' if m[3] == 'proj' else 'layer'}_{3 - int(m[2])}"
            return f"sem_seg_head.pixel_decoder.{name}." + ("norm." if m[4] == "1" else "") + m[5]
        if rest.startswith("mask_projection."):
            return "sem_seg_head.pixel_decoder.mask_features." + rest.rsplit(".", 1)[1]
        return None
    if key.startswith(tr):
        rest = key[len(tr):]
        simple = {"queries_embedder": "query_embed", "input_projection": "input_proj",
                  "decoder.layernorm": "transformer.decoder.norm"}
        for hf, d2 in simple.items():
            if rest.startswith(hf + "."):
                return f"sem_seg_head.predictor.{d2}.{rest.rsplit('.', 1)[1]}"
        m = re.fullmatch(r"decoder\.layers\.(\d+)\.([a-z_0-9]+)\.(.+)", rest)
        children = {"self_attn": "self_attn", "encoder_attn": "multihead_attn", "self_attn_layer_norm": "norm1",
                    "encoder_attn_layer_norm": "norm2", "final_layer_norm": "norm3", "fc1": "linear1", "fc2": "linear2"}
        if m and m[2] in children:
            return f"sem_seg_head.predictor.transformer.decoder.layers.{m[1]}.{children[m[2]]}.{m[3]}"
        return None
    if key.startswith("class_predictor."):
        return "sem_seg_head.predictor.class_embed." + key.rsplit(".", 1)[1]
    m = re.fullmatch(r"mask_embedder\.(\d)\.0\.(.+)", key)
    if m:
        return f"sem_seg_head.predictor.mask_embed.layers.{m[1]}.{m[2]}"
    return None


def _swin_relative_position_index(window: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def hf_to_detectron2(hf_sd: dict[str, torch.Tensor], head_table) -> dict[str, torch.Tensor]:
    """An HF Mask2Former / MaskFormer state dict (on-disk names) in the detectron2 layout; q/k/v are packed
    into nn.MultiheadAttention's in_proj (rows q, k, v) and Swin's qkv."""
    out, packs = {}, {}
    backbone = "model.pixel_level_module.encoder."
    for key, value in hf_sd.items():
        if key.endswith("num_batches_tracked") or re.search(r"(^|\.)(swin|model)\.layernorm\.", key):
            continue  # BN counters (FrozenBN has none); the classification norm D2's Swin does not build
        m = re.fullmatch(r"(.+)\.(?:attention\.self\.(query|key|value)|(self_attn|encoder_attn)\.([qkv])_proj)\.(weight|bias)", key)
        if m:
            part = m[2] or m[4]
            base = f"{m[1]}.attention.self.QKV" if m[2] else f"{m[1]}.{m[3]}.QKV"
            packs.setdefault((base, m[5]), {})[part[0]] = value
            continue
        if key == "criterion.empty_weight":
            out[key] = value
            continue
        new = "backbone." + (_hf_backbone_to_d2(key[len(backbone):]) or "?") if key.startswith(backbone) else head_table(key)
        assert new is not None and "?" not in new, f"no detectron2 name for {key}"
        out[new] = value
    for (base, kind), parts in packs.items():
        packed = torch.cat([parts["q"], parts["k"], parts["v"]])
        if base.endswith("attention.self.QKV"):
            d2 = "backbone." + _hf_backbone_to_d2(base[len(backbone):].replace("attention.self.QKV", "attention.output.dense.x"))
            out[d2.replace("attn.proj.x", f"attn.qkv.{kind}")] = packed
        else:
            d2 = head_table(base.replace("QKV", "out_proj.x"))
            out[d2.replace("out_proj.x", f"in_proj_{kind}")] = packed
    for key in [k for k in out if k.endswith("relative_position_bias_table")]:
        index = key.replace("relative_position_bias_table", "relative_position_index")
        out.setdefault(index, _swin_relative_position_index((int(out[key].shape[0] ** 0.5) + 1) // 2))
    return out


def _randomise(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.add_(0.05 * torch.randn(t.shape, generator=g))


def _backbone_config(kind: str, mask2former: bool):
    if kind == "resnet":  # R-50 as released: torchvision-style, stride in the 3x3 conv
        return transformers.ResNetConfig(depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048],
                                         layer_type="bottleneck", downsample_in_bottleneck=False, out_features=STAGES)
    return transformers.SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7,
                                   out_features=STAGES)


def _hf_model(arch: str, kind: str):
    torch.manual_seed(0)
    names = {i: f"class_{i}" for i in range(5)}
    common = dict(id2label=names, label2id={v: k for k, v in names.items()})
    if arch == "mask2former":
        config = transformers.Mask2FormerConfig(
            backbone_config=_backbone_config(kind, True), hidden_dim=64, feature_size=64, mask_feature_size=64,
            encoder_layers=2, decoder_layers=4, num_queries=10, encoder_feedforward_dim=128, dim_feedforward=128,
            **common)
        model = transformers.Mask2FormerForUniversalSegmentation(config)
    else:
        decoder = transformers.DetrConfig(d_model=64, decoder_layers=3, decoder_attention_heads=8, decoder_ffn_dim=128,
                                          num_queries=10, encoder_layers=0)
        config = transformers.MaskFormerConfig(backbone_config=_backbone_config(kind, False), decoder_config=decoder,
                                               fpn_feature_size=64, mask_feature_size=64, **common)
        model = transformers.MaskFormerForInstanceSegmentation(config)
    model.eval()
    _randomise(model, seed=1)
    return model


PARITY_CASES = {
    "mask2former_resnet": ("mask2former", "resnet", "mask2former_r50", "mask2former_r50"),
    "mask2former_swin": ("mask2former", "swin", "mask2former_swin_t", "mask2former_swin_t"),
    "maskformer_resnet": ("maskformer", "resnet", "maskformer_r50", "maskformer_r50"),
    "maskformer_swin": ("maskformer", "swin", "maskformer_r50", None),
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_hf_weights_in_the_detectron2_layout_convert_to_hf_outputs(case, tmp_path):
    from safetensors.torch import load_file

    arch, kind, preset, fixture = PARITY_CASES[case]
    hf = _hf_model(arch, kind)
    hf.save_pretrained(tmp_path / "hf")
    d2 = hf_to_detectron2(load_file(tmp_path / "hf" / "model.safetensors"),
                          _m2f_to_d2 if arch == "mask2former" else _maskformer_to_d2)
    if fixture is not None:  # the written names follow the released layout: same patterns, same backbone names
        released = load_layout(fixture)["tensors"]
        assert {pattern(k) for k in d2} == {pattern(k) for k in released}
        assert {k for k in d2 if k.startswith("backbone.")} == {k for k in released if k.startswith("backbone.")}
    write_detectron2_pkl(tmp_path / "model_final.pkl", d2)
    report = convert(tmp_path / "model_final.pkl", "detectron2", preset, tmp_path / "d2.safetensors")
    assert report["unmapped"] == [] and report["missing"] == []
    model, cfg, _ = load_model(tmp_path / "d2.safetensors")
    assert cfg.model.num_queries == 10 and cfg.model.hidden_dim == 64

    x = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = hf(pixel_values=x)
        ours = model.eval().forward_raw(x, aux_outputs=False)
    torch.testing.assert_close(ours["pred_logits"], theirs.class_queries_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours["pred_masks"], theirs.masks_queries_logits, atol=ATOL, rtol=0)

    convert(tmp_path / "hf", "hf", preset, tmp_path / "hf.safetensors")
    via_hf, _, _ = load_model(tmp_path / "hf.safetensors")
    with torch.no_grad():
        other = via_hf.eval().forward_raw(x, aux_outputs=False)
    # the same weights; only float rounding differs (HF MaskFormer folders build BatchNorm, detectron2 FrozenBN)
    torch.testing.assert_close(ours["pred_logits"], other["pred_logits"], atol=ATOL, rtol=0)
    torch.testing.assert_close(ours["pred_masks"], other["pred_masks"], atol=ATOL, rtol=0)
