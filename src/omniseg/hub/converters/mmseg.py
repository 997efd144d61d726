"""MMSegmentation checkpoints (`{"meta": ..., "state_dict": ...}`) of PSPNet, DANet, EncNet and FastFCN (JPU
neck under a PSP, ASPP or Enc head) on MMSeg's ResNet -> omniseg's `per_pixel` family; UPerNet-ViT checkpoints go to
`omniseg.hub.converters.mmseg_vit`.

MMSeg's networks differ from omniseg's presets in a few places, each set here from the checkpoint:
the ResNetV1c deep stem (timm's `stem_type="deep"`, width 32) and its dilation scheme (`stage_dilations`,
which also covers the FastFCN backbone: strides 2 everywhere yet dilated 2 and 4); the pyramid-pooling
branches at the head width; JPU upsampling without align_corners; DeepLabV3's head as a 3x3 bottleneck
straight over the ASPP branches; the auxiliary FCN head (trained at weight 0.4, DANet included).
The checkpoint's `meta.config` text (the training config MMSeg stores) gives the strides, dilations,
pooling scales and ASPP rates when present; without it the model-zoo configs' values are used.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from omniseg.hub import load_state_dict_file
from omniseg.hub.converters import Conversion, resnet_depth
from omniseg.hub.converters.mmcv_modules import Renamed, auxiliary_fcn_head, conv_module_child
from omniseg.hub.errors import CheckpointError

# Pixel statistics of every MMSeg ResNet config (RGB, 0-255).
MMSEG_MEAN = (123.675, 116.28, 103.53)
MMSEG_STD = (58.395, 57.12, 57.375)

# Model-zoo values where the weights cannot tell and the checkpoint stores no config.
DILATED_BACKBONE = ((1, 2, 1, 1), (1, 1, 2, 4))  # "-d8": strides, dilations
JPU_BACKBONE = ((1, 2, 2, 2), (1, 1, 2, 4))  # FastFCN "-d32": stride 32, still dilated
POOL_SCALES = (1, 2, 3, 6)
ASPP_DILATIONS = (1, 12, 24, 36)
JPU_DILATIONS = (1, 2, 4, 8)
TIMM_STRIDES = ((1, 2, 1, 1), (1, 2, 2, 1), (1, 2, 2, 2))  # stage strides of timm's output stride 8, 16, 32

# ResNetV1c's deep stem (stem.0..7: conv-BN-ReLU x3) -> timm's deep stem (conv1.0..6 + bn1)
STEM = {"stem.0.": "conv1.0.", "stem.1.": "conv1.1.", "stem.3.": "conv1.3.", "stem.4.": "conv1.4.",
        "stem.6.": "conv1.6.", "stem.7.": "bn1."}

# MMSeg head -> the omniseg component that lacks it (refused by name).
UNSUPPORTED_HEADS = {
    "decode_head.c1_bottleneck.": "DeepLabV3+'s DepthwiseSeparableASPPHead",
    "decode_head.sep_bottleneck.": "DeepLabV3+'s DepthwiseSeparableASPPHead",
    "decode_head.lateral_convs.": "UPerNet's UPerHead on a ResNet",
    "decode_head.convs.": "the plain FCNHead",
}


def _section(text: str, opening: str) -> str:
    """The text of the first `opening...)` call in a config, parentheses balanced ('' when absent)."""
    start = text.find(opening)
    if start < 0:
        return ""
    depth = 0
    for i in range(start + len(opening) - 1, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i + 1]
    return ""


def _ints(section: str, key: str) -> tuple[int, ...] | None:
    found = re.search(rf"\b{key}\s*=\s*[\(\[]([\d,\s]+)[\)\]]", section)
    return tuple(int(v) for v in found.group(1).replace(",", " ").split()) if found else None


def _meta(source: Path) -> dict:
    """The checkpoint's `meta` dict (MMSeg stores the training config text and class names there), or {}."""
    if source.suffix == ".safetensors":
        return {}
    from omniseg.hub.pickled import read_pickled

    obj = read_pickled(source)
    meta = obj.get("meta") if isinstance(obj, dict) else None
    return meta if isinstance(meta, dict) else {}


def _class_names(meta: dict, num_classes: int):
    """DatasetMeta from the class names MMSeg keeps (0.x `CLASSES`, 1.x `dataset_meta.classes`), if they fit."""
    from omniseg.data.meta import DatasetMeta

    names = meta.get("CLASSES")
    if names is None and isinstance(meta.get("dataset_meta"), dict):
        names = meta["dataset_meta"].get("classes")
    if not isinstance(names, (list, tuple)) or len(names) != num_classes or not all(isinstance(n, str) for n in names):
        return None
    return DatasetMeta(classes=list(names), name="mmseg")


def _backbone_overrides(sd: dict, source: Path, config: str, has_jpu: bool) -> list[str]:
    """Depth, stem, output stride and dilations of MMSeg's ResNet."""
    if not any(k.startswith("backbone.layer1.") for k in sd):
        raise CheckpointError(f"{source}: the backbone is not one of MMSeg's ResNets (no backbone.layer1); "
                              f"omniseg converts ResNetV1c / ResNet PSPNet, DANet, EncNet and FastFCN, and UPerNet-ViT")
    if any(re.match(r"backbone\.layer\d\.0\.downsample\.2\.", k) for k in sd):
        raise CheckpointError(f"{source}: ResNetV1d (average-pool shortcut) is not supported; ResNetV1c and ResNet are")
    depth = resnet_depth(sd, "backbone.")
    overrides = [f"model.backbone={depth}"]
    if "backbone.stem.0.weight" in sd:
        stem_width = int(sd["backbone.stem.0.weight"].shape[0])
        overrides += ["model.backbone_kwargs.stem_type=deep", f"model.backbone_kwargs.stem_width={stem_width}"]
    backbone = _section(config, "backbone=dict(")
    strides, dilations = JPU_BACKBONE if has_jpu else DILATED_BACKBONE
    strides = _ints(backbone, "strides") or strides
    dilations = _ints(backbone, "dilations") or dilations
    if re.search(r"contract_dilation\s*=\s*False", backbone) and any(d > 1 for d in dilations):
        raise CheckpointError(f"{source}: a dilated ResNet without contract_dilation is not supported")
    if tuple(strides) not in TIMM_STRIDES or len(dilations) != 4:
        raise CheckpointError(f"{source}: backbone strides {strides} / dilations {dilations}: omniseg's ResNets have "
                              f"four stages with strides {', '.join(map(str, TIMM_STRIDES))}")
    output_stride = 4 * math.prod(strides)
    if has_jpu and output_stride != 32:
        raise CheckpointError(f"{source}: a JPU neck on an output-stride-{output_stride} backbone is not supported "
                              f"(FastFCN's is stride 32)")
    if not has_jpu:
        overrides.append(f"model.output_stride={output_stride}")
    overrides.append(f"model.stage_dilations=[{','.join(str(d) for d in dilations)}]")
    return overrides


def _head(sd: dict, source: Path, config: str, out: Renamed) -> list[str]:
    """Rename the decode head into `out`; the settings it implies."""
    head = {k[len("decode_head."):]: v for k, v in sd.items() if k.startswith("decode_head.")}
    section = _section(config, "decode_head=dict(")
    is_enc_head = "enc_module.encoding.0.codewords" in head  # its laterals are not UPerNet's
    for prefix, missing in UNSUPPORTED_HEADS.items():
        if any(k.startswith(prefix) for k in sd) and not is_enc_head:
            raise CheckpointError(f"{source}: the decode head is {missing}, which omniseg does not have")
    if "conv_seg.weight" not in head:
        raise CheckpointError(f"{source}: no decode_head.conv_seg: not an MMSeg segmentor checkpoint")
    width = int(head["conv_seg.weight"].shape[1])
    overrides = [f"model.head_width={width}"]
    for key, value in head.items():
        if key.startswith("conv_seg."):
            out.put("decode_head." + key, "head.classifier.1." + key[len("conv_seg."):], value)
    if "psp_modules.0.1.conv.weight" in head:
        branches = len({k.split(".")[1] for k in head if k.startswith("psp_modules.")})
        scales = _ints(section, "pool_scales") or POOL_SCALES
        if len(scales) != branches:
            raise CheckpointError(f"{source}: {branches} pooling branches but pool_scales {scales}")
        overrides += ["model.arch=pspnet", f"model.psp_bins=[{','.join(str(s) for s in scales)}]",
                      f"model.psp_branch_width={int(head['psp_modules.0.1.conv.weight'].shape[0])}"]
        for key, value in head.items():
            if key.startswith("psp_modules."):
                _, index, _, rest = key.split(".", 3)
                out.put("decode_head." + key, f"head.ppm.stages.{index}.{conv_module_child(rest)}", value)
            elif key.startswith("bottleneck."):
                out.put("decode_head." + key, "head.bottleneck." + conv_module_child(key[len("bottleneck."):]), value)
    elif "pam_in_conv.conv.weight" in head:
        overrides += ["model.arch=danet", f"model.pam_channels={int(head['pam.query_project.weight'].shape[0])}"]
        names = {"pam_in_conv.": "pam_in.", "pam_out_conv.": "pam_out.", "cam_in_conv.": "cam_in.",
                 "cam_out_conv.": "cam_out."}
        for key, value in head.items():
            prefix = next((p for p in names if key.startswith(p)), None)
            if prefix is not None:
                out.put("decode_head." + key, "head." + names[prefix] + conv_module_child(key[len(prefix):]), value)
            elif key.startswith("pam.") and key.split(".")[1].endswith("_project"):
                _, project, rest = key.split(".", 2)
                out.put("decode_head." + key, f"head.pam.{project[:-len('_project')]}.{rest}", value)
            elif key in ("pam.gamma.scale", "cam.gamma.scale"):
                target = "head.pam.gamma" if key.startswith("pam") else "head.cam.beta"
                out.put("decode_head." + key, target, value.reshape(1))
            elif key.startswith(("pam_conv_seg.", "cam_conv_seg.")):
                branch, rest = key.split("_conv_seg.")
                out.put("decode_head." + key, f"head.{branch}_classifier.1.{rest}", value)
    elif "image_pool.1.conv.weight" in head and "aspp_modules.0.conv.weight" in head:
        dilations = _ints(section, "dilations") or ASPP_DILATIONS
        branches = len({k.split(".")[1] for k in head if k.startswith("aspp_modules.")})
        if len(dilations) != branches or dilations[0] != 1 or head["aspp_modules.0.conv.weight"].shape[-1] != 1:
            raise CheckpointError(f"{source}: ASPP dilations {dilations} over {branches} branches: omniseg's ASPP "
                                  f"has one 1x1 branch first, then dilated 3x3 ones")
        overrides += ["model.arch=deeplabv3", "model.aspp_project=false",
                      f"model.aspp_rates=[{','.join(str(d) for d in dilations[1:])}]"]
        for key, value in head.items():
            if key.startswith("image_pool.1."):
                out.put("decode_head." + key, "head.aspp.image_pool." + conv_module_child(key[len("image_pool.1."):]), value)
            elif key.startswith("aspp_modules."):
                _, index, rest = key.split(".", 2)
                out.put("decode_head." + key, f"head.aspp.branches.{index}.{conv_module_child(rest)}", value)
            elif key == "bottleneck.conv.weight":
                # MMSeg concatenates [image pool, branches...], omniseg [branches..., image pool].
                chunks = value.chunk(branches + 1, dim=1)
                out.put("decode_head." + key, "head.conv.0.weight", torch.cat([*chunks[1:], chunks[0]], dim=1))
            elif key.startswith("bottleneck.bn."):
                out.put("decode_head." + key, "head.conv.1." + key[len("bottleneck.bn."):], value)
    elif is_enc_head:
        overrides += _enc_head(head, source, section, out)
    else:
        sample = sorted({k.split(".")[0] for k in head})
        raise CheckpointError(f"{source}: decode head with modules {sample} is none of PSPHead, DAHead, ASPPHead, "
                              f"EncHead")
    return overrides


# MMSeg's EncModule children -> omniseg's ContextEncoding ones.
ENC_MODULE = {"encoding_project.": "project.", "encoding.0.": "encoding.", "encoding.1.": "code_norm.",
              "fc.0.": "fc."}


def _enc_head(head: dict, source: Path, section: str, out: Renamed) -> list[str]:
    """Rename MMSeg's EncHead (EncNet, FastFCN-EncNet) into `out`; codewords, laterals and SE-loss weight."""
    laterals = len({k.split(".")[1] for k in head if k.startswith("lateral_convs.")})
    if laterals not in (0, 2):
        raise CheckpointError(f"{source}: EncHead with {laterals} lateral convs; omniseg's reads res3 and res4")
    num_codes = int(head["enc_module.encoding.0.codewords"].shape[0])
    se_weight = 0.0
    if "se_layer.weight" in head:
        found = re.search(r"loss_se_decode\s*=\s*dict\([^)]*loss_weight\s*=\s*([\d.eE+-]+)", section)
        se_weight = float(found.group(1)) if found else 0.2
    for key, value in head.items():
        name = "decode_head." + key
        if key.startswith("bottleneck."):
            out.put(name, "head.bottleneck." + conv_module_child(key[len("bottleneck."):]), value)
        elif key.startswith("lateral_convs."):
            _, index, rest = key.split(".", 2)
            out.put(name, f"head.laterals.{index}.{conv_module_child(rest)}", value)
        elif key.startswith("fusion."):
            out.put(name, "head.fusion." + conv_module_child(key[len("fusion."):]), value)
        elif key.startswith("enc_module."):
            rest = key[len("enc_module."):]
            prefix = next((p for p in ENC_MODULE if rest.startswith(p)), None)
            if prefix == "encoding_project.":
                out.put(name, "head.encoding.project." + conv_module_child(rest[len(prefix):]), value)
            elif prefix is not None:
                out.put(name, "head.encoding." + ENC_MODULE[prefix] + rest[len(prefix):], value)
        elif key.startswith("se_layer."):
            out.put(name, "se_classifier." + key[len("se_layer."):], value)
    return ["model.arch=encnet", f"model.num_codes={num_codes}",
            f"model.enc_lateral={'true' if laterals else 'false'}", f"model.loss.se_weight={se_weight}"]


def _neck(sd: dict, source: Path, config: str, out: Renamed) -> list[str]:
    """Rename MMSeg's JPU neck into `out`; its settings."""
    neck = {k[len("neck."):]: v for k, v in sd.items() if k.startswith("neck.")}
    if "conv_layers.0.0.conv.weight" not in neck:
        raise CheckpointError(f"{source}: neck with modules {sorted({k.split('.')[0] for k in neck})} is not "
                              f"FastFCN's JPU, the one MMSeg ResNet neck omniseg has")
    levels = len({k.split(".")[1] for k in neck if k.startswith("conv_layers.")})
    dilations = _ints(_section(config, "neck=dict("), "dilations") or JPU_DILATIONS
    if levels != 3 or tuple(dilations) != JPU_DILATIONS:
        raise CheckpointError(f"{source}: JPU over {levels} levels with dilations {dilations}; omniseg's reads "
                              f"res3-res5 with dilations {JPU_DILATIONS}")
    align = re.search(r"align_corners\s*=\s*(True|False)", _section(config, "neck=dict("))
    for key, value in neck.items():
        parts = key.split(".")
        if parts[0] == "conv_layers":
            out.put("neck." + key, f"neck.convs.{parts[1]}.{conv_module_child('.'.join(parts[3:]))}", value)
        elif parts[0] == "dilation_layers":
            index, conv, rest = parts[1], parts[3], ".".join(parts[4:])  # dilation_layers.i.0.<conv>.<conv|bn>.x
            if conv == "depthwise_conv":  # Sequential(depthwise conv, BN, pointwise conv), BN, ReLU
                target = f"neck.dilated.{index}.0.0." if rest.startswith("conv.") else f"neck.dilated.{index}.0.1."
            else:
                target = f"neck.dilated.{index}.0.2." if rest.startswith("conv.") else f"neck.dilated.{index}.1."
            out.put("neck." + key, target + rest.split(".", 1)[1], value)
    return ["model.neck=jpu", f"model.jpu_width={int(neck['conv_layers.0.0.conv.weight'].shape[0])}",
            f"model.jpu_align_corners={'true' if align and align.group(1) == 'True' else 'false'}"]


def convert(source: Path, preset=None) -> Conversion:
    """An MMSegmentation PSPNet / DANet / EncNet / FastFCN (PSP, ASPP or Enc head) checkpoint on a ResNet (V1c or plain
    stem, any depth), or UPerNet on MMSeg's ViT. The config follows the checkpoint: architecture, depth,
    widths, strides and dilations, pixel statistics. Every tensor maps (BatchNorm counters included: the
    norms train); `ignored` holds only an auxiliary head of a shape omniseg's lacks."""
    sd = load_state_dict_file(source)
    if "backbone.patch_embed.projection.weight" in sd:
        try:
            from omniseg.hub.converters.mmseg_vit import convert_vit_checkpoint
        except ImportError as e:
            raise CheckpointError(f"{source}: an MMSeg ViT checkpoint, whose converter is not available ({e})") from e
        return convert_vit_checkpoint(sd, source, preset)
    if not any(k.startswith("decode_head.") for k in sd):
        raise CheckpointError(f"{source}: no decode_head.* tensors: not an MMSegmentation segmentor checkpoint")
    meta = _meta(source)
    config = meta.get("config") if isinstance(meta.get("config"), str) else ""
    has_jpu = any(k.startswith("neck.") for k in sd)
    out = Renamed()
    ignored: dict[str, str] = {}
    overrides = _head(sd, source, config, out)  # first: an unsupported head is refused by name
    overrides = _backbone_overrides(sd, source, config, has_jpu) + overrides
    overrides += _neck(sd, source, config, out) if has_jpu else ["model.neck=null"]
    overrides += auxiliary_fcn_head(sd, out, ignored)
    overrides += [f"model.pixel_mean=[{','.join(map(str, MMSEG_MEAN))}]",
                  f"model.pixel_std=[{','.join(map(str, MMSEG_STD))}]"]
    for key, value in sd.items():
        if key.startswith("backbone."):
            rest = key[len("backbone."):]
            stem = next((p for p in STEM if rest.startswith(p)), None)
            out.put(key, "backbone.body." + (STEM[stem] + rest[len(stem):] if stem else rest), value)
        elif key not in out.used and key not in ignored:
            out[key] = value  # left for the unmapped-tensor check to report
    num_classes = int(sd["decode_head.conv_seg.weight"].shape[0])
    return Conversion(dict(out), overrides, num_classes, ignored, meta=_class_names(meta, num_classes))
