"""detectron2 checkpoints of Mask2Former, MaskFormer and MP-Former (`.pkl` model-zoo files or `.pth`) -> omniseg.

The official networks are omniseg's `maskformer` family module for module; only names change:
  backbone.stem / backbone.resN.B (detectron2 ResNet, FrozenBN)   -> backbone.body.conv1/bn1 / layer{N-1}.B (timm)
  backbone.patch_embed / layers.i / norm{i} (D2SwinTransformer)   -> backbone.body.patch_embed / layers_i / out_norms.res{i+2}
  sem_seg_head.pixel_decoder.* (MSDeformAttn; MaskFormer's FPN)   -> pixel_decoder.*
  sem_seg_head.predictor.* (masked-attention / DETR decoder)      -> predictor.*
detectron2 `Conv2d(norm=...)` keeps the norm inside the conv (`adapter_1.norm.*`); omniseg has conv and norm
side by side (`adapter_1.0` / `adapter_1.1`). Swin's patch merging sits at the end of stage i there and at
the start of stage i+1 in timm, with the same 2x2 concatenation order. The settings (depth, Swin size and
window, queries, decoder layers, widths, classes) are read from the tensors.

MP-Former's release drops Mask2Former's positional queries (`query_embed`; the decoder passes None), which
is a zero positional embedding here, and adds `label_enc`, the class embedding of its label-guided
training queries (omniseg `mask_pilot.label_enc` when the preset enables mask piloting).

Mask R-CNN `.pkl` files (keys `proposal_generator.` / `roi_heads.`) go to `detectron2_rcnn`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from omniseg.hub import load_state_dict_file
from omniseg.hub.converters import Conversion, resnet_depth
from omniseg.hub.errors import CheckpointError

HEAD = "sem_seg_head."
PIXEL_DECODER = HEAD + "pixel_decoder."
PREDICTOR = HEAD + "predictor."

# (embed_dim, depths, heads, window) of the released Swin backbones -> omniseg/timm backbone name
SWIN_VARIANTS = {
    (96, (2, 2, 6, 2), (3, 6, 12, 24), 7): "swin_t",
    (96, (2, 2, 18, 2), (3, 6, 12, 24), 7): "swin_s",
    (128, (2, 2, 18, 2), (4, 8, 16, 32), 12): "swin_b",
    (128, (2, 2, 18, 2), (4, 8, 16, 32), 7): "swin_base_patch4_window7_224",
    (192, (2, 2, 18, 2), (6, 12, 24, 48), 12): "swin_l",
    (192, (2, 2, 18, 2), (6, 12, 24, 48), 7): "swin_large_patch4_window7_224",
}


def conv_norm(name: str) -> str:
    """detectron2 `Conv2d` with its norm inside (`x.weight`, `x.norm.*`) -> conv/norm pair (`x.0.*`, `x.1.*`)."""
    m = re.fullmatch(r"(.+?)\.norm\.(.+)", name)
    if m:
        return f"{m[1]}.1.{m[2]}"
    head, _, leaf = name.rpartition(".")
    return f"{head}.0.{leaf}"


def count(sd, prefix: str) -> int:
    """How many numbered children `prefix<i>.` the keys have."""
    depth = len(prefix.split(".")) - 1
    return len({k.split(".")[depth] for k in sd if k.startswith(prefix)})


# ------------------------------------------------------------------------------------------ backbones

def convert_resnet(sd, source: Path, out: dict, ignored: dict) -> list[str]:
    """detectron2 ResNet (`build_resnet_backbone`, torchvision-style: STRIDE_IN_1X1 False, FrozenBN) -> timm."""
    if "backbone.stem.conv2.weight" in sd:
        raise CheckpointError(f"{source}: a ResNet with the DeepLab stem (three 3x3 convs; MaskFormer's R101c) is "
                              f"not supported: omniseg's ResNets have the 7x7 stem")
    if any(".conv2_offset." in k for k in sd):
        raise CheckpointError(f"{source}: a ResNet with deformable convolutions is not supported")
    depth = resnet_depth(sd, "backbone.", stage="res{}", first=2)
    for key, value in sd.items():
        if not key.startswith("backbone."):
            continue
        rest = key[len("backbone."):]
        if rest.endswith("num_batches_tracked"):
            ignored[key] = "BatchNorm counter (the backbone's norms are frozen)"
            continue
        m = re.fullmatch(r"stem\.conv1\.(norm\.)?(.+)", rest)
        if m:
            out["backbone.body." + ("bn1." if m[1] else "conv1.") + m[2]] = value
            continue
        m = re.fullmatch(r"res(\d)\.(\d+)\.(conv\d|shortcut)\.(norm\.)?(.+)", rest)
        if not m:
            out[key] = value  # left for the unmapped-tensor check to report
            continue
        block = f"backbone.body.layer{int(m[1]) - 1}.{m[2]}."
        if m[3] == "shortcut":
            out[block + ("downsample.1." if m[4] else "downsample.0.") + m[5]] = value
        else:
            index = m[3][len("conv"):]
            out[block + (f"bn{index}." if m[4] else f"conv{index}.") + m[5]] = value
    return [f"model.backbone={depth}", "model.backbone_norm=frozen_bn", "model.backbone_kwargs={}"]


def swin_variant(sd, source: Path) -> str:
    """The omniseg backbone name of a D2SwinTransformer from its tensors (width, depths, heads, window)."""
    if "backbone.absolute_pos_embed" in sd:
        raise CheckpointError(f"{source}: Swin with absolute position embeddings (APE) is not supported")
    embed = int(sd["backbone.patch_embed.proj.weight"].shape[0])
    stages = count(sd, "backbone.layers.")
    depths = tuple(count(sd, f"backbone.layers.{i}.blocks.") for i in range(stages))
    tables = [sd[f"backbone.layers.{i}.blocks.0.attn.relative_position_bias_table"] for i in range(stages)]
    heads = tuple(int(t.shape[1]) for t in tables)
    window = (math.isqrt(int(tables[0].shape[0])) + 1) // 2
    if int(sd["backbone.patch_embed.proj.weight"].shape[-1]) != 4:
        raise CheckpointError(f"{source}: Swin with patch size {sd['backbone.patch_embed.proj.weight'].shape[-1]} "
                              f"is not supported (4)")
    name = SWIN_VARIANTS.get((embed, depths, heads, window))
    if name is None:
        raise CheckpointError(f"{source}: Swin with embed_dim {embed}, depths {depths}, heads {heads}, window "
                              f"{window} is not one omniseg builds (Swin-T/S/B/L)")
    return name


def convert_swin(sd, source: Path, out: dict, ignored: dict) -> list[str]:
    """D2SwinTransformer (Mask2Former / MaskFormer / OneFormer's swin.py) -> timm features_only + out_norms."""
    name = swin_variant(sd, source)
    for key, value in sd.items():
        if not key.startswith("backbone."):
            continue
        rest = key[len("backbone."):]
        if rest.endswith("relative_position_index"):
            ignored[key] = "constant buffer, rebuilt from the window size"
            continue
        m = re.fullmatch(r"norm(\d)\.(weight|bias)", rest)
        if m:
            out[f"backbone.out_norms.res{int(m[1]) + 2}.{m[2]}"] = value
            continue
        m = re.fullmatch(r"layers\.(\d+)\.downsample\.(.+)", rest)
        if m:  # merging at the end of stage i = timm's downsample at the start of stage i+1
            out[f"backbone.body.layers_{int(m[1]) + 1}.downsample.{m[2]}"] = value
            continue
        m = re.fullmatch(r"layers\.(\d+)\.(blocks\..+)", rest)
        if m:
            out[f"backbone.body.layers_{m[1]}.{m[2]}"] = value
        else:
            out["backbone.body." + rest] = value  # patch_embed.*; anything else is reported unmapped
    return [f"model.backbone={name}", "model.backbone_kwargs={}"]


def convert_backbone(sd, source: Path, out: dict, ignored: dict) -> list[str]:
    if "backbone.stem.conv1.weight" in sd:
        return convert_resnet(sd, source, out, ignored)
    if "backbone.patch_embed.proj.weight" in sd:
        return convert_swin(sd, source, out, ignored)
    raise CheckpointError(f"{source}: backbone is neither a detectron2 ResNet (backbone.stem.*) nor a "
                          f"D2SwinTransformer (backbone.patch_embed.*)")


# ------------------------------------------------------------------------------------------ heads

def convert_msdeform_pixel_decoder(sd, out: dict) -> list[str]:
    """Mask2Former's / OneFormer's MSDeformAttnPixelDecoder; returns its settings."""
    for key, value in sd.items():
        if not key.startswith(PIXEL_DECODER):
            continue
        rest = key[len(PIXEL_DECODER):]
        if rest.startswith("transformer.encoder.layers."):
            rest = "transformer.layers." + rest[len("transformer.encoder.layers."):]
        elif re.match(r"(adapter|layer)_\d+\.", rest):
            rest = conv_norm(rest)
        out["pixel_decoder." + rest] = value
    enc_layers = count(sd, PIXEL_DECODER + "transformer.encoder.layers.")
    first = PIXEL_DECODER + "transformer.encoder.layers.0."
    settings = [f"model.enc_layers={enc_layers}",
                f"model.conv_dim={int(sd[PIXEL_DECODER + 'mask_features.weight'].shape[1])}",
                f"model.mask_dim={int(sd[PIXEL_DECODER + 'mask_features.weight'].shape[0])}"]
    if enc_layers:
        settings.append(f"model.enc_dim_feedforward={int(sd[first + 'linear1.weight'].shape[0])}")
    return settings


def masked_decoder_settings(sd, prefix: str) -> list[str]:
    """The masked-attention decoder's sizes (Mask2Former, MP-Former, OneFormer)."""
    return [f"model.dec_layers={count(sd, prefix + 'transformer_self_attention_layers.')}",
            f"model.hidden_dim={int(sd[prefix + 'decoder_norm.weight'].shape[0])}",
            f"model.dim_feedforward={int(sd[prefix + 'transformer_ffn_layers.0.linear1.weight'].shape[0])}",
            f"model.num_queries={int(sd[prefix + 'query_embed.weight' if prefix + 'query_embed.weight' in sd else prefix + 'query_feat.weight'].shape[0])}",
            f"model.enforce_input_project={str(any(k.startswith(prefix + 'input_proj.') for k in sd)).lower()}"]


def convert_mask2former(sd, source: Path, preset, out: dict, ignored: dict) -> list[str]:
    overrides = ["model.arch=mask2former", *convert_msdeform_pixel_decoder(sd, out),
                 *masked_decoder_settings(sd, PREDICTOR)]
    for key, value in sd.items():
        if key.startswith(PREDICTOR):
            out["predictor." + key[len(PREDICTOR):]] = value
    label_enc = out.pop("predictor.label_enc.weight", None)
    if label_enc is not None:
        if preset.model.get("mp", {}).get("enabled", False):
            out["mask_pilot.label_enc.weight"] = label_enc
        else:
            ignored[PREDICTOR + "label_enc.weight"] = ("MP-Former's label embedding for its training queries; the "
                                                       "preset does not enable mask piloting (model.mp)")
    if "predictor.query_embed.weight" not in out:  # MP-Former: no positional queries = zero positions
        out["predictor.query_embed.weight"] = torch.zeros_like(out["predictor.query_feat.weight"])
    return overrides


MASKFORMER_LEVELS = {"1": "res2", "2": "res3", "3": "res4", "4": "res5"}  # BasePixelDecoder's adapter_i / layer_i
DETR_LAYER_RENAMES = {"multihead_attn": "cross_attn"}


def convert_maskformer(sd, source: Path, out: dict) -> list[str]:
    if any(k.startswith(PIXEL_DECODER + "transformer.") for k in sd):
        raise CheckpointError(f"{source}: MaskFormer's TransformerEncoderPixelDecoder (the COCO-panoptic models: a "
                              f"transformer encoder on res5 inside the pixel decoder) is not available in omniseg; "
                              f"the FPN pixel decoder (BasePixelDecoder) models convert")
    for key, value in sd.items():
        if key.startswith(PIXEL_DECODER):
            rest = key[len(PIXEL_DECODER):]
            m = re.fullmatch(r"(adapter|layer)_(\d)\.(.+)", rest)
            if m and m[2] in MASKFORMER_LEVELS:
                group = "lateral_convs" if m[1] == "adapter" else "output_convs"
                rest = conv_norm(f"{group}.{MASKFORMER_LEVELS[m[2]]}.{m[3]}")
            out["pixel_decoder." + rest] = value
        elif key.startswith(PREDICTOR):
            rest = key[len(PREDICTOR):]
            m = re.fullmatch(r"transformer\.(encoder|decoder)\.layers\.(\d+)\.([a-z_0-9]+)\.(.+)", rest)
            if m:
                child = DETR_LAYER_RENAMES.get(m[3], m[3])
                rest = f"{m[1]}_layers.{m[2]}.{child}.{m[4]}"
            elif rest.startswith("transformer.decoder.norm."):
                rest = "decoder_norm." + rest[len("transformer.decoder.norm."):]
            elif rest.startswith("transformer.encoder.norm."):
                rest = "encoder_norm." + rest[len("transformer.encoder.norm."):]
            out["predictor." + rest] = value
    p = PREDICTOR + "transformer."
    return ["model.arch=maskformer",
            f"model.dec_layers={count(sd, p + 'decoder.layers.')}",
            f"model.enc_layers={count(sd, p + 'encoder.layers.')}",
            f"model.pre_norm={str(p + 'encoder.norm.weight' in sd).lower()}",
            f"model.hidden_dim={int(sd[PREDICTOR + 'query_embed.weight'].shape[1])}",
            f"model.num_queries={int(sd[PREDICTOR + 'query_embed.weight'].shape[0])}",
            f"model.dim_feedforward={int(sd[p + 'decoder.layers.0.linear1.weight'].shape[0])}",
            f"model.conv_dim={int(sd[PIXEL_DECODER + 'mask_features.weight'].shape[1])}",
            f"model.mask_dim={int(sd[PIXEL_DECODER + 'mask_features.weight'].shape[0])}"]


def num_classes_of(sd, source: Path) -> int:
    key = PREDICTOR + "class_embed.weight"
    if key not in sd:
        raise CheckpointError(f"{source}: no {key}; omniseg's mask-classification models need the class head")
    return int(sd[key].shape[0]) - 1  # the last row is no-object


def convert_state_dict(sd: dict, source: Path, preset) -> Conversion:
    """A Mask2Former / MP-Former / MaskFormer detectron2 state dict (already read) -> Conversion."""
    out: dict = {}
    ignored: dict = {}
    if PREDICTOR + "transformer_self_attention_layers.0.norm.weight" in sd:
        head = convert_mask2former(sd, source, preset, out, ignored)
    elif PREDICTOR + "transformer.decoder.layers.0.norm1.weight" in sd:
        head = convert_maskformer(sd, source, out)
    else:
        raise CheckpointError(f"{source}: not a Mask2Former / MaskFormer / MP-Former detectron2 checkpoint (no "
                              f"{PREDICTOR}transformer_self_attention_layers.* or {PREDICTOR}transformer.decoder.*)")
    backbone = convert_backbone(sd, source, out, ignored)
    for key, value in sd.items():
        if key == "criterion.empty_weight":
            ignored[key] = "the loss's class weights (no-object weight), rebuilt from model.loss"
        elif not key.startswith(("backbone.", HEAD)):
            out[key] = value  # left for the unmapped-tensor check to report
    return Conversion(out, [*backbone, *head], num_classes_of(sd, source), ignored)


def convert(source: Path, preset) -> Conversion:
    """A detectron2 `.pkl` / `.pth` of Mask2Former, MP-Former or MaskFormer (or Mask R-CNN, see
    `detectron2_rcnn`) -> omniseg tensors and the settings the checkpoint implies."""
    sd = load_state_dict_file(source)
    if any(k.startswith(("proposal_generator.", "roi_heads.")) for k in sd):
        from omniseg.hub.converters.detectron2_rcnn import convert_rcnn_checkpoint

        return convert_rcnn_checkpoint(sd, source, preset)
    return convert_state_dict(sd, source, preset)
