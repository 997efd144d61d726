"""HF transformers `OneFormerForUniversalSegmentation` checkpoints -> omniseg OneFormer.

Backbone, pixel decoder and masked-attention decoder are named as in HF Mask2Former and convert with
the same pieces (hub/hf_mask2former.py). OneFormer adds `task_mlp.*`, `query_init.*` (HF's
`query_transformer` + `query_input_projection`) and, in training checkpoints only, `text_mapper.*` and
`logit_scale`. HF's text encoder never applies its causal mask, so converted models get
`text_causal: false`.
"""

from __future__ import annotations

import re

import torch

from omniseg.hub import CheckpointError
from omniseg.hub.hf_mask2former import (
    HF_TRANSFORMER_PREFIX,
    convert_hf_mask_classification_state_dict,
    hf_backbone_settings,
    hf_class_names,
)


def hf_oneformer_config_to_omniseg(hf_config: dict) -> dict:
    """HF `OneFormerConfig` (config.json as a dict) -> omniseg model settings (arch oneformer)."""
    if hf_config.get("model_type") != "oneformer":
        raise CheckpointError(f"not a OneFormer config (model_type={hf_config.get('model_type')!r})")
    if not hf_config.get("use_task_norm", True):
        raise CheckpointError("OneFormer configs with use_task_norm=false are not supported")
    if list(hf_config.get("strides", [4, 8, 16, 32])) != [4, 8, 16, 32]:
        raise CheckpointError(f"strides must be [4, 8, 16, 32], got {hf_config.get('strides')}")
    hidden = int(hf_config.get("hidden_dim", 256))
    width = int(hf_config.get("text_encoder_width", 256))
    if width != hidden and int(hf_config.get("text_encoder_n_ctx", 16)) > 0:
        raise CheckpointError(f"text_encoder_width ({width}) must equal hidden_dim ({hidden}): HF appends the "
                              f"width-sized context vectors to hidden-sized text queries")
    if int(hf_config.get("conv_dim", 256)) != int(hf_config.get("mask_dim", 256)):
        raise CheckpointError("OneFormer needs conv_dim == mask_dim (its query projection reads the mask "
                              "features with conv_dim input channels)")
    if int(hf_config.get("conv_dim", 256)) != hidden or hf_config.get("enforce_input_proj", False):
        raise CheckpointError("HF OneFormer keeps the decoder's input projections (conv_dim != hidden_dim or "
                              "enforce_input_proj) in a plain list, so its checkpoints do not contain them")
    backbone, backbone_kwargs = hf_backbone_settings(hf_config, "OneFormer")
    class_names = hf_class_names(hf_config, "OneFormer")
    return {
        "arch": "oneformer",
        "backbone": backbone,
        "backbone_kwargs": backbone_kwargs,
        "num_classes": len(class_names),
        "class_names": class_names,
        "hidden_dim": hidden,
        "num_queries": int(hf_config.get("num_queries", 150)),
        "nheads": int(hf_config.get("num_attention_heads", 8)),
        "dim_feedforward": int(hf_config.get("dim_feedforward", 2048)),
        "dec_layers": int(hf_config.get("decoder_layers", 10)) - 1,
        "pre_norm": bool(hf_config.get("pre_norm", False)),
        "enc_layers": int(hf_config.get("encoder_layers", 6)),
        "enc_dim_feedforward": int(hf_config.get("encoder_feedforward_dim", 1024)),
        "conv_dim": int(hf_config.get("conv_dim", 256)),
        "mask_dim": int(hf_config.get("mask_dim", 256)),
        "common_stride": int(hf_config.get("common_stride", 4)),
        "enc_num_points": 4,
        "oneformer": {
            "task_seq_len": int(hf_config.get("task_seq_len", 77)),
            "query_dec_layers": int(hf_config.get("query_dec_layers", 2)),
            "query_dropout": float(hf_config.get("dropout", 0.1)),
            "n_ctx": int(hf_config.get("text_encoder_n_ctx", 16)),
            "text_layers": int(hf_config.get("text_encoder_num_layers", 6)),
            "text_width": width,
            "text_vocab_size": int(hf_config.get("text_encoder_vocab_size", 49408)),
            "text_context_length": int(hf_config.get("text_encoder_context_length", 77)),
            "text_proj_layers": int(hf_config.get("text_encoder_proj_layers", 2)),
            "text_causal": False,
            "contrastive_weight": float(hf_config.get("contrastive_weight", 0.5)),
            "contrastive_temperature": float(hf_config.get("contrastive_temperature", 0.07)),
        },
        "loss": {"class_weight": float(hf_config.get("class_weight", 2.0)),
                 "mask_weight": float(hf_config.get("mask_weight", 5.0)),
                 "dice_weight": float(hf_config.get("dice_weight", 5.0)),
                 "no_object_weight": float(hf_config.get("no_object_weight", 0.1)),
                 "train_num_points": int(hf_config.get("train_num_points", 12544))},
    }


_DECODER_LAYER_RENAMES = {  # HF `decoder.layers.i.<child>` -> omniseg predictor ModuleList and child
    "cross_attn.multihead_attn": ("transformer_cross_attention_layers", "multihead_attn"),
    "cross_attn.norm": ("transformer_cross_attention_layers", "norm"),
    "self_attn.self_attn.out_proj": ("transformer_self_attention_layers", "self_attn.out_proj"),
    "self_attn.norm": ("transformer_self_attention_layers", "norm"),
    "ffn.linear1": ("transformer_ffn_layers", "linear1"),
    "ffn.linear2": ("transformer_ffn_layers", "linear2"),
    "ffn.norm": ("transformer_ffn_layers", "norm"),
}


def _convert_transformer_key(k: str) -> str | None:
    simple = {"queries_embedder.weight": "predictor.query_embed.weight",
              "level_embed.weight": "predictor.level_embed.weight"}
    if k in simple:
        return simple[k]
    if not k.startswith("decoder."):
        return None
    k = k[len("decoder."):]
    for hf, ours in (("decoder_norm.", "predictor.decoder_norm."), ("class_embed.", "predictor.class_embed."),
                     ("query_input_projection.", "query_init.input_proj."),
                     ("query_transformer.decoder.norm.", "query_init.norm.")):
        if k.startswith(hf):
            return ours + k[len(hf):]
    m = re.fullmatch(r"mask_embed\.layers\.(\d+)\.0\.(weight|bias)", k)
    if m:
        return f"predictor.mask_embed.layers.{m[1]}.{m[2]}"
    m = re.fullmatch(r"query_transformer\.decoder\.layers\.(\d+)\.(.+)", k)
    if m:
        rest = m[2].replace("multihead_attn.", "cross_attn.", 1)
        return f"query_init.layers.{m[1]}.{rest}"
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", k)
    if m:
        for hf_child, (group, child) in _DECODER_LAYER_RENAMES.items():
            if m[2].startswith(hf_child + "."):
                return f"predictor.{group}.{m[1]}.{child}.{m[2][len(hf_child) + 1:]}"
    return None


def _convert_key(k: str) -> str | None:
    if k.startswith(HF_TRANSFORMER_PREFIX):
        return _convert_transformer_key(k[len(HF_TRANSFORMER_PREFIX):])
    m = re.fullmatch(r"model\.task_encoder\.task_mlp\.layers\.(\d+)\.0\.(weight|bias)", k)
    if m:
        return f"task_mlp.layers.{m[1]}.{m[2]}"
    m = re.fullmatch(r"model\.text_mapper\.text_projector\.layers\.(\d+)\.0\.(weight|bias)", k)
    if m:
        return f"text_mapper.text_projector.layers.{m[1]}.{m[2]}"
    if k.startswith("model.text_mapper."):  # encoder and context: HF names kept
        return k[len("model."):]
    if k == "criterion.logit_scale":
        return "logit_scale"
    return None


def convert_hf_oneformer_state_dict(hf_sd: dict[str, torch.Tensor], *, backbone: str) -> dict[str, torch.Tensor]:
    """HF OneFormerForUniversalSegmentation state dict -> omniseg OneFormer keys. Unknown keys raise
    CheckpointError; the loss's class-weight buffer is dropped."""
    self_attention = (re.escape(HF_TRANSFORMER_PREFIX)
                      + r"decoder\.layers\.(\d+)\.self_attn\.self_attn\.([qkv])_proj\.(weight|bias)",
                      "predictor.transformer_self_attention_layers.{layer}.self_attn.{name}")
    return convert_hf_mask_classification_state_dict(hf_sd, backbone=backbone, family="OneFormer",
                                                     self_attention=self_attention, convert_key=_convert_key)
