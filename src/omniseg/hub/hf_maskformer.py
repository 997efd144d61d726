"""HF transformers `MaskFormerForInstanceSegmentation` checkpoints -> omniseg MaskFormer modules.

Only names and layouts change, never values: the converted model reproduces HF's final outputs to
float rounding (tests/test_maskformer_parity.py). One deliberate difference: omniseg's auxiliary
predictions follow the original MaskFormer (every decoder layer's output through the shared final
LayerNorm), whereas HF's `auxiliary_logits` feed the heads the un-normalised layer outputs and the
all-zero decoder input.

Layout map (HF -> omniseg):
  model.pixel_level_module.encoder.*                 -> backbone.body.*   (timm names, via hub.hf_backbones)
  ...encoder.hidden_states_norms.i (MaskFormerSwin)   -> backbone.out_norms.res{i+2}
  model.pixel_level_module.decoder.fpn.stem.{0,1}    -> pixel_decoder.output_convs.res5.{0,1}
  ...decoder.fpn.layers.i.proj.{0,1} / block.{0,1}   -> pixel_decoder.lateral_convs.res{4-i} / output_convs.res{4-i}
  ...decoder.mask_projection                          -> pixel_decoder.mask_features
  model.transformer_module.queries_embedder           -> predictor.query_embed
  model.transformer_module.input_projection           -> predictor.input_proj
  ...decoder.layers.i.{self_attn,encoder_attn}.{q,k,v}_proj -> predictor.decoder_layers.i.{self_attn,cross_attn}.in_proj_* (packed q|k|v)
  ...o_proj -> out_proj; self_attn_layer_norm/encoder_attn_layer_norm/final_layer_norm -> norm1/norm2/norm3;
  ...mlp.fc1/fc2 -> linear1/linear2; decoder.layernorm -> predictor.decoder_norm
  class_predictor -> predictor.class_embed; mask_embedder.i.0 -> predictor.mask_embed.layers.i
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from omniseg.hub import CheckpointError

__all__ = [
    "convert_hf_maskformer_state_dict",
    "hf_maskformer_config_to_omniseg",
    "build_omniseg_modules_from_hf_maskformer_config",
]

_BACKBONE_PREFIX = "model.pixel_level_module.encoder."
_PIXEL_DECODER_PREFIX = "model.pixel_level_module.decoder."
_TRANSFORMER_PREFIX = "model.transformer_module."
# Training-only buffers with no omniseg counterpart.
_IGNORED = ("criterion.empty_weight",)

_FPN_LEVELS = ("res4", "res3", "res2")  # HF fpn.layers.0/1/2, coarse to fine


# -- config ---------------------------------------------------------------------------------------------

def _as_dict(config) -> dict:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):  # a transformers PreTrainedConfig
        return config.to_dict()
    raise CheckpointError(f"HF MaskFormer config: expected a dict or a transformers config, got {type(config).__name__}")


def _check_stages(bb: dict, kind: str) -> None:
    out = bb.get("out_features")
    if out is not None and list(out) != ["stage1", "stage2", "stage3", "stage4"]:
        raise CheckpointError(f"HF MaskFormer config: {kind} out_features {out} (MaskFormer reads stage1..stage4)")


def _resnet_backbone(bb: dict) -> tuple[str, dict]:
    """HF ResNetConfig -> (timm model name, TimmBackbone kwargs) building the same network."""
    from omniseg.hub.hf_backbones import hf_resnet_config_to_timm

    if int(bb.get("embedding_size", 64)) != 64:
        raise CheckpointError(f"HF MaskFormer config: ResNet embedding_size {bb.get('embedding_size')} is not "
                              "supported (timm's 7x7 stem is 64 wide)")
    if len(bb.get("depths", (3, 4, 6, 3))) != 4:
        raise CheckpointError(f"HF MaskFormer config: ResNet with {len(bb['depths'])} stages (4 needed)")
    _check_stages(bb, "ResNet")
    name, kwargs = hf_resnet_config_to_timm(bb)
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    if int(bb.get("num_channels", 3)) != 3:
        kwargs["in_chans"] = int(bb["num_channels"])
    return name, kwargs


def _swin_backbone(bb: dict) -> tuple[str, dict]:
    """HF MaskFormerSwinConfig -> (timm model name, TimmBackbone kwargs); windows as in the original Swin."""
    from omniseg.hub.hf_backbones import hf_swin_config_to_timm

    if len(bb.get("depths", (2, 2, 18, 2))) != 4:
        raise CheckpointError(f"HF MaskFormer config: Swin with {len(bb['depths'])} stages (4 needed)")
    # MaskFormerPixelLevelModule forces stage1..stage4 for Swin whatever the config says.
    name, kwargs = hf_swin_config_to_timm(bb)
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    kwargs["out_norms"] = True  # MaskFormerSwin LayerNorms every returned stage
    if int(bb.get("num_channels", 3)) != 3:
        kwargs["in_chans"] = int(bb["num_channels"])
    return name, kwargs


# HF MaskFormerConfig's default backbone (used when config.json has no backbone_config): Swin-B, 384.
_DEFAULT_SWIN = {"model_type": "swin", "depths": [2, 2, 18, 2], "image_size": 384, "embed_dim": 128,
                 "num_heads": [4, 8, 16, 32], "window_size": 12, "out_features": ["stage1", "stage2", "stage3", "stage4"]}


def hf_maskformer_config_to_omniseg(hf_config_dict) -> dict:
    """A HF MaskFormer `config.json` (dict, or a MaskFormerConfig) -> omniseg model settings.

    Returns {arch, backbone (timm name), backbone_kwargs (TimmBackbone keyword arguments),
    backbone_type ("resnet" | "swin"), num_classes, hidden_dim,
    num_queries, nheads, dim_feedforward, dropout, dec_layers, enc_layers, conv_dim, mask_dim,
    class_names}; the keys match the `model` section of omniseg configs.
    """
    cfg = _as_dict(hf_config_dict)
    if cfg.get("model_type", "maskformer") != "maskformer":
        raise CheckpointError(f"HF MaskFormer config: model_type is {cfg.get('model_type')!r}, not 'maskformer'")
    bb = _as_dict(cfg.get("backbone_config") or _DEFAULT_SWIN)
    dec = _as_dict(cfg.get("decoder_config") or {})
    bb_type = bb.get("model_type", "swin")
    if bb_type == "resnet":
        name, kwargs = _resnet_backbone(bb)
    elif bb_type in ("swin", "maskformer-swin"):
        bb_type = "swin"
        name, kwargs = _swin_backbone(bb)
    else:
        raise CheckpointError(f"HF MaskFormer config: unsupported backbone model_type {bb_type!r} (resnet | swin)")
    id2label = cfg.get("id2label") or {}
    if not id2label:
        raise CheckpointError("HF MaskFormer config: no id2label, so the number of classes is unknown")
    ids = sorted(int(k) for k in id2label)
    if ids != list(range(len(ids))):
        raise CheckpointError(f"HF MaskFormer config: id2label keys are not 0..K-1 (got {ids[:10]}...)")
    labels = {int(k): v for k, v in id2label.items()}
    return {
        "arch": "maskformer",
        "backbone": name,
        "backbone_kwargs": kwargs,
        "backbone_type": bb_type,
        "num_classes": len(ids),
        "hidden_dim": int(dec.get("d_model", 256)),
        "num_queries": int(dec.get("num_queries", 100)),
        "nheads": int(dec.get("decoder_attention_heads", 8)),
        "dim_feedforward": int(dec.get("decoder_ffn_dim", 2048)),
        "dropout": float(dec.get("dropout", 0.1)),
        "dec_layers": int(dec.get("decoder_layers", 6)),
        # HF's MaskFormer has no transformer encoder, whatever decoder_config.encoder_layers says.
        "enc_layers": 0,
        "conv_dim": int(cfg.get("fpn_feature_size", 256)),
        "mask_dim": int(cfg.get("mask_feature_size", 256)),
        "class_names": [str(labels[i]) for i in ids],
    }


def build_omniseg_modules_from_hf_maskformer_config(cfg: Mapping) -> nn.ModuleDict:
    """Randomly initialised backbone / pixel_decoder / predictor shaped like the HF model `cfg` describes
    (`cfg` from `hf_maskformer_config_to_omniseg`), ready for `convert_hf_maskformer_state_dict` weights."""
    from omniseg.models.maskformer.model import MaskFormer

    from omniseg.hub.hf_folder import model_settings

    model = MaskFormer({"backbone_norm": "bn", **model_settings(cfg)}, num_classes=cfg["num_classes"])
    return nn.ModuleDict({"backbone": model.backbone, "pixel_decoder": model.pixel_decoder, "predictor": model.predictor})


# -- weights --------------------------------------------------------------------------------------------

def _pixel_decoder_key(rest: str) -> str | None:
    if rest.startswith("fpn.stem."):
        return "pixel_decoder.output_convs.res5." + rest[len("fpn.stem."):]
    m = re.fullmatch(r"fpn\.layers\.(\d+)\.(proj|block)\.(.+)", rest)
    if m and int(m.group(1)) < len(_FPN_LEVELS):
        group = "lateral_convs" if m.group(2) == "proj" else "output_convs"
        return f"pixel_decoder.{group}.{_FPN_LEVELS[int(m.group(1))]}.{m.group(3)}"
    if rest.startswith("mask_projection."):
        return "pixel_decoder.mask_features." + rest[len("mask_projection."):]
    return None


# transformers >= 5 names in memory (o_proj, mlp.fc1) but writes the v4 names (out_proj, fc1) to disk.
_LAYER_RENAMES = {
    "self_attn.o_proj": "self_attn.out_proj",
    "self_attn.out_proj": "self_attn.out_proj",
    "encoder_attn.o_proj": "cross_attn.out_proj",
    "encoder_attn.out_proj": "cross_attn.out_proj",
    "self_attn_layer_norm": "norm1",
    "encoder_attn_layer_norm": "norm2",
    "final_layer_norm": "norm3",
    "mlp.fc1": "linear1",
    "fc1": "linear1",
    "mlp.fc2": "linear2",
    "fc2": "linear2",
}


def _transformer_key(rest: str) -> str | None:
    if rest.startswith("queries_embedder."):
        return "predictor.query_embed." + rest[len("queries_embedder."):]
    if rest.startswith("input_projection."):
        return "predictor.input_proj." + rest[len("input_projection."):]
    if rest.startswith("decoder.layernorm."):
        return "predictor.decoder_norm." + rest[len("decoder.layernorm."):]
    m = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)\.(weight|bias)", rest)
    if m and m.group(2) in _LAYER_RENAMES:
        return f"predictor.decoder_layers.{m.group(1)}.{_LAYER_RENAMES[m.group(2)]}.{m.group(3)}"
    return None


def _backbone_type(backbone) -> str:
    if isinstance(backbone, Mapping):
        backbone = backbone.get("backbone_type", "resnet")
    return str(backbone)


def convert_hf_maskformer_state_dict(hf_sd: Mapping[str, torch.Tensor], *, backbone="resnet") -> dict[str, torch.Tensor]:
    """HF `MaskFormerForInstanceSegmentation` state dict -> omniseg names (`backbone.body.*`,
    `pixel_decoder.*`, `predictor.*`).

    `backbone` is the HF backbone model_type ("resnet", "swin"), or the dict from
    `hf_maskformer_config_to_omniseg`. Any key that is not understood raises CheckpointError rather
    than being dropped silently.
    """
    kind = _backbone_type(backbone)
    if kind not in ("resnet", "swin", "maskformer-swin"):
        raise CheckpointError(f"HF MaskFormer weights: backbone {kind!r} is not supported (resnet | swin)")

    out: dict[str, torch.Tensor] = {}
    backbone_sd: dict[str, torch.Tensor] = {}
    # Packed attention projections: (layer, attention) -> {"q": {"weight": t, "bias": t}, ...}
    qkv: dict[tuple[str, str], dict[str, dict[str, torch.Tensor]]] = {}
    unknown = []
    for key, value in hf_sd.items():
        if key in _IGNORED:
            continue
        if key.startswith(_BACKBONE_PREFIX):
            backbone_sd[key[len(_BACKBONE_PREFIX):]] = value
            continue
        new = None
        if key.startswith(_PIXEL_DECODER_PREFIX):
            new = _pixel_decoder_key(key[len(_PIXEL_DECODER_PREFIX):])
        elif key.startswith(_TRANSFORMER_PREFIX):
            rest = key[len(_TRANSFORMER_PREFIX):]
            m = re.fullmatch(r"decoder\.layers\.(\d+)\.(self_attn|encoder_attn)\.([qkv])_proj\.(weight|bias)", rest)
            if m:
                qkv.setdefault((m.group(1), m.group(2)), {}).setdefault(m.group(3), {})[m.group(4)] = value
                continue
            new = _transformer_key(rest)
        elif key.startswith("class_predictor."):
            new = "predictor.class_embed." + key[len("class_predictor."):]
        else:
            m = re.fullmatch(r"mask_embedder\.(\d+)\.0\.(weight|bias)", key)
            if m:
                new = f"predictor.mask_embed.layers.{m.group(1)}.{m.group(2)}"
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise CheckpointError(f"HF MaskFormer weights: {len(unknown)} keys not understood, e.g. {unknown[:5]}")
    for (layer, attn), parts in sorted(qkv.items()):
        target = "self_attn" if attn == "self_attn" else "cross_attn"
        for param in ("weight", "bias"):
            missing = [p for p in "qkv" if param not in parts.get(p, {})]
            if missing:
                raise CheckpointError(
                    f"HF MaskFormer weights: decoder layer {layer} {attn} lacks {'/'.join(missing)}_proj.{param}")
            out[f"predictor.decoder_layers.{layer}.{target}.in_proj_{param}"] = torch.cat(
                [parts[p][param] for p in "qkv"], dim=0)
    if not backbone_sd:
        raise CheckpointError("HF MaskFormer weights: no backbone weights (model.pixel_level_module.encoder.*)")
    out.update(_convert_backbone(backbone_sd, kind))
    return out


def _convert_backbone(sd: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    from omniseg.hub.hf_backbones import convert_hf_resnet_to_timm, convert_hf_swin_to_timm

    if kind == "resnet":
        return {"backbone.body." + k: v for k, v in convert_hf_resnet_to_timm(sd).items()}
    # MaskFormerSwinBackbone: the Swin itself under `model.`, one LayerNorm per stage in `hidden_states_norms.i`.
    out, swin = {}, {}
    for k, v in sd.items():
        m = re.fullmatch(r"hidden_states_norms\.(\d)\.(weight|bias)", k)
        if m:
            out[f"backbone.out_norms.res{int(m.group(1)) + 2}.{m.group(2)}"] = v
        elif k.startswith("model."):
            swin[k[len("model."):]] = v
        else:
            raise CheckpointError(f"HF MaskFormer weights: unexpected MaskFormerSwin key {k}")
    out.update({"backbone.body." + k: v for k, v in convert_hf_swin_to_timm(swin).items()})
    return out
