"""HF transformers `Mask2FormerForUniversalSegmentation` checkpoints -> omniseg Mask2Former modules.

omniseg names: `backbone.*` (TimmBackbone: `body.*` timm weights, `out_norms.*` for Swin),
`pixel_decoder.*` (MSDeformAttnPixelDecoder), `predictor.*` (MultiScaleMaskedTransformerDecoder).

A local HF folder (config.json + model.safetensors) loads with `load_hf_mask2former_folder`; nothing
is downloaded.
"""

from __future__ import annotations

import os
import re

import torch
from torch import nn

from omniseg.hub import CheckpointError, load_state_dict_file, report_load
from omniseg.hub.hf_folder import model_settings, read_hf_folder
from omniseg.hub.hf_backbones import (
    convert_hf_resnet_to_timm,
    convert_hf_swin_to_timm,
    hf_resnet_config_to_timm,
    hf_swin_config_to_timm,
    hf_swin_output_norms,
)

HF_BACKBONE_PREFIX = "model.pixel_level_module.encoder."
HF_PIXEL_DECODER_PREFIX = "model.pixel_level_module.decoder."
HF_TRANSFORMER_PREFIX = "model.transformer_module."


# ------------------------------------------------------------------------------------------ config

def hf_backbone_settings(hf_config: dict, family: str) -> tuple[str, dict]:
    """The backbone of an HF Mask2Former / OneFormer config -> (omniseg backbone name, its kwargs)."""
    backbone_cfg = hf_config.get("backbone_config")
    if backbone_cfg is not None and not isinstance(backbone_cfg, dict):
        backbone_cfg = backbone_cfg.to_dict()
    if backbone_cfg is None:
        if hf_config.get("use_timm_backbone") and hf_config.get("backbone"):
            return hf_config["backbone"], {}  # weights are timm's already
        raise CheckpointError(f"{family} config without backbone_config is not supported")
    kind = backbone_cfg.get("model_type")
    out_features = backbone_cfg.get("out_features") or ["stage1", "stage2", "stage3", "stage4"]
    if list(out_features) != ["stage1", "stage2", "stage3", "stage4"]:
        raise CheckpointError(f"backbone out_features must be stage1..stage4, got {out_features}")
    if kind == "resnet":
        return hf_resnet_config_to_timm(backbone_cfg)
    if kind == "swin":
        backbone, backbone_kwargs = hf_swin_config_to_timm(backbone_cfg)
        backbone_kwargs["out_norms"] = True  # HF SwinBackbone normalises every returned stage
        return backbone, backbone_kwargs
    raise CheckpointError(f"unsupported {family} backbone type {kind!r} (resnet, swin)")


def hf_class_names(hf_config: dict, family: str) -> list[str]:
    """Class names from `id2label` (or `class_i` for `num_labels` classes without names)."""
    id2label = hf_config.get("id2label") or {}
    num_classes = len(id2label) if id2label else int(hf_config.get("num_labels", 0))
    if num_classes <= 0:
        raise CheckpointError(f"{family} config has no id2label / num_labels")
    return [str(id2label.get(str(i), id2label.get(i, f"class_{i}"))) for i in range(num_classes)]


def hf_mask2former_config_to_omniseg(hf_config: dict) -> dict:
    """HF `Mask2FormerConfig` (config.json as a dict) -> omniseg Mask2Former settings.

    `dec_layers` is the number of decoder layers actually built (HF's `decoder_layers` - 1, like
    detectron2's DEC_LAYERS - 1); `backbone_kwargs` go to `TimmBackbone(backbone, **backbone_kwargs)`.
    """
    if hf_config.get("model_type", "mask2former") != "mask2former":
        raise CheckpointError(f"not a Mask2Former config (model_type={hf_config.get('model_type')!r})")
    backbone, backbone_kwargs = hf_backbone_settings(hf_config, "Mask2Former")
    if list(hf_config.get("feature_strides", [4, 8, 16, 32])) != [4, 8, 16, 32]:
        raise CheckpointError(f"feature_strides must be [4, 8, 16, 32], got {hf_config.get('feature_strides')}")
    class_names = hf_class_names(hf_config, "Mask2Former")
    num_classes = len(class_names)
    return {
        "backbone": backbone,
        "backbone_kwargs": backbone_kwargs,
        "num_classes": num_classes,
        "hidden_dim": int(hf_config.get("hidden_dim", 256)),
        "num_queries": int(hf_config.get("num_queries", 100)),
        "nheads": int(hf_config.get("num_attention_heads", 8)),
        "dim_feedforward": int(hf_config.get("dim_feedforward", 2048)),
        "dec_layers": int(hf_config.get("decoder_layers", 10)) - 1,
        "pre_norm": bool(hf_config.get("pre_norm", False)),
        "enforce_input_project": bool(hf_config.get("enforce_input_projection", False)),
        "enc_layers": int(hf_config.get("encoder_layers", 6)),
        "enc_dim_feedforward": int(hf_config.get("encoder_feedforward_dim", 1024)),
        "conv_dim": int(hf_config.get("feature_size", 256)),
        "mask_dim": int(hf_config.get("mask_feature_size", 256)),
        "common_stride": int(hf_config.get("common_stride", 4)),
        "enc_num_points": 4,  # hard-coded in HF (and the official configs)
        "class_names": class_names,
    }


def build_mask2former_modules(cfg: dict, *, backbone_norm: str = "frozen_bn") -> nn.ModuleDict:
    """omniseg settings (see `hf_mask2former_config_to_omniseg`) -> ModuleDict(backbone, pixel_decoder,
    predictor) with random weights, named as `convert_hf_mask2former_state_dict` produces them."""
    from omniseg.models.maskformer.model import MaskFormer

    model = MaskFormer({**model_settings(cfg), "arch": "mask2former", "backbone_norm": backbone_norm},
                       num_classes=cfg["num_classes"])
    return nn.ModuleDict({"backbone": model.backbone, "pixel_decoder": model.pixel_decoder, "predictor": model.predictor})


def build_omniseg_modules_from_hf_config(hf_config: dict, *, backbone_norm: str = "frozen_bn") -> nn.ModuleDict:
    """HF Mask2Former config dict -> ModuleDict(backbone, pixel_decoder, predictor), random weights."""
    return build_mask2former_modules(hf_mask2former_config_to_omniseg(hf_config), backbone_norm=backbone_norm)


# ------------------------------------------------------------------------------------ state dict

_PIXEL_DECODER_LAYER_RENAMES = {"self_attn_layer_norm": "norm1", "fc1": "linear1", "fc2": "linear2",
                                "final_layer_norm": "norm2"}
_DECODER_LAYER_RENAMES = {  # HF layer child -> (omniseg ModuleList, child)
    "self_attn_layer_norm": ("transformer_self_attention_layers", "norm"),
    "self_attn.out_proj": ("transformer_self_attention_layers", "self_attn.out_proj"),
    "cross_attn_layer_norm": ("transformer_cross_attention_layers", "norm"),
    "cross_attn": ("transformer_cross_attention_layers", "multihead_attn"),
    "fc1": ("transformer_ffn_layers", "linear1"),
    "fc2": ("transformer_ffn_layers", "linear2"),
    "final_layer_norm": ("transformer_ffn_layers", "norm"),
}


def convert_pixel_decoder_key(k: str) -> str | None:
    if k == "level_embed":
        return "transformer.level_embed"
    if k.startswith("input_projections."):
        return "input_proj." + k[len("input_projections."):]
    if k.startswith("mask_projection."):
        return "mask_features." + k[len("mask_projection."):]
    if re.match(r"(adapter|layer)_\d+\.", k):
        return k
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.([a-z_0-9]+)\.(.+)", k)
    if m:
        child = m[2] if m[2] == "self_attn" else _PIXEL_DECODER_LAYER_RENAMES.get(m[2])
        if child is not None:
            return f"transformer.layers.{m[1]}.{child}.{m[3]}"
    return None


def _convert_transformer_key(k: str) -> str | None:
    simple = {"queries_embedder.weight": "query_embed.weight", "queries_features.weight": "query_feat.weight",
              "level_embed.weight": "level_embed.weight"}
    if k in simple:
        return simple[k]
    if k.startswith("input_projections."):
        return "input_proj." + k[len("input_projections."):]
    if k.startswith("decoder.layernorm."):
        return "decoder_norm." + k[len("decoder.layernorm."):]
    m = re.fullmatch(r"decoder\.mask_predictor\.mask_embedder\.(\d+)\.0\.(weight|bias)", k)
    if m:
        return f"mask_embed.layers.{m[1]}.{m[2]}"
    m = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", k)
    if m:
        layer, rest = m[1], m[2]
        for hf_child, (group, child) in _DECODER_LAYER_RENAMES.items():
            if rest.startswith(hf_child + "."):
                return f"{group}.{layer}.{child}.{rest[len(hf_child) + 1:]}"
    return None


def pack_qkv(hf_sd: dict, pattern: str, target: str, out: dict) -> set[str]:
    """HF attention with separate q/k/v projections -> nn.MultiheadAttention packing (rows [q; k; v]).

    `pattern` is a regex with groups (layer, q|k|v, weight|bias); `target` a format string with {layer}
    and {name} (in_proj_weight / in_proj_bias). Fills `out`; returns the HF keys it used."""
    used = set()
    regex = re.compile(pattern)
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for k, v in hf_sd.items():
        m = regex.fullmatch(k)
        if m:
            parts.setdefault((m[1], m[3]), {})[m[2]] = v
            used.add(k)
    for (layer, kind), qkv in parts.items():
        if sorted(qkv) != ["k", "q", "v"]:
            raise CheckpointError(f"decoder layer {layer}: incomplete self-attention q/k/v {kind}")
        name = "in_proj_weight" if kind == "weight" else "in_proj_bias"
        out[target.format(layer=layer, name=name)] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], 0)
    return used


def convert_hf_backbone(backbone_sd: dict[str, torch.Tensor], backbone: str) -> dict[str, torch.Tensor]:
    """HF backbone weights (prefix removed) -> omniseg `backbone.*` keys. `backbone` names the family:
    "resnet..." or "swin..." (an omniseg/timm backbone name or HF model_type)."""
    if any(k.startswith("_backbone.") for k in backbone_sd):  # HF wrapping a timm model: already timm names
        return {"backbone.body." + k[len("_backbone."):]: v for k, v in backbone_sd.items()}
    if "swin" in backbone.lower():
        out = {"backbone.body." + k: v for k, v in convert_hf_swin_to_timm(backbone_sd).items()}
        out.update({"backbone.out_norms." + k: v for k, v in hf_swin_output_norms(backbone_sd).items()})
        return out
    if "resnet" in backbone.lower():
        return {"backbone.body." + k: v for k, v in convert_hf_resnet_to_timm(backbone_sd).items()}
    raise CheckpointError(f"unsupported backbone {backbone!r} for HF conversion (resnet, swin)")


def convert_hf_mask_classification_state_dict(hf_sd: dict[str, torch.Tensor], *, backbone: str, family: str,
                                              self_attention: tuple[str, str], convert_key) -> dict[str, torch.Tensor]:
    """Shared by the HF Mask2Former and OneFormer converters: backbone and pixel decoder convert here,
    `self_attention` = (regex, target) packs the decoder's separate q/k/v (see `pack_qkv`), and
    `convert_key(hf_key)` maps every other key (None = unknown). Unknown keys raise CheckpointError;
    the loss's class-weight buffer is dropped."""
    out: dict[str, torch.Tensor] = {}
    used = pack_qkv(hf_sd, self_attention[0], self_attention[1], out)
    backbone_sd, unknown = {}, []
    for k, v in hf_sd.items():
        if k in used or k == "criterion.empty_weight":
            continue
        if k.startswith(HF_BACKBONE_PREFIX):
            backbone_sd[k[len(HF_BACKBONE_PREFIX):]] = v
            continue
        if k.startswith(HF_PIXEL_DECODER_PREFIX):
            new = convert_pixel_decoder_key(k[len(HF_PIXEL_DECODER_PREFIX):])
            new = new and "pixel_decoder." + new
        else:
            new = convert_key(k)
        if new is None:
            unknown.append(k)
        else:
            out[new] = v
    if unknown:
        raise CheckpointError(f"{len(unknown)} HF {family} weights have no omniseg counterpart, e.g. {unknown[:5]}")
    out.update(convert_hf_backbone(backbone_sd, backbone))
    return out


def _convert_mask2former_key(k: str) -> str | None:
    if k.startswith(HF_TRANSFORMER_PREFIX):
        new = _convert_transformer_key(k[len(HF_TRANSFORMER_PREFIX):])
        return new and "predictor." + new
    if k.startswith("class_predictor."):
        return "predictor.class_embed." + k[len("class_predictor."):]
    return None


def convert_hf_mask2former_state_dict(hf_sd: dict[str, torch.Tensor], *, backbone: str) -> dict[str, torch.Tensor]:
    """HF Mask2FormerForUniversalSegmentation state dict -> omniseg `backbone.* / pixel_decoder.* /
    predictor.*` keys. `backbone` names the family: "resnet..." or "swin..." (an omniseg/timm
    backbone name or HF model_type). Unknown keys raise CheckpointError; the loss buffer is dropped."""
    self_attention = (re.escape(HF_TRANSFORMER_PREFIX) + r"decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)",
                      "predictor.transformer_self_attention_layers.{layer}.self_attn.{name}")
    return convert_hf_mask_classification_state_dict(hf_sd, backbone=backbone, family="Mask2Former",
                                                     self_attention=self_attention, convert_key=_convert_mask2former_key)


# ------------------------------------------------------------------------------------ one call

def load_hf_mask2former_folder(path: str | os.PathLike, *, backbone_norm: str = "frozen_bn"
                               ) -> tuple[nn.ModuleDict, dict]:
    """A local HF Mask2Former folder (config.json + model.safetensors / pytorch_model.bin) ->
    (ModuleDict(backbone, pixel_decoder, predictor) with its weights, omniseg settings dict)."""
    hf_config, weights = read_hf_folder(path)
    cfg = hf_mask2former_config_to_omniseg(hf_config)
    modules = build_mask2former_modules(cfg, backbone_norm=backbone_norm)
    backbone_kind = (hf_config.get("backbone_config") or {}).get("model_type") or cfg["backbone"]
    state = convert_hf_mask2former_state_dict(load_state_dict_file(weights), backbone=backbone_kind)
    report_load(modules, state, source=str(weights), strict=True)
    return modules, cfg
