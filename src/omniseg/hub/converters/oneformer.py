"""OneFormer's official `.pth` (SHI-Labs/OneFormer, detectron2 layout, state dict under "model") -> omniseg `oneformer`.

Backbone and pixel decoder are named as in Mask2Former (see `detectron2`). OneFormer's own pieces:
  sem_seg_head.predictor.class_transformer.decoder.layers.i / .norm -> query_init.layers.i / query_init.norm
  sem_seg_head.predictor.class_input_proj                            -> query_init.input_proj
  task_mlp.layers.i                                                  -> task_mlp.layers.i
  text_encoder.* / text_projector.* / prompt_ctx / criterion.logit_scale (training only; in every released
  file, which were trained with MODEL.IS_TRAIN) -> text_mapper.* / logit_scale
The official text encoder applies CLIP's causal mask (`text_causal: true`).
"""

from __future__ import annotations

import re
from pathlib import Path

from omniseg.hub import load_state_dict_file
from omniseg.hub.converters import Conversion
from omniseg.hub.converters.detectron2 import (
    HEAD,
    PREDICTOR,
    convert_backbone,
    convert_msdeform_pixel_decoder,
    count,
    masked_decoder_settings,
    num_classes_of,
)
from omniseg.hub.errors import CheckpointError

QUERY_TRANSFORMER = PREDICTOR + "class_transformer."
TEXT_LAYER_RENAMES = {"attn": "self_attn", "ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1",
                      "mlp.c_proj": "mlp.fc2"}


def _query_init_key(rest: str) -> str | None:
    m = re.fullmatch(r"decoder\.layers\.(\d+)\.([a-z_0-9]+)\.(.+)", rest)
    if m:
        child = "cross_attn" if m[2] == "multihead_attn" else m[2]
        return f"query_init.layers.{m[1]}.{child}.{m[3]}"
    if rest.startswith("decoder.norm."):
        return "query_init.norm." + rest[len("decoder.norm."):]
    return None


def _text_key(key: str) -> str | None:
    m = re.fullmatch(r"text_encoder\.transformer\.resblocks\.(\d+)\.(attn|ln_1|ln_2|mlp\.c_fc|mlp\.c_proj)\.(.+)", key)
    if m:
        return f"text_mapper.text_encoder.transformer.layers.{m[1]}.{TEXT_LAYER_RENAMES[m[2]]}.{m[3]}"
    if key.startswith("text_encoder."):
        return "text_mapper." + key  # positional_embedding, token_embedding, ln_final
    if key.startswith(("text_projector.", "prompt_ctx.")):
        return "text_mapper." + key
    return None


def convert_state_dict(sd: dict, source: Path) -> Conversion:
    """An official OneFormer state dict (already read) -> Conversion."""
    if QUERY_TRANSFORMER + "decoder.norm.weight" not in sd or "task_mlp.layers.0.weight" not in sd:
        raise CheckpointError(f"{source}: not an official OneFormer checkpoint (no {QUERY_TRANSFORMER}decoder.* "
                              f"or task_mlp.*)")
    if any(k.startswith(QUERY_TRANSFORMER + "encoder.layers.") for k in sd):
        raise CheckpointError(f"{source}: OneFormer with encoder layers in its query transformer "
                              f"(ONE_FORMER.ENC_LAYERS > 0) is not supported")
    if not any(k.startswith(PREDICTOR + "transformer_self_attention_layers.") for k in sd):
        raise CheckpointError(f"{source}: no masked-attention decoder ({PREDICTOR}transformer_self_attention_layers.*)")
    out, ignored = {}, {}
    overrides = ["model.arch=oneformer", *convert_backbone(sd, source, out, ignored),
                 *convert_msdeform_pixel_decoder(sd, out), *masked_decoder_settings(sd, PREDICTOR)]
    for key, value in sd.items():
        if key.startswith(("backbone.", HEAD + "pixel_decoder.")):
            continue
        if key.startswith(QUERY_TRANSFORMER):
            new = _query_init_key(key[len(QUERY_TRANSFORMER):])
        elif key.startswith(PREDICTOR + "class_input_proj."):
            new = "query_init.input_proj." + key[len(PREDICTOR + "class_input_proj."):]
        elif key.startswith(PREDICTOR):
            new = "predictor." + key[len(PREDICTOR):]
        elif key.startswith("task_mlp."):
            new = key
        elif key == "criterion.logit_scale":
            new = "logit_scale"
        elif key == "criterion.empty_weight":
            ignored[key] = "the loss's class weights (no-object weight), rebuilt from model.loss"
            continue
        else:
            new = _text_key(key)
        out[new or key] = value  # an unknown key stays as it is, for the unmapped-tensor check to report
    task_mlp = sd["task_mlp.layers.0.weight"]
    overrides += [f"model.oneformer.task_seq_len={int(task_mlp.shape[1])}",
                  f"model.oneformer.query_dec_layers={count(sd, QUERY_TRANSFORMER + 'decoder.layers.')}",
                  "model.oneformer.text_causal=true"]
    if "text_encoder.token_embedding.weight" in sd:
        vocab, width = sd["text_encoder.token_embedding.weight"].shape
        overrides += [f"model.oneformer.text_vocab_size={int(vocab)}", f"model.oneformer.text_width={int(width)}",
                      f"model.oneformer.text_context_length={int(sd['text_encoder.positional_embedding'].shape[0])}",
                      f"model.oneformer.text_layers={count(sd, 'text_encoder.transformer.resblocks.')}",
                      f"model.oneformer.text_proj_layers={count(sd, 'text_projector.layers.')}",
                      f"model.oneformer.n_ctx={int(sd['prompt_ctx.weight'].shape[0]) if 'prompt_ctx.weight' in sd else 0}"]
    return Conversion(out, overrides, num_classes_of(sd, source), ignored)


def convert(source: Path, preset=None) -> Conversion:
    """OneFormer's official checkpoint (ResNet or Swin backbone) -> omniseg tensors and settings."""
    return convert_state_dict(load_state_dict_file(source), source)
