"""detectron2's Mask R-CNN (`GeneralizedRCNN`: ResNet-FPN, StandardRPNHead, 2fc box head, 4conv mask head;
the model zoo's `mask_rcnn_R_{50,101}_FPN_{1x,3x}` .pkl files) -> omniseg's `maskrcnn`.

omniseg's Mask R-CNN is torchvision's detection stack, so besides renaming:
- the box classifier's K+1 rows move the background from last (detectron2) to first (torchvision);
- torchvision regresses a box for every class including the background (K+1 row groups); the background's
  group gets zeros. torchvision decodes it and then drops the background column before scoring, so those
  rows never reach a detection;
- the mask predictor gets a zero background channel for the same reason (a detection's mask is read from its
  own class's channel only);
- the model zoo's backbones are MSRA (caffe2) ResNets: stride in the first 1x1 of a bottleneck, BGR input with
  pixel std 1. The stride goes to `model.backbone_kwargs.stride_in_1x1`; BGR input becomes RGB input by
  reversing the input channels of the stem conv and the order of the pixel mean;
- the config follows detectron2's inference: aligned RoIAlign (ROIAlignV2) with adaptive sampling
  (POOLER_SAMPLING_RATIO 0), unrounded anchors at each level's stride, box-coder weights (10, 10, 5, 5).
"""

from __future__ import annotations

import re

import torch

from omniseg.hub.converters import Conversion, resnet_depth
from omniseg.hub.errors import CheckpointError

# detectron2 defaults (config/defaults.py): BGR input, caffe2 pixel mean, std 1.
DETECTRON2_PIXEL_MEAN_BGR = (103.530, 116.280, 123.675)
DETECTRON2_PIXEL_STD_BGR = (1.0, 1.0, 1.0)

_NORM_BUFFERS = ("weight", "bias", "running_mean", "running_var")


def detectron2_resnet_to_timm(name: str) -> str | None:
    """A detectron2 ResNet tensor name under its `bottom_up.` prefix (`stem.conv1.weight`, `res3.0.conv2.norm.bias`,
    `res4.0.shortcut.weight`) -> the timm ResNet name (`conv1.weight`, `layer2.0.bn2.bias`, `layer3.0.downsample.0.weight`);
    None when it is not one."""
    if name == "stem.conv1.weight":
        return "conv1.weight"
    m = re.fullmatch(r"stem\.conv1\.norm\.(\w+)", name)
    if m:
        return f"bn1.{m.group(1)}"
    m = re.fullmatch(r"res([2-5])\.(\d+)\.(conv[1-3]|shortcut)(\.norm)?\.(\w+)", name)
    if not m:
        return None
    stage, block, conv, norm, tensor = m.groups()
    layer = f"layer{int(stage) - 1}.{block}"
    if conv == "shortcut":
        return f"{layer}.downsample.{1 if norm else 0}.{tensor}"
    return f"{layer}.{conv.replace('conv', 'bn') if norm else conv}.{tensor}"


def convert_detectron2_resnet(sd: dict[str, torch.Tensor], prefix: str, target: str, source: str,
                              bgr: bool) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """The ResNet under `prefix` (detectron2 names) as timm tensors under `target`, with the overrides its layout
    implies (depth, MSRA stride-in-1x1 for bottlenecks). `bgr`: the stem conv reads BGR, reversed here to read RGB.
    FrozenBN layers saved with only weight and bias (caffe2-converted) get mean 0 and var 1, as detectron2 loads them.
    Returns (tensors, ignored, overrides)."""
    keys = [k for k in sd if k.startswith(prefix)]
    depth = resnet_depth(keys, prefix, stage="res{}", first=2)
    out, ignored = {}, {}
    norms = set()
    for key in keys:
        name = detectron2_resnet_to_timm(key[len(prefix):])
        if name is None:
            out[key] = sd[key]  # left for the unmapped-tensor check to report
            continue
        value = sd[key]
        if name == "conv1.weight" and bgr:
            value = value.flip(1)
        out[target + name] = value
        if ".norm." in key:
            norms.add(key[: key.rindex(".norm.") + len(".norm.")])
    for norm in norms:
        if norm + "running_mean" not in sd:
            weight = sd[norm + "weight"]
            base = detectron2_resnet_to_timm(norm[len(prefix):] + "weight")[: -len("weight")]
            out[target + base + "running_mean"] = torch.zeros_like(weight)
            out[target + base + "running_var"] = torch.ones_like(weight)
    if norms and not all(n + "running_mean" in sd for n in norms):
        ignored[f"{prefix}*.norm (no running statistics)"] = "caffe2-style FrozenBN: mean 0 and var 1, as detectron2 loads it"
    overrides = [f"model.backbone={depth}", "model.backbone_norm=frozen_bn"]
    if depth in ("resnet50", "resnet101", "resnet152"):
        overrides.append("model.backbone_kwargs.stride_in_1x1=true")
    return out, ignored, overrides


def pixel_overrides(sd: dict[str, torch.Tensor], source: str, bgr: bool) -> tuple[list[str], dict[str, str]]:
    """model.pixel_mean / pixel_std in omniseg's RGB order: from the checkpoint's `pixel_mean`/`pixel_std` buffers
    when saved with it, else detectron2's defaults (BGR)."""
    ignored = {}
    mean, std = DETECTRON2_PIXEL_MEAN_BGR, DETECTRON2_PIXEL_STD_BGR
    if "pixel_mean" in sd:
        mean = tuple(float(v) for v in sd["pixel_mean"].flatten())
        ignored["pixel_mean"] = "read into model.pixel_mean"
    if "pixel_std" in sd:
        std = tuple(float(v) for v in sd["pixel_std"].flatten())
        ignored["pixel_std"] = "read into model.pixel_std"
    if len(mean) != 3 or len(std) != 3:
        raise CheckpointError(f"{source}: pixel_mean/pixel_std with {len(mean)}/{len(std)} values, expected 3")
    if bgr:
        mean, std = mean[::-1], std[::-1]
    as_list = lambda values: "[" + ",".join(repr(round(v, 6)) for v in values) + "]"
    return [f"model.pixel_mean={as_list(mean)}", f"model.pixel_std={as_list(std)}"], ignored


def _fpn(sd: dict[str, torch.Tensor], levels: range) -> dict[str, torch.Tensor]:
    """detectron2 FPN `fpn_lateral{l}` / `fpn_output{l}` (l = 2..5) -> torchvision FPN inner/layer blocks."""
    out = {}
    for i, level in enumerate(levels):
        for kind, target in (("lateral", "inner_blocks"), ("output", "layer_blocks")):
            for tensor in ("weight", "bias"):
                key = f"backbone.fpn_{kind}{level}.{tensor}"
                if key in sd:
                    out[key] = f"{target}.{i}.0.{tensor}"
    return out


def convert_rcnn_checkpoint(sd: dict[str, torch.Tensor], source: str, preset=None) -> Conversion:
    """A detectron2 GeneralizedRCNN state dict with a mask head -> omniseg `maskrcnn` tensors and the overrides
    that make the config follow it (depth, widths, classes, detectron2's pooling and anchors)."""
    required = ("backbone.bottom_up.stem.conv1.weight", "backbone.fpn_lateral2.weight",
                "proposal_generator.rpn_head.objectness_logits.weight", "roi_heads.box_predictor.cls_score.weight",
                "roi_heads.box_predictor.bbox_pred.weight", "roi_heads.mask_head.predictor.weight")
    absent = [k for k in required if k not in sd]
    if absent:
        what = ("no mask head: a detection-only (Faster R-CNN) checkpoint; omniseg's maskrcnn needs masks"
                if absent == ["roi_heads.mask_head.predictor.weight"] else f"no {', '.join(absent)}")
        raise CheckpointError(f"{source}: not a detectron2 Mask R-CNN (ResNet-FPN) checkpoint ({what})")
    unsupported = {"roi_heads.box_head.conv1.weight": "a convolutional box head (NUM_CONV > 0)",
                   "roi_heads.box_head.conv1.norm.weight": "a normalised box head",
                   "roi_heads.mask_head.mask_fcn1.norm.weight": "a normalised mask head (ROI_MASK_HEAD.NORM)",
                   "backbone.fpn_lateral2.norm.weight": "a normalised FPN (FPN.NORM)",
                   "proposal_generator.rpn_head.conv.conv0.weight": "an RPN head with several convs",
                   "roi_heads.box_predictor.0.cls_score.weight": "Cascade R-CNN stages"}
    for key, what in unsupported.items():
        if key in sd:
            raise CheckpointError(f"{source}: {what} is not part of omniseg's maskrcnn")
    if any(".conv_offset." in k for k in sd):
        raise CheckpointError(f"{source}: deformable convs in the backbone are not part of omniseg's ResNets")

    cls_w = sd["roi_heads.box_predictor.cls_score.weight"]
    num_classes = int(cls_w.shape[0]) - 1  # background is detectron2's last row
    bbox_w = sd["roi_heads.box_predictor.bbox_pred.weight"]
    if bbox_w.shape[0] == 4:
        raise CheckpointError(f"{source}: class-agnostic box regression (CLS_AGNOSTIC_BBOX_REG) is not part of "
                              f"omniseg's maskrcnn, which regresses per class")
    if bbox_w.shape[0] != 4 * num_classes:
        raise CheckpointError(f"{source}: bbox_pred has {bbox_w.shape[0]} rows for {num_classes} classes")
    mask_w = sd["roi_heads.mask_head.predictor.weight"]
    if mask_w.shape[0] == 1:
        raise CheckpointError(f"{source}: a class-agnostic mask head (CLS_AGNOSTIC_MASK) is not part of omniseg's "
                              f"maskrcnn, which predicts a mask per class")

    body, ignored, overrides = convert_detectron2_resnet(sd, "backbone.bottom_up.", "detector.backbone.body.body.",
                                                         source, bgr=True)
    out = dict(body)
    names = {k: "detector.backbone.fpn." + v for k, v in _fpn(sd, range(2, 6)).items()}
    rpn = {"conv": "conv.0.0", "objectness_logits": "cls_logits", "anchor_deltas": "bbox_pred"}
    for ours, theirs in rpn.items():
        for tensor in ("weight", "bias"):
            names[f"proposal_generator.rpn_head.{ours}.{tensor}"] = f"detector.rpn.head.{theirs}.{tensor}"
    mask_convs = len([k for k in sd if re.fullmatch(r"roi_heads\.mask_head\.mask_fcn\d+\.weight", k)])
    fcs = len([k for k in sd if re.fullmatch(r"roi_heads\.box_head\.fc\d+\.weight", k)])
    if fcs != 2:
        raise CheckpointError(f"{source}: a box head with {fcs} fc layers; omniseg's maskrcnn has two (fc6, fc7)")
    for tensor in ("weight", "bias"):
        names[f"roi_heads.box_head.fc1.{tensor}"] = f"detector.roi_heads.box_head.fc6.{tensor}"
        names[f"roi_heads.box_head.fc2.{tensor}"] = f"detector.roi_heads.box_head.fc7.{tensor}"
        for i in range(mask_convs):
            names[f"roi_heads.mask_head.mask_fcn{i + 1}.{tensor}"] = f"detector.roi_heads.mask_head.{i}.0.{tensor}"
        names[f"roi_heads.mask_head.deconv.{tensor}"] = f"detector.roi_heads.mask_predictor.conv5_mask.{tensor}"
    for key, target in names.items():
        if key in sd:
            out[target] = sd[key]
    handled = set(names) | {k for k in sd if k.startswith("backbone.bottom_up.")}

    def background_first(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t[-1:], t[:-1]])

    def background_zeros(t: torch.Tensor, rows: int) -> torch.Tensor:
        return torch.cat([t.new_zeros((rows, *t.shape[1:])), t])

    predictor = {
        "roi_heads.box_predictor.cls_score.weight": ("box_predictor.cls_score.weight", background_first),
        "roi_heads.box_predictor.cls_score.bias": ("box_predictor.cls_score.bias", background_first),
        "roi_heads.box_predictor.bbox_pred.weight": ("box_predictor.bbox_pred.weight", lambda t: background_zeros(t, 4)),
        "roi_heads.box_predictor.bbox_pred.bias": ("box_predictor.bbox_pred.bias", lambda t: background_zeros(t, 4)),
        "roi_heads.mask_head.predictor.weight": ("mask_predictor.mask_fcn_logits.weight", lambda t: background_zeros(t, 1)),
        "roi_heads.mask_head.predictor.bias": ("mask_predictor.mask_fcn_logits.bias", lambda t: background_zeros(t, 1)),
    }
    for key, (target, adapt) in predictor.items():
        if key in sd:
            out["detector.roi_heads." + target] = adapt(sd[key])
            handled.add(key)
    for key in sd:
        if key.startswith("proposal_generator.anchor_generator."):
            ignored[key] = "anchors, recomputed from the config (detectron2 anchors)"
            handled.add(key)
    pixel, pixel_ignored = pixel_overrides(sd, source, bgr=True)
    ignored.update(pixel_ignored)
    handled |= set(pixel_ignored)
    for key in sd:
        if key not in handled:
            out[key] = sd[key]  # left for the unmapped-tensor check to report

    anchors_per_location = int(sd["proposal_generator.rpn_head.objectness_logits.weight"].shape[0])
    if anchors_per_location != 3:
        raise CheckpointError(f"{source}: {anchors_per_location} anchors per location; omniseg's converter knows "
                              f"detectron2's default three aspect ratios (0.5, 1, 2) only")
    overrides += pixel
    overrides += ["model.arch=maskrcnn", f"model.fpn_dim={int(sd['backbone.fpn_lateral2.weight'].shape[0])}",
                  "model.rpn.anchor_sizes=[32,64,128,256,512]", "model.rpn.aspect_ratios=[0.5,1.0,2.0]",
                  "model.rpn.anchors=detectron2", "model.roi.aligned=true", "model.roi.sampling_ratio=0",
                  "model.roi.bbox_reg_weights=[10.0,10.0,5.0,5.0]", f"model.roi.mask_convs={mask_convs}",
                  f"model.roi.mask_head_dim={int(sd['roi_heads.mask_head.mask_fcn1.weight'].shape[0])}",
                  f"model.roi.box_head_dim={int(sd['roi_heads.box_head.fc1.weight'].shape[0])}",
                  "model.test.score_thresh=0.05", "model.test.nms_thresh=0.5", "model.test.detections_per_img=100"]
    return Conversion(out, overrides, num_classes, ignored)
