"""The released PyTorch PANet (ShuLiu1993/PANet, on Detectron.pytorch) -> omniseg's `panet`.

The released mask model (e2e_panet_R-50-FPN_2x_mask: `{"step", "train_size", "batch_size", "model", "optimizer"}`)
is a Generalized_RCNN whose parts map onto omniseg's panet with these settings:
- ResNet-50 with AffineChannel2d norms (weight and bias only): a frozen-BN timm ResNet with mean 0 and variance
  1 - eps (so the frozen BN is exactly the affine map), stride in the first 1x1 (MSRA), the stem conv reversed from
  BGR to RGB input and Detectron's pixel mean (102.9801, 115.9465, 122.7717 BGR, std 1) in RGB order;
- GroupNorm (32 groups) in the FPN and the bottom-up path (`model.fpn_norm=gn`), in the mask head and in the box
  head, which is convolutional (`model.roi.box_head=conv_fc`: per-level conv + 3 convs + fc 1024);
- classes: background first, as torchvision's heads, so no permutation; class-specific boxes and masks;
- Detectron's geometry: its rounded legacy anchors (`model.rpn.anchors=detectron_legacy`), +1 box widths in box
  coding, proposal sizes and NMS IoU, clipping to W - 1 (`model.roi.box_geometry=legacy`), legacy RoIAlign with sampling ratio 2
  (`model.roi.aligned=false`), its test settings (short side 1000, long side at most 1400, RPN 1000 proposals per
  level before and 1000 after NMS 0.7, score 0.05, NMS 0.5, 100 detections).

Remaining numerical differences from the official inference (printed as a warning on conversion):
- the RPN keeps proposals whose (+1) sides exceed 1e-3 px; Detectron drops those under one pixel of the original
  image (TEST.RPN_MIN_SIZE 0 -> max(0, 1) x the test scale, about 2 px of the network input on COCO);
- Detectron keeps the 100 detections by a score threshold (ties may keep more); torchvision keeps the top 100.
Detection-only releases (e2e_panet_R-50-FPN_1x_det, _1x_det_2fc: no mask head), PANets without GroupNorm or
with other heads are refused, naming what omniseg's panet lacks.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

from omniseg.hub import load_state_dict_file
from omniseg.hub.converters import Conversion, resnet_depth
from omniseg.hub.errors import CheckpointError

# Detectron's PIXEL_MEANS (BGR), pixel std 1, FrozenBN eps of the timm ResNet.
DETECTRON_PIXEL_MEAN_BGR = (102.9801, 115.9465, 122.7717)
FROZEN_BN_EPS = 1e-5

GEOMETRY_DIFFERENCES = (
    "no RPN minimum proposal size of one original-image pixel",
    "top-100 detections by rank instead of Detectron's score threshold",
)

_BODY = "Conv_Body.conv_body."
_LEVELS = 4  # FPN levels P2..P5 (RoI levels 2..5)


def _resnet(sd: dict[str, torch.Tensor], target: str) -> tuple[dict[str, torch.Tensor], set[str], list[str]]:
    """Detectron.pytorch ResNet (`res1.conv1`, `res1.bn1`, `res{2..5}.{b}.conv{1..3}|bn{1..3}|downsample.{0,1}`)
    -> timm names under `target`, AffineChannel2d norms as frozen BN with unit statistics."""
    keys = [k for k in sd if k.startswith(_BODY)]
    depth = resnet_depth(keys, _BODY, stage="res{}", first=2)
    out, handled = {}, set()
    for key in keys:
        name = key[len(_BODY):]
        if name == "res1.conv1.weight":
            out[target + "conv1.weight"] = sd[key].flip(1)  # BGR -> RGB input
        elif (m := re.fullmatch(r"res1\.bn1\.(weight|bias)", name)):
            out[target + f"bn1.{m.group(1)}"] = sd[key]
        elif (m := re.fullmatch(r"res([2-5])\.(\d+)\.((?:conv|bn)[1-3]|downsample\.[01])\.(weight|bias)", name)):
            stage, block, layer, tensor = m.groups()
            out[target + f"layer{int(stage) - 1}.{block}.{layer}.{tensor}"] = sd[key]
        else:
            continue
        handled.add(key)
    for key in list(out):  # every AffineChannel2d becomes a frozen BN: y = w * (x - 0) / sqrt(1 - eps + eps) + b
        if key.endswith(".weight") and _is_norm(key, target):
            base = key[: -len("weight")]
            out[base + "running_mean"] = torch.zeros_like(out[key])
            out[base + "running_var"] = torch.full_like(out[key], 1.0 - FROZEN_BN_EPS)
    overrides = [f"model.backbone={depth}", "model.backbone_norm=frozen_bn"]
    if depth in ("resnet50", "resnet101", "resnet152"):
        overrides.append("model.backbone_kwargs.stride_in_1x1=true")
    return out, handled, overrides


def _is_norm(key: str, target: str) -> bool:
    """A timm ResNet key (under `target`) of a norm layer: bn1..3 or a shortcut's `downsample.1`."""
    name = key[len(target):]
    return bool(re.search(r"(^|\.)bn[1-3]\.weight$", name) or name.endswith("downsample.1.weight"))


def _conv_norm(src: str, dst: str, conv_bias: bool = False) -> dict[str, str]:
    """A `[conv, GroupNorm, (ReLU)]` Sequential `src` -> omniseg's `[conv, GroupNorm]` `dst`."""
    names = {f"{src}.0.weight": f"{dst}.0.weight", f"{src}.1.weight": f"{dst}.1.weight",
             f"{src}.1.bias": f"{dst}.1.bias"}
    if conv_bias:
        names[f"{src}.0.bias"] = f"{dst}.0.bias"
    return names


def _differences(source: Path, keys: set[str]) -> None:
    """Refuse the layouts whose network omniseg's panet does not build, naming the component."""
    if not any(k.startswith("Mask_Head.") for k in keys):
        raise CheckpointError(f"{source}: no mask head (a Faster R-CNN detection model, e.g. e2e_panet_R-50-FPN_1x_det); "
                              f"omniseg's panet segments instances and needs the mask model")
    if not any(k.startswith("Conv_Body.panet_buttomup_conv1_modules.") for k in keys):
        raise CheckpointError(f"{source}: no bottom-up path augmentation (a plain FPN body); omniseg converts the "
                              f"PANet body (fpn_ResNet*_conv5_body_bup)")
    if not any(k.startswith("Mask_Head.mask_conv1.") for k in keys):
        raise CheckpointError(f"{source}: a mask head without adaptive feature pooling (no Mask_Head.mask_conv1.*); "
                              f"omniseg converts mask_rcnn_fcn_head_v1up4convs_gn_adp_ff")
    if not any(k.startswith("Box_Head.conv1_head.") for k in keys):
        what = "a 2fc box head (roi_2mlp_head*)" if any(k.startswith("Box_Head.fc1") for k in keys) else \
            "a box head other than roi_Xconv1fc_gn_head_panet"
        raise CheckpointError(f"{source}: {what}; omniseg converts the released conv box head "
                              f"(roi_Xconv1fc_gn_head_panet)")
    if "Conv_Body.conv_top.1.weight" not in keys or "Mask_Head.mask_conv1.0.1.weight" not in keys:
        raise CheckpointError(f"{source}: a PANet without GroupNorm in its FPN or heads; omniseg converts the released "
                              f"models (FPN.USE_GN, GN heads)")
    for key in ("Mask_Head.conv_fcn.6.weight", "Mask_Outs.upsample.upconv.weight"):
        if key in keys:
            raise CheckpointError(f"{source}: {key}: a mask head deeper than PANet's 4 convs or with an upsampling "
                                  f"output is not part of omniseg's panet")


def convert(source: Path, preset=None) -> Conversion:
    sd = load_state_dict_file(source)
    keys = set(sd)
    if not any(k.startswith("Conv_Body.") for k in keys) or not any(k.startswith("Box_Head.") for k in keys):
        raise CheckpointError(f"{source}: not a PANet (Detectron.pytorch) checkpoint: no Conv_Body.* / Box_Head.* "
                              f"tensors")
    _differences(source, keys)

    out, handled, overrides = _resnet(sd, "detector.backbone.body.body.")
    names: dict[str, str] = {}
    fpn = "detector.backbone.fpn."
    # top-down: conv_top on res5, laterals i = 0..2 on res4..res2; post-hoc i = 0..3 on P5..P2 (coarsest first)
    names.update(_conv_norm("Conv_Body.conv_top", f"{fpn}inner_blocks.{_LEVELS - 1}"))
    for i in range(_LEVELS - 1):
        names.update(_conv_norm(f"Conv_Body.topdown_lateral_modules.{i}.conv_lateral",
                                f"{fpn}inner_blocks.{_LEVELS - 2 - i}"))
    for i in range(_LEVELS):
        names.update(_conv_norm(f"Conv_Body.posthoc_modules.{i}", f"{fpn}layer_blocks.{_LEVELS - 1 - i}"))
    bottom_up = "detector.backbone.bottom_up."
    for i in range(_LEVELS - 1):  # step i: N_{i+2} -> N_{i+3}
        names.update(_conv_norm(f"Conv_Body.panet_buttomup_conv1_modules.{i}", f"{bottom_up}down.{i}", conv_bias=True))
        names.update(_conv_norm(f"Conv_Body.panet_buttomup_conv2_modules.{i}", f"{bottom_up}fuse.{i}", conv_bias=True))
    for ours, theirs in (("FPN_RPN_conv", "conv.0.0"), ("FPN_RPN_cls_score", "cls_logits"),
                         ("FPN_RPN_bbox_pred", "bbox_pred")):
        for tensor in ("weight", "bias"):
            names[f"RPN.{ours}.{tensor}"] = f"detector.rpn.head.{theirs}.{tensor}"

    heads = "detector.roi_heads."
    box_convs = sorted({int(m.group(1)) for k in keys if (m := re.fullmatch(r"Box_Head\.convs\.(\d+)\.weight", k))
                        and sd[k].dim() == 4})
    for i in range(_LEVELS):
        names.update(_conv_norm(f"Box_Head.conv1_head.{i}", f"{heads}box_head.level_convs.{i}"))
    for j, index in enumerate(box_convs):  # Sequential of (conv, GN, ReLU) triples: conv at 3j, GN at 3j + 1
        names[f"Box_Head.convs.{index}.weight"] = f"{heads}box_head.convs.{j}.0.weight"
        names[f"Box_Head.convs.{index + 1}.weight"] = f"{heads}box_head.convs.{j}.1.weight"
        names[f"Box_Head.convs.{index + 1}.bias"] = f"{heads}box_head.convs.{j}.1.bias"
    mask = f"{heads}mask_head."
    for i in range(_LEVELS):
        names.update(_conv_norm(f"Mask_Head.mask_conv1.{i}", f"{mask}conv1.{i}"))
    for src, dst in (("Mask_Head.conv_fcn.0", "conv2"), ("Mask_Head.conv_fcn.3", "conv3")):  # flat (conv, GN, ReLU)
        index = int(src.rsplit(".", 1)[1])
        names[f"{src}.weight"] = f"{mask}{dst}.0.weight"
        names[f"Mask_Head.conv_fcn.{index + 1}.weight"] = f"{mask}{dst}.1.weight"
        names[f"Mask_Head.conv_fcn.{index + 1}.bias"] = f"{mask}{dst}.1.bias"
    for src, dst in (("mask_conv4", "conv4"), ("mask_conv4_fc", "conv4_fc"), ("mask_conv5_fc", "conv5_fc")):
        names.update(_conv_norm(f"Mask_Head.{src}", f"{mask}{dst}"))
    for tensor in ("weight", "bias"):
        names[f"Box_Head.fc.{tensor}"] = f"{heads}box_head.fc.{tensor}"
        names[f"Box_Outs.cls_score.{tensor}"] = f"{heads}box_predictor.cls_score.{tensor}"
        names[f"Box_Outs.bbox_pred.{tensor}"] = f"{heads}box_predictor.bbox_pred.{tensor}"
        names[f"Mask_Head.mask_fc.0.{tensor}"] = f"{mask}fc.{tensor}"
        names[f"Mask_Head.upconv.{tensor}"] = f"{mask}deconv.{tensor}"
        names[f"Mask_Outs.classify.{tensor}"] = f"{mask}predictor.{tensor}"
    for key, target in names.items():
        if key in sd:
            out[target] = sd[key]
            handled.add(key)
    for key in keys - handled:
        out[key] = sd[key]  # left for the unmapped-tensor check to report

    cls_w = sd.get("Box_Outs.cls_score.weight")
    if cls_w is None:
        raise CheckpointError(f"{source}: no Box_Outs.cls_score.weight")
    num_classes = int(cls_w.shape[0]) - 1  # background first, as torchvision
    if int(sd["Box_Outs.bbox_pred.weight"].shape[0]) != 4 * (num_classes + 1):
        raise CheckpointError(f"{source}: class-agnostic box regression (CLS_AGNOSTIC_BBOX_REG) is not part of "
                              f"omniseg's panet, which regresses per class")
    if int(sd["Mask_Outs.classify.weight"].shape[0]) != num_classes + 1:
        raise CheckpointError(f"{source}: a class-agnostic mask head (CLS_SPECIFIC_MASK False) is not part of "
                              f"omniseg's panet")
    anchors = int(sd["RPN.FPN_RPN_cls_score.weight"].shape[0])
    if anchors != 3 or int(sd["RPN.FPN_RPN_bbox_pred.weight"].shape[0]) != 12:
        raise CheckpointError(f"{source}: an RPN with {anchors} sigmoid scores per location; omniseg converts the "
                              f"default three aspect ratios (0.5, 1, 2) with sigmoid scores")

    fpn_dim = int(sd["Conv_Body.posthoc_modules.0.0.weight"].shape[0])
    box_res = round((int(sd["Box_Head.fc.weight"].shape[1]) / int(sd["Box_Head.conv1_head.0.0.weight"].shape[0]))
                    ** 0.5)
    mask_dim = int(sd["Mask_Head.mask_conv4.0.weight"].shape[0])
    mean_rgb = "[" + ",".join(repr(v) for v in DETECTRON_PIXEL_MEAN_BGR[::-1]) + "]"
    overrides += [
        f"model.pixel_mean={mean_rgb}", "model.pixel_std=[1.0,1.0,1.0]",
        "model.arch=panet", f"model.fpn_dim={fpn_dim}", "model.fpn_norm=gn",
        "model.panet.bottom_up=true", "model.panet.adaptive_pooling=true",
        f"model.panet.fc_fusion={'true' if 'Mask_Head.mask_fc.0.weight' in keys else 'false'}",
        "model.panet.fusion_relu=true",
        "model.rpn.anchor_sizes=[32,64,128,256,512]", "model.rpn.aspect_ratios=[0.5,1.0,2.0]",
        "model.rpn.anchors=detectron_legacy", "model.rpn.pre_nms_topk_test=1000", "model.rpn.post_nms_topk_test=1000",
        "model.rpn.nms_thresh=0.7",
        "model.roi.box_head=conv_fc", f"model.roi.box_head_convs={len(box_convs) + 1}",
        f"model.roi.box_conv_dim={int(sd['Box_Head.conv1_head.0.0.weight'].shape[0])}",
        f"model.roi.box_head_dim={int(sd['Box_Head.fc.weight'].shape[0])}", f"model.roi.box_resolution={box_res}",
        "model.roi.head_norm=gn", f"model.roi.mask_head_dim={mask_dim}",
        "model.roi.mask_resolution=14", "model.roi.sampling_ratio=2", "model.roi.aligned=false",
        "model.roi.box_geometry=legacy", "model.roi.bbox_reg_weights=[10.0,10.0,5.0,5.0]",
        "model.test.score_thresh=0.05", "model.test.nms_thresh=0.5", "model.test.detections_per_img=100",
        "model.test.mask_threshold=0.5", "data.min_size_test=1000", "data.max_size_test=1400",
    ]
    warnings.warn(f"{source}: converted; omniseg's panet differs from the official inference in: "
                  + "; ".join(GEOMETRY_DIFFERENCES), stacklevel=2)
    return Conversion(out, overrides, num_classes, {})
