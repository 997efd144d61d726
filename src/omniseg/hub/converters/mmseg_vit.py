"""MMSegmentation's `VisionTransformer` -> omniseg's timm-based ViT, and the whole UPerNet-ViT
(`upernet_vit-b16_mln` / `_ln_mln`, `upernet_deit-*`: ViT or DeiT, MultiLevelNeck or none, UPerHead,
auxiliary FCNHead) -> `upernet`.

`--from mmseg` hands checkpoints with a ViT backbone (`backbone.patch_embed.projection.weight`) to
`convert_vit_checkpoint`. The backbone mapping (`read_vit_layout`, `vit_backbone_tensors`,
`vit_backbone_kwargs`) is shared with `--from segvit`, whose official code is built on MMSeg 0.x's ViT.

What the tensors cannot say is taken from MMSeg's ViT configs: 64-channel attention heads, LayerNorm
eps 1e-6, the class token kept through the blocks (`with_cls_token=True`), bicubic position-embedding
resizing without antialiasing, and ImageNet mean/std on RGB input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omniseg.hub.converters import Conversion
from omniseg.hub.converters.mmcv_modules import Renamed, auxiliary_fcn_head, conv_module_child
from omniseg.hub.errors import CheckpointError

VIT_MARKER = "backbone.patch_embed.projection.weight"
HEAD_DIM = 64  # MMSeg's ViT-S/B/L configs (and DeiT's) all use 64-channel heads
IMAGENET_MEAN = (123.675, 116.28, 103.53)  # MMSeg's data preprocessor for the ViT configs (RGB)
IMAGENET_STD = (58.395, 57.12, 57.375)
_SHORT_NAMES = {(192, 12, 3): "vit_t", (384, 12, 6): "vit_s", (768, 12, 12): "vit_b", (1024, 24, 16): "vit_l"}


@dataclass(frozen=True)
class ViTLayout:
    """An MMSeg ViT's hyper-parameters as its tensors give them (heads: 64 channels each by default)."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    mlp_ratio: float
    img_size: int
    final_norm: bool


def read_vit_layout(sd: dict, source, prefix: str = "backbone.", num_heads: int | None = None) -> ViTLayout:
    """The ViT under `prefix` (MMSeg names): width and patch from the patch projection, depth from the
    layers, pre-training grid from the position embedding (square, one class token)."""
    proj = sd.get(prefix + "patch_embed.projection.weight")
    if proj is None or proj.ndim != 4:
        raise CheckpointError(f"{source}: no MMSeg ViT under {prefix!r} ({prefix}patch_embed.projection.weight)")
    embed_dim, patch = int(proj.shape[0]), int(proj.shape[-1])
    layers = prefix + "layers."
    depth = len({k[len(layers):].split(".")[0] for k in sd if k.startswith(layers)})
    if depth == 0:
        raise CheckpointError(f"{source}: the ViT under {prefix!r} has no {layers}N blocks")
    if prefix + "layers.0.attn.attn.in_proj_bias" not in sd:
        raise CheckpointError(f"{source}: ViT attention without qkv bias is not supported (no "
                              f"{prefix}layers.0.attn.attn.in_proj_bias)")
    if any(k.startswith(prefix + s) for k in sd for s in ("pre_ln", "patch_embed.norm", "dist_token")):
        raise CheckpointError(f"{source}: ViT with a pre-norm, a patch-embedding norm or a distillation token "
                              f"is not supported")
    hidden = int(sd[prefix + "layers.0.ffn.layers.0.0.weight"].shape[0])
    tokens = int(sd[prefix + "pos_embed"].shape[1]) - 1
    grid = int(round(tokens ** 0.5))
    if grid * grid != tokens:
        raise CheckpointError(f"{source}: position embedding of {tokens} patches is not a square grid")
    heads = num_heads or embed_dim // HEAD_DIM
    if embed_dim % heads:
        raise CheckpointError(f"{source}: ViT width {embed_dim} is not divisible into {heads} heads")
    return ViTLayout(embed_dim, depth, heads, patch, hidden / embed_dim, grid * patch, prefix + "ln1.weight" in sd)


def vit_backbone_tensors(sd: dict, prefix: str, target: str) -> tuple[dict[str, torch.Tensor], set[str]]:
    """MMSeg ViT tensors under `prefix` -> timm VisionTransformer names under `target`; also returns the
    checkpoint keys it used. nn.MultiheadAttention's in_proj packs q, k, v as timm's qkv does. A patch
    projection without bias (MMSeg 1.x's `patch_bias=False`; the 0.x releases have one) gets a zero bias."""
    block_parts = {"ln1.": "norm1.", "ln2.": "norm2.", "attn.attn.in_proj_weight": "attn.qkv.weight",
                   "attn.attn.in_proj_bias": "attn.qkv.bias", "attn.attn.out_proj.": "attn.proj.",
                   "ffn.layers.0.0.": "mlp.fc1.", "ffn.layers.1.": "mlp.fc2."}
    top = {"patch_embed.projection.": "patch_embed.proj.", "cls_token": "cls_token", "pos_embed": "pos_embed",
           "ln1.": "norm."}
    out, used = {}, set()
    for key, value in sd.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        name = None
        if rest.startswith("layers."):
            index, part = rest[len("layers."):].split(".", 1)
            for theirs, ours in block_parts.items():
                if part.startswith(theirs):
                    name = f"blocks.{index}.{ours}{part[len(theirs):]}"
                    break
        else:
            for theirs, ours in top.items():
                if rest.startswith(theirs):
                    name = ours + rest[len(theirs):]
                    break
        if name is not None:
            out[target + name] = value
            used.add(key)
    if prefix + "patch_embed.projection.bias" not in sd:  # MMSeg 1.x's patch_bias=False: the same as a zero bias
        weight = sd[prefix + "patch_embed.projection.weight"]
        out[target + "patch_embed.proj.bias"] = torch.zeros(weight.shape[0], dtype=weight.dtype)
    return out, used


def vit_backbone_kwargs(layout: ViTLayout, *, keep_cls_token: bool) -> tuple[str, dict]:
    """(model.backbone, model.backbone_kwargs) building the same ViT in omniseg (taps set apart)."""
    name = _SHORT_NAMES.get((layout.embed_dim, layout.depth, layout.num_heads))
    kwargs = {"img_size": layout.img_size, "keep_cls_token": keep_cls_token, "final_norm": layout.final_norm,
              "pos_resize": "mmseg"}
    if name is None or layout.patch_size != 16 or layout.mlp_ratio != 4.0:
        name = "vit_base_patch16_224"
        kwargs.update(embed_dim=layout.embed_dim, depth=layout.depth, num_heads=layout.num_heads,
                      patch_size=layout.patch_size, mlp_ratio=layout.mlp_ratio)
    return name, kwargs


def default_out_indices(depth: int) -> list[int]:
    """MMSeg's UPerNet-ViT taps: the last block of each quarter ((2, 5, 8, 11) for 12 blocks)."""
    return [depth * (i + 1) // 4 - 1 for i in range(4)]


def yaml_value(value) -> str:
    """A value as an `a.b=value` override writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(yaml_value(v) for v in value) + "]"
    return str(value)


def _conv_module(prefix: str, target: str, sd: dict, out: dict, used: set) -> None:
    """MMCV ConvModule at `prefix` (`conv`, `bn`) -> omniseg ConvNormAct at `target` (`0`, `1`)."""
    for key, value in sd.items():
        if key.startswith((prefix + "conv.", prefix + "bn.")):
            out[target + conv_module_child(key[len(prefix):])] = value
            used.add(key)


def convert_vit_checkpoint(sd: dict, source, preset=None) -> Conversion:
    """An MMSeg EncoderDecoder with a VisionTransformer backbone -> omniseg's `upernet` on a ViT feature
    pyramid. Supported: UPerHead decode head with the MultiLevelNeck (scales 4, 2, 1, 0.5) or without a neck
    (`neck=None`: UPerNet-DeiT), with or without the final norm, and the auxiliary FCNHead on the last level."""
    if VIT_MARKER not in sd:
        raise CheckpointError(f"{source}: not an MMSeg ViT checkpoint (no {VIT_MARKER})")
    if "decode_head.psp_modules.0.1.conv.weight" not in sd or "decode_head.fpn_bottleneck.conv.weight" not in sd:
        heads = sorted({k.split(".")[1] for k in sd if k.startswith("decode_head.")})
        raise CheckpointError(f"{source}: only UPerNet (UPerHead) decode heads on an MMSeg ViT convert; this "
                              f"decode head has {', '.join(heads)}")
    bins = len({k.split(".")[2] for k in sd if k.startswith("decode_head.psp_modules.")})
    if bins != 4:
        raise CheckpointError(f"{source}: UPerHead with {bins} pooling scales; omniseg needs their sizes, which "
                              f"the checkpoint does not hold (MMSeg's default is 1, 2, 3, 6)")
    layout = read_vit_layout(sd, source)
    multilevel_neck = any(k.startswith("neck.") for k in sd)  # neck=None (UPerNet-DeiT): four stride-16 taps
    neck_levels = len({k.split(".")[2] for k in sd if k.startswith("neck.lateral_convs.")})
    if multilevel_neck and (neck_levels != 4 or any(k.startswith("neck.") and (".bn." in k or ".ln." in k)
                                                    for k in sd)):
        raise CheckpointError(f"{source}: the MultiLevelNeck must have 4 levels with plain convs (found "
                              f"{neck_levels} levels)")
    out, used = vit_backbone_tensors(sd, "backbone.", "backbone.vit.body.")
    for i in range(4 if multilevel_neck else 0):
        for theirs, ours in ((f"neck.lateral_convs.{i}.conv.", f"backbone.laterals.{i}."),
                             (f"neck.convs.{i}.conv.", f"backbone.convs.{i}.")):
            for part in ("weight", "bias"):
                out[ours + part] = sd[theirs + part]
                used.add(theirs + part)
    for i in range(bins):
        _conv_module(f"decode_head.psp_modules.{i}.1.", f"head.ppm.stages.{i}.", sd, out, used)
    _conv_module("decode_head.bottleneck.", "head.ppm_bottleneck.", sd, out, used)
    for i in range(3):
        _conv_module(f"decode_head.lateral_convs.{i}.", f"head.laterals.{i}.", sd, out, used)
        _conv_module(f"decode_head.fpn_convs.{i}.", f"head.fpn_convs.{i}.", sd, out, used)
    _conv_module("decode_head.fpn_bottleneck.", "head.fuse.", sd, out, used)
    for part in ("weight", "bias"):
        out[f"head.classifier.1.{part}"] = sd[f"decode_head.conv_seg.{part}"]
        used.add(f"decode_head.conv_seg.{part}")
    num_classes = int(sd["decode_head.conv_seg.weight"].shape[0])
    width = int(sd["decode_head.conv_seg.weight"].shape[1])
    ignored: dict[str, str] = {}
    auxiliary = Renamed()  # MMSeg's ViT configs: the FCN auxiliary head reads the last level (in_index 3)
    aux_overrides = auxiliary_fcn_head(sd, auxiliary, ignored, level="res5")
    out.update(auxiliary)
    used |= auxiliary.used
    for key in sd:
        if key not in used and key not in ignored:
            out[key] = sd[key]  # left for the unmapped-tensor check to report
    name, kwargs = vit_backbone_kwargs(layout, keep_cls_token=True)
    kwargs["out_indices"] = default_out_indices(layout.depth)
    kwargs["multilevel_neck"] = multilevel_neck
    overrides = ["model.arch=upernet", f"model.backbone={name}", f"model.head_width={width}",
                 "model.psp_bins=[1,2,3,6]", f"model.pixel_mean={yaml_value(IMAGENET_MEAN)}",
                 f"model.pixel_std={yaml_value(IMAGENET_STD)}",
                 f"data.min_size_test={layout.img_size}"]  # MMSeg's ViT configs test at the training crop's scale
    overrides += [f"model.backbone_kwargs.{k}={yaml_value(v)}" for k, v in kwargs.items()]
    return Conversion(out, overrides + aux_overrides, num_classes, ignored)
