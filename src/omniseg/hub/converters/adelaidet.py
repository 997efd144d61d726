"""AdelaiDet's BlendMask .pth (R_50/R_101 1x/3x, 550_R_50, RT_R_50 with GroupNorm or BatchNorm heads, Panoptic
R_50/R_101 3x) -> omniseg's `blendmask`.

The config follows the checkpoint: the FCOS levels (P3-P5, P6 or P6-P7 from the `top_block` tensors), the tower
depths and norm, the attention size (the `top_layer` width), the basis module's depth and width. The levels' size
ranges are not in the tensors; they are the released configs' ones for that level count (Base-BlendMask
[64, 128, 256, 512], Base-550 [64, 128, 256], Base-RT [64, 128]). In particular AdelaiDet's released RT models read
P3-P5 with 14 x 14 attentions (as omniseg's `blendmask_rt_r50` preset; the `rt` variant's own defaults, P3-P6 and
7 x 7, are the paper's RT model).
The backbone is detectron2's MSRA ResNet, converted as for detectron2's Mask R-CNN (stride in the 1x1, BGR stem).
The panoptic models (configs/BlendMask/Panoptic) add detectron2's Panoptic-FPN semantic head (`panoptic_module`:
SemSegFPNHead on P2-P5, whose FPN level P2 is `backbone.fpn_{lateral,output}2`); they convert into the panoptic variant
with `stuff_head: panoptic_fpn`: the detector's classes first (the things), then the head's stuff classes.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from omniseg.data.meta import DatasetMeta
from omniseg.hub import load_state_dict_file
from omniseg.hub.converters import Conversion
from omniseg.hub.converters.detectron2_rcnn import (
    convert_detectron2_resnet, detectron2_resnet_to_timm, pixel_overrides,
)
from omniseg.hub.errors import CheckpointError

# FCOS SIZES_OF_INTEREST of AdelaiDet's BlendMask configs, by the number of levels they read.
SIZES_OF_INTEREST = {5: [64, 128, 256, 512], 4: [64, 128, 256], 3: [64, 128]}
HEAD = "proposal_generator.fcos_head."
STUFF = "panoptic_module."
# PANOPTIC_FPN.COMBINE of configs/BlendMask/Panoptic/Base-Panoptic.yaml (STUFF_AREA_LIMIT: detectron2's default).
PANOPTIC_MERGE = {"instance_score_threshold": 0.45, "overlap_threshold": 0.4, "stuff_area_threshold": 4096}


def _tower(sd: dict, name: str) -> tuple[int, str | None]:
    """(number of convs, "gn" | "bn" | None) of an FCOS tower `Sequential(conv, norm, ReLU, ...)`."""
    convs = len({k for k in sd if re.fullmatch(rf"{HEAD}{name}\.\d+\.weight", k) and sd[k].dim() == 4})
    if not convs:
        return 0, None
    if f"{HEAD}{name}.1.0.weight" in sd:
        return convs, "bn"
    if f"{HEAD}{name}.1.weight" in sd:
        return convs, "gn"
    return convs, None


def convert(source: Path, preset=None) -> Conversion:
    sd = load_state_dict_file(source)
    required = ("backbone.fpn_lateral3.weight", HEAD + "cls_logits.weight", "top_layer.weight",
                "basis_module.refine.0.0.weight")
    absent = [k for k in required if k not in sd]
    if absent:
        raise CheckpointError(f"{source}: not an AdelaiDet BlendMask checkpoint (no {', '.join(absent)})")
    panoptic = any(k.startswith(STUFF) for k in sd)
    panoptic_preset = preset is not None and preset.model.get("variant") == "panoptic"
    if panoptic and not panoptic_preset:
        raise CheckpointError(f"{source}: a panoptic BlendMask checkpoint (Panoptic-FPN stuff head panoptic_module.*); "
                              f"convert it with the panoptic preset (blendmask_panoptic_r50)")
    if panoptic_preset and not panoptic:
        raise CheckpointError(f"{source}: an instance BlendMask checkpoint (no stuff branch); convert it with an instance "
                              f"preset (blendmask_r50, blendmask_rt_r50)")
    if panoptic and ("backbone.fpn_lateral2.weight" not in sd or STUFF + "predictor.weight" not in sd):
        raise CheckpointError(f"{source}: a Panoptic-FPN stuff head needs the FPN's P2 (backbone.fpn_lateral2) and its "
                              f"predictor (panoptic_module.predictor)")
    if "backbone.bottom_up.stem.conv1.weight" not in sd:
        raise CheckpointError(f"{source}: the backbone is not a detectron2 ResNet (e.g. DLA-34); omniseg's blendmask "
                              f"builds ResNets")
    if any(".conv_offset" in k or k.endswith(".offset.weight") for k in sd):
        raise CheckpointError(f"{source}: deformable convs (dcni3 models) are not part of omniseg's ResNets")
    if any(k.startswith(HEAD + "scales.") for k in sd):
        raise CheckpointError(f"{source}: FCOS per-level scales (USE_SCALE) are not part of omniseg's blendmask head")

    has_counters = any(k.startswith("backbone.bottom_up.") and k.endswith("num_batches_tracked") for k in sd)
    body, ignored, overrides = convert_detectron2_resnet(
        {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}, "backbone.bottom_up.",
        "backbone.body.", str(source), bgr=True)
    out = dict(body)
    if has_counters:  # trained BatchNorm (SyncBN, FREEZE_AT -1): keep it a BatchNorm, as the RT recipe trains it
        for key, value in sd.items():
            if key.startswith("backbone.bottom_up.") and key.endswith("num_batches_tracked"):
                out["backbone.body." + detectron2_resnet_to_timm(key[len("backbone.bottom_up."):])] = value
        overrides = [o for o in overrides if not o.startswith("model.backbone_norm=")]
        overrides += ["model.backbone_norm=bn", "model.backbone_freeze_at=0"]
    handled = {k for k in sd if k.startswith("backbone.bottom_up.")}

    levels = 3 + ("backbone.top_block.p6.weight" in sd) + ("backbone.top_block.p7.weight" in sd)
    names = {}
    for i, level in enumerate(range(2 if panoptic else 3, 6)):
        for t in ("weight", "bias"):
            names[f"backbone.fpn_lateral{level}.{t}"] = f"fpn.inner_blocks.{i}.0.{t}"
            names[f"backbone.fpn_output{level}.{t}"] = f"fpn.layer_blocks.{i}.0.{t}"
    for p in ("p6", "p7"):
        for t in ("weight", "bias"):
            names[f"backbone.top_block.{p}.{t}"] = f"fpn.extra_blocks.{p}.{t}"

    towers = {"cls_tower": "cls_tower", "bbox_tower": "box_tower", "share_tower": "share_tower"}
    depth, norms = {}, set()
    for theirs, ours in towers.items():
        depth[ours], norm = _tower(sd, theirs)
        if depth[ours] and norm is None:
            raise CheckpointError(f"{source}: FCOS {theirs} without normalisation (FCOS.NORM none) is not part of "
                                  f"omniseg's blendmask head (GroupNorm or BatchNorm)")
        norms |= {norm} if norm else set()
        for key in sd:
            m = re.fullmatch(rf"{HEAD}{theirs}\.(\d+)\.(.+)", key)
            if not m:
                continue
            index, rest = int(m.group(1)), m.group(2)
            i, part = divmod(index, 3)
            if part == 0:
                names[key] = f"head.{ours}.convs.{i}.{rest}"
            elif part == 1:
                names[key] = f"head.{ours}.norms.{i}.{rest}" if norm == "bn" else f"head.{ours}.norms.{i}.0.{rest}"
    if len(norms) > 1:
        raise CheckpointError(f"{source}: FCOS towers with different norms ({sorted(norms)})")
    for layer in ("cls_logits", "bbox_pred", "ctrness"):
        for t in ("weight", "bias"):
            names[f"{HEAD}{layer}.{t}"] = f"head.{layer}.{t}"
    for t in ("weight", "bias"):
        names[f"top_layer.{t}"] = f"head.top_layer.{t}"

    basis_convs = len({k for k in sd if re.fullmatch(r"basis_module\.tower\.\d+\.0\.weight", k)}) - 1
    bases_index = basis_convs + 2  # convs, Upsample, conv block, 1x1
    if f"basis_module.tower.{bases_index}.weight" not in sd:
        raise CheckpointError(f"{source}: basis module tower without its 1x1 to the bases at index {bases_index}")
    for key in sd:
        m = re.fullmatch(r"basis_module\.(refine|tower|seg_head)\.(\d+)\.(.+)", key)
        if not m:
            continue
        part, index, rest = m.group(1), int(m.group(2)), m.group(3)
        if part == "refine":
            names[key] = f"basis.refine.{index}.{rest}"
        elif part == "tower" and index < basis_convs:
            names[key] = f"basis.tower.{index}.{rest}"
        elif part == "tower" and index == basis_convs + 1:
            names[key] = f"basis.post.{rest}"
        elif part == "tower" and index == bases_index:
            names[key] = f"basis.bases.{rest}"
        elif part == "seg_head":  # conv, BN, ReLU, conv, BN, ReLU, 1x1: the auxiliary semantic head (training only)
            seg = {0: "convs.0.0", 1: "convs.0.1", 3: "convs.1.0", 4: "convs.1.1", 6: "logits"}
            if index in seg:
                names[key] = f"aux_semantic.{seg[index]}.{rest}"
    for key in sd:  # SemSegFPNHead: p<level>.<2 x block> (Upsample modules between the convs), each conv with .norm
        m = re.fullmatch(re.escape(STUFF) + r"p([2-5])\.(\d+)\.(weight|bias|norm\.weight|norm\.bias)", key)
        if m and int(m.group(2)) % 2 == 0:
            part = "1." + m.group(3)[len("norm."):] if m.group(3).startswith("norm.") else "0." + m.group(3)
            names[key] = f"stuff_head.scale_heads.{int(m.group(1)) - 2}.{int(m.group(2)) // 2}.{part}"
    for t in ("weight", "bias"):
        names[f"{STUFF}predictor.{t}"] = f"stuff_head.predictor.{t}"
    for key, target in names.items():
        if key in sd:
            out[target] = sd[key]
            handled.add(key)
    pixel, pixel_ignored = pixel_overrides(sd, str(source), bgr=True)
    ignored.update(pixel_ignored)
    handled |= set(pixel_ignored)
    for key in sd:
        if key not in handled:
            out[key] = sd[key]  # left for the unmapped-tensor check to report

    num_classes = int(sd[HEAD + "cls_logits.weight"].shape[0])
    num_bases = int(sd[f"basis_module.tower.{bases_index}.weight"].shape[0])
    attn_size = math.isqrt(int(sd["top_layer.weight"].shape[0]) // num_bases)
    if num_bases * attn_size ** 2 != sd["top_layer.weight"].shape[0]:
        raise CheckpointError(f"{source}: top_layer has {sd['top_layer.weight'].shape[0]} channels, not "
                              f"{num_bases} bases x M x M")
    rt = depth["share_tower"] > 0 and not depth["cls_tower"] and not depth["box_tower"]
    overrides += pixel
    overrides += [
        "model.arch=blendmask", f"model.variant={'panoptic' if panoptic else 'rt' if rt else 'standard'}",
        f"model.fpn_channels={int(sd['backbone.fpn_lateral3.weight'].shape[0])}",
        f"model.blendmask.num_levels={levels}",
        f"model.blendmask.sizes_of_interest=[{','.join(str(s) for s in SIZES_OF_INTEREST[levels])}]",
        f"model.blendmask.num_cls_convs={depth['cls_tower']}", f"model.blendmask.num_box_convs={depth['box_tower']}",
        f"model.blendmask.num_share_convs={depth['share_tower']}", f"model.blendmask.tower_norm={norms.pop() if norms else 'gn'}",
        f"model.blendmask.num_bases={num_bases}", f"model.blendmask.attn_size={attn_size}",
        f"model.blendmask.basis_channels={int(sd['basis_module.refine.0.0.weight'].shape[0])}",
        f"model.blendmask.basis_num_convs={basis_convs}", "model.blendmask.bottom_resolution=56",
        "model.blendmask.test.score_threshold=0.05", "model.blendmask.test.pre_nms_topk=1000",
        "model.blendmask.test.nms_threshold=0.6", "model.blendmask.test.detections_per_image=100",
    ]
    if "basis_module.seg_head.6.weight" not in sd:
        overrides.append("model.blendmask.aux_semantic_weight=0")  # trained without it: no head to fill
    elif int(sd["basis_module.seg_head.6.weight"].shape[0]) != num_classes + 1:
        raise CheckpointError(f"{source}: the auxiliary semantic head has {sd['basis_module.seg_head.6.weight'].shape[0]} "
                              f"classes, omniseg's has the {num_classes} detector classes + background")
    if not panoptic:
        return Conversion(out, overrides, num_classes, ignored)
    predictor = sd[STUFF + "predictor.weight"]
    overrides += ["model.blendmask.stuff_head=panoptic_fpn",
                  f"model.blendmask.stuff_channels={int(predictor.shape[1])}",
                  *(f"model.blendmask.test.{k}={v}" for k, v in PANOPTIC_MERGE.items())]
    # The detector's classes are the things; the stuff head's are "things" + the stuff classes, in that order.
    num_stuff = int(predictor.shape[0]) - 1
    things = DatasetMeta(classes=[f"class_{i}" for i in range(num_classes + num_stuff)],
                         isthing=[i < num_classes for i in range(num_classes + num_stuff)], name="converted")
    return Conversion(out, overrides, num_classes + num_stuff, ignored, meta=things)
