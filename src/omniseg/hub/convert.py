"""`omniseg convert`: a released checkpoint -> an omniseg weights file (config and classes inside), which
`eval`, `predict`, `Predictor`, `export` and `train.weights=` use like any omniseg file.

A conversion reads the checkpoint safely (`omniseg.hub.pickled`), derives from its tensors the settings in
which it differs from the preset (backbone depth, classes), maps every tensor name, and refuses to write
a model with unmapped checkpoint tensors or uninitialised model tensors unless told to (`allow_missing`),
listing them. Sources: `torchvision` (Mask R-CNN, `maskrcnn_resnet50_fpn` layout, any ResNet depth).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from omniseg.hub.errors import CheckpointError

SOURCES = ("torchvision",)


@dataclass
class Conversion:
    """What a converter made: the model's state dict, config overrides on top of the preset, classes, and
    the report (`ignored`: checkpoint tensors deliberately left out, with the reason)."""

    state_dict: dict[str, torch.Tensor]
    overrides: list[str]
    num_classes: int
    ignored: dict[str, str] = field(default_factory=dict)


def _resnet_depth(keys, prefix: str) -> str:
    """resnet18/34/50/101/152 from the number of blocks per stage and the block type in a ResNet's keys."""
    blocks = [len({k.split(".")[len(prefix.split("."))] for k in keys if k.startswith(f"{prefix}layer{i}.")})
              for i in range(1, 5)]
    bottleneck = any(k.startswith(f"{prefix}layer1.0.conv3.") for k in keys)
    depths = {(2, 2, 2, 2, False): "resnet18", (3, 4, 6, 3, False): "resnet34", (3, 4, 6, 3, True): "resnet50",
              (3, 4, 23, 3, True): "resnet101", (3, 8, 36, 3, True): "resnet152"}
    name = depths.get((*blocks, bottleneck))
    if name is None:
        raise CheckpointError(f"backbone with {blocks} blocks per stage ({'bottleneck' if bottleneck else 'basic'}) "
                              f"is not a ResNet omniseg builds")
    return name


def convert_torchvision(sd: dict[str, torch.Tensor], source: Path) -> Conversion:
    """torchvision's `MaskRCNN` with a ResNet-FPN backbone (`maskrcnn_resnet50_fpn` and the same layout for
    other depths). The network is omniseg's `maskrcnn` (whose detector is torchvision's RPN and RoIHeads)
    with torchvision's pooling: MultiScaleRoIAlign is not aligned (omniseg's preset is, as detectron2)."""
    if any(k.startswith("roi_heads.box_head.0.") for k in sd):
        raise CheckpointError(f"{source}: torchvision's maskrcnn_resnet50_fpn_v2 layout (convolutional box head "
                              f"with normalisation) is not supported; the v1 layout (two-fc box head) is")
    needed = ("backbone.body.conv1.weight", "backbone.fpn.inner_blocks.0.0.weight",
              "roi_heads.box_predictor.cls_score.weight", "roi_heads.mask_predictor.mask_fcn_logits.weight")
    absent = [k for k in needed if k not in sd]
    if absent:
        raise CheckpointError(f"{source}: not a torchvision Mask R-CNN state dict (no {', '.join(absent)})")
    backbone = _resnet_depth(sd, "backbone.body.")
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
                 "model.roi.aligned=false", f"model.roi.mask_convs={mask_convs}", f"model.roi.mask_head_dim={mask_dim}",
                 f"model.roi.box_head_dim={box_dim}"]
    return Conversion(out, overrides, num_classes, ignored)


CONVERTERS = {"torchvision": convert_torchvision}


def torchvision_coco_classes() -> list[str]:
    """The 90 COCO categories of torchvision's detection weights, in their label order (ids 1..90, with the
    "N/A" gaps of the COCO id space kept so that label i is COCO category i), from torchvision's own metadata."""
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    return list(MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"][1:])


def class_list(spec: str | None, num_classes: int, source: str):
    """DatasetMeta for `--classes`: `coco` (torchvision's label order), a file with one name per line, or
    None (class_0 ...); the count must be the checkpoint's."""
    from omniseg.data.meta import DatasetMeta

    if spec is None:
        names, ids = [f"class_{i}" for i in range(num_classes)], None
    elif spec == "coco":
        names = torchvision_coco_classes()
        ids = list(range(1, len(names) + 1))  # torchvision's labels are the COCO category ids
    else:
        path = Path(spec)
        if not path.is_file():
            raise CheckpointError(f"--classes {spec}: neither 'coco' nor a file of class names")
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        ids = None
    if len(names) != num_classes:
        raise CheckpointError(f"{source}: the checkpoint has {num_classes} classes but --classes gives {len(names)}")
    return DatasetMeta(classes=names, isthing=[True] * num_classes, dataset_ids=ids, name=spec or "converted")


def convert(source: str | os.PathLike, fmt: str, preset: str, output: str | os.PathLike, *,
            classes: str | None = None, allow_missing: bool = False, overrides=()) -> dict:
    """Convert `source` (format `fmt`) for `preset` and write `output` (.safetensors); returns the report
    {"mapped", "ignored", "unmapped", "missing", "overrides"}. Unmapped or missing tensors are an error
    naming them unless `allow_missing`."""
    from omniseg.config import load_config, to_yaml
    from omniseg.engine.checkpoint import save_weights
    from omniseg.hub import load_state_dict_file
    from omniseg.models.registry import build_model_from_config

    if fmt not in CONVERTERS:
        raise CheckpointError(f"--from {fmt}: choose from {', '.join(CONVERTERS)}")
    source = Path(source)
    conversion = CONVERTERS[fmt](load_state_dict_file(source), source)
    cfg = load_config(preset, [*conversion.overrides, *overrides])
    meta = class_list(classes, conversion.num_classes, str(source))
    model = build_model_from_config(cfg, meta, with_backbone_weights=False)
    own = model.state_dict()
    unmapped = sorted(k for k in conversion.state_dict if k not in own)
    missing = sorted(k for k in own if k not in conversion.state_dict)
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in conversion.state_dict.items()
             if k in own and own[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{source}: {len(wrong)} tensors do not fit {preset}: {', '.join(wrong[:5])}")
    if (unmapped or missing) and not allow_missing:
        raise CheckpointError(f"{source}: {len(unmapped)} checkpoint tensors unmapped ({', '.join(unmapped[:8])}) and "
                              f"{len(missing)} model tensors missing ({', '.join(missing[:8])}); --allow-missing "
                              f"writes the file anyway")
    model.load_state_dict({k: v for k, v in conversion.state_dict.items() if k in own}, strict=False)
    save_weights(output, model, config_yaml=to_yaml(cfg), meta=meta.to_dict(),
                 info={"converted_from": str(source), "format": fmt})
    return {"mapped": len(conversion.state_dict) - len(unmapped), "ignored": conversion.ignored,
            "unmapped": unmapped, "missing": missing, "overrides": conversion.overrides}
