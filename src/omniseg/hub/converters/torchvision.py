"""torchvision's Mask R-CNN (`maskrcnn_resnet50_fpn` layout, any ResNet depth) -> omniseg's `maskrcnn`."""

from __future__ import annotations

from pathlib import Path

from omniseg.hub import load_state_dict_file
from omniseg.hub.converters import Conversion, resnet_depth
from omniseg.hub.errors import CheckpointError


def convert(source: Path, preset=None) -> Conversion:
    """torchvision's `MaskRCNN` with a ResNet-FPN backbone (`maskrcnn_resnet50_fpn` and the same layout for
    other depths). The network is omniseg's `maskrcnn` (whose detector is torchvision's RPN and RoIHeads)
    with torchvision's pooling and anchors: MultiScaleRoIAlign is not aligned and takes 2 samples per bin, cell
    anchors are rounded (the maskrcnn_r50 preset has detectron2's aligned adaptive pooling and unrounded anchors)."""
    sd = load_state_dict_file(source)
    if any(k.startswith("roi_heads.box_head.0.") for k in sd):
        raise CheckpointError(f"{source}: torchvision's maskrcnn_resnet50_fpn_v2 layout (convolutional box head "
                              f"with normalisation) is not supported; the v1 layout (two-fc box head) is")
    needed = ("backbone.body.conv1.weight", "backbone.fpn.inner_blocks.0.0.weight",
              "roi_heads.box_predictor.cls_score.weight", "roi_heads.mask_predictor.mask_fcn_logits.weight")
    absent = [k for k in needed if k not in sd]
    if absent:
        raise CheckpointError(f"{source}: not a torchvision Mask R-CNN state dict (no {', '.join(absent)})")
    backbone = resnet_depth(sd, "backbone.body.")
    num_classes = int(sd["roi_heads.box_predictor.cls_score.weight"].shape[0]) - 1  # class 0 is background
    fpn_dim = int(sd["backbone.fpn.inner_blocks.0.0.weight"].shape[0])
    mask_convs = len({k.split(".")[2] for k in sd if k.startswith("roi_heads.mask_head.")})
    mask_dim = int(sd["roi_heads.mask_head.0.0.weight"].shape[0])
    box_dim = int(sd["roi_heads.box_head.fc6.weight"].shape[0])
    out, ignored = {}, {}
    for key, value in sd.items():
        if key.endswith("num_batches_tracked"):
            ignored[key] = "BatchNorm counter (the backbone's norms are frozen)"
            continue
        if key.startswith("backbone.body."):
            out["detector.backbone.body.body." + key[len("backbone.body."):]] = value
        elif key.startswith(("backbone.fpn.", "rpn.", "roi_heads.")):
            out["detector." + key] = value
        else:
            out[key] = value  # left for the unmapped-tensor check to report
    overrides = [f"model.backbone={backbone}", "model.backbone_norm=frozen_bn", f"model.fpn_dim={fpn_dim}",
                 "model.roi.aligned=false", "model.roi.sampling_ratio=2", "model.rpn.anchors=torchvision",
                 f"model.roi.mask_convs={mask_convs}", f"model.roi.mask_head_dim={mask_dim}",
                 f"model.roi.box_head_dim={box_dim}"]
    return Conversion(out, overrides, num_classes, ignored)
