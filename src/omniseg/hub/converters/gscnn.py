"""Gated-SCNN's official `.pth` (nv-tlabs/GSCNN) -> omniseg's `gscnn` on `wider_resnet38`.

The only released model (`best_cityscapes_checkpoint.pth`, Cityscapes) is `network.gscnn.GSCNN`: a
WideResNet-38-A2 trunk at output stride 8 (`mod1`..`mod7`, named as omniseg's `wider_resnet38`), a shape
stream on the stride-1 `mod1` map (`res1`..`res3` blocks, `d1`..`d3` 1x1 convs, `gate1`..`gate3` gated convs
fed by the `dsn3`/`dsn4`/`dsn7` side outputs of mod3/mod4/mod7, `fuse`), the edge fusion `cw` and an ASPP
decoder reading mod2. The settings in which it differs from the ResNet preset are set from the checkpoint
(`model.shape_level`, `shape_stem`, `shape_gate_levels`, `gscnn_fine_level`, `gscnn_fine_norm`,
`gscnn_classifier_bias`, `canny_input`). Three differences are pure re-orderings or scalings of the inputs of
a linear layer and are folded into its weights instead:
- the ASPP concatenates [image pooling, edge, 1x1, three atrous] where omniseg concatenates [1x1, three
  atrous, image pooling, edge]: `bot_aspp`'s input channels are permuted;
- the decoder concatenates [fine, upsampled ASPP] where omniseg has [upsampled ASPP, fine]: `final_seg.0`'s
  input channels are permuted;
- the official Canny map is 0/255 (OpenCV's), omniseg's 0/1: `cw`'s Canny input weight is multiplied by 255.
"""

from __future__ import annotations

from pathlib import Path

import torch

from omniseg.hub import load_state_dict_file
from omniseg.hub.converters import Conversion
from omniseg.hub.errors import CheckpointError

_HEAD_KEYS = ("gate1._gate_conv.1.weight", "aspp.edge_conv.0.weight", "bot_aspp.weight", "final_seg.0.weight")
_WIDE_RESNET_KEYS = tuple(f"mod{i}." for i in range(1, 8))
_CANNY_SCALE = 255.0  # cv2.Canny marks edges 255; omniseg's canny marks them 1

# Official name prefix -> omniseg name prefix (parameters below them keep their names).
_RENAMES = {
    "dsn3.": "shape_stream.sides.0.", "dsn4.": "shape_stream.sides.1.", "dsn7.": "shape_stream.sides.2.",
    "d1.": "shape_stream.reduce.0.", "d2.": "shape_stream.reduce.1.", "d3.": "shape_stream.reduce.2.",
    "fuse.": "shape_stream.head.",
    "aspp.img_conv.": "head.aspp.image_pool.", "aspp.edge_conv.": "head.edge_embed.",
    "bot_fine.weight": "head.fine.0.weight",
    "final_seg.1.": "head.fuse.0.1.", "final_seg.3.": "head.fuse.1.0.", "final_seg.4.": "head.fuse.1.1.",
    "final_seg.6.weight": "head.classifier.1.weight",
}
_IGNORED = {"dsn1.weight": "side output of mod1 that the official forward never reads",
            "dsn1.bias": "side output of mod1 that the official forward never reads"}


def _strip_data_parallel(sd: dict) -> dict:
    """The official training wraps the network in DataParallel: every name starts with `module.`."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _rename(key: str) -> str | None:
    """Official name -> omniseg name; None for names outside the released layout."""
    if key.startswith(_WIDE_RESNET_KEYS):
        return f"backbone.{key}"
    for block in (1, 2, 3):
        res, gate = f"res{block}.", f"gate{block}."
        if key.startswith(res):  # ResNet basic block: conv1/bn1, conv2/bn2 -> ConvNormAct / conv+BN pairs
            layer, _, param = key[len(res):].partition(".")
            slots = {"conv1": "conv1.0", "bn1": "conv1.1", "conv2": "conv2.0", "bn2": "conv2.1"}
            return f"shape_stream.blocks.{block - 1}.{slots[layer]}.{param}" if layer in slots else None
        if key.startswith(gate):
            rest = key[len(gate):]
            if rest == "weight":
                return f"shape_stream.gates.{block - 1}.conv.weight"
            if rest.startswith("_gate_conv."):
                return f"shape_stream.gates.{block - 1}.gate.{rest[len('_gate_conv.'):]}"
            return None
    if key.startswith("aspp.features."):
        branch, _, rest = key[len("aspp.features."):].partition(".")
        return f"head.aspp.branches.{branch}.{rest}"
    for old, new in _RENAMES.items():
        if key == old or (old.endswith(".") and key.startswith(old)):
            return new + key[len(old):]
    return None


def _fold_concatenation_orders(sd: dict, out: dict, width: int) -> None:
    """bot_aspp, final_seg.0 and cw with their inputs in omniseg's order and scale (see the module doc)."""
    project = sd["bot_aspp.weight"]
    groups = project.split(width, dim=1)  # image pooling, edge, 1x1, atrous x3
    if len(groups) != 6 or any(g.shape[1] != width for g in groups):
        raise CheckpointError(f"bot_aspp.weight {tuple(project.shape)}: expected 6 x {width} input channels "
                              f"(image pooling, edge, 1x1 and three atrous branches)")
    out["head.aspp.project.weight"] = torch.cat([*groups[2:], groups[0], groups[1]], dim=1).contiguous()
    fuse = sd["final_seg.0.weight"]
    fine = sd["bot_fine.weight"].shape[0]
    out["head.fuse.0.0.weight"] = torch.cat([fuse[:, fine:], fuse[:, :fine]], dim=1).contiguous()
    edge_fusion = sd["cw.weight"].clone()
    edge_fusion[:, 1] *= _CANNY_SCALE
    out["edge_fusion.fuse.weight"] = edge_fusion


def trunk_width(sd: dict) -> int:
    """Output channels of the trunk's last block (4096 for WideResNet-38)."""
    last = sd.get("mod7.block1.convs.conv3.weight")
    return int(last.shape[0]) if last is not None else 0


def convert(source: Path, preset=None) -> Conversion:
    sd = _strip_data_parallel(load_state_dict_file(source))
    absent = [k for k in _HEAD_KEYS if k not in sd]
    if absent:
        raise CheckpointError(f"{source}: not a Gated-SCNN checkpoint of the official code (no {', '.join(absent)})")
    if not any(k.startswith(_WIDE_RESNET_KEYS) for k in sd):
        raise CheckpointError(f"{source}: a Gated-SCNN checkpoint without the WideResNet-38 trunk (mod1..mod7); the "
                              f"official network has no other backbone, so this layout is not one omniseg knows")
    blocks = [len({k.split(".")[1] for k in sd if k.startswith(f"mod{i}.block")}) for i in range(2, 8)]
    if blocks != [3, 3, 6, 3, 1, 1] or trunk_width(sd) != 4096:
        raise CheckpointError(f"{source}: the trunk has ({', '.join(map(str, blocks))}) blocks in mod2..mod7 and "
                              f"{trunk_width(sd)} output channels; omniseg's wider_resnet38 is WideResNet-38-A2 "
                              f"(3, 3, 6, 3, 1, 1 blocks, 4096 output channels)")
    width = int(sd["bot_aspp.weight"].shape[0])
    num_classes = int(sd["final_seg.6.weight"].shape[0])
    out, ignored, unknown = {}, {}, []
    folded = ("bot_aspp.weight", "final_seg.0.weight", "cw.weight")
    for key, value in sd.items():
        if key in _IGNORED:
            ignored[key] = _IGNORED[key]
        elif key not in folded:
            name = _rename(key)
            if name is None:
                unknown.append(key)
            else:
                out[name] = value
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} tensors outside the released Gated-SCNN layout: "
                              f"{', '.join(sorted(unknown)[:8])}")
    _fold_concatenation_orders(sd, out, width)
    overrides = [
        "model.arch=gscnn", "model.backbone=wider_resnet38", "model.backbone_norm=bn", "model.output_stride=8",
        "model.stage_dilations=null", "model.neck=null", f"model.head_width={width}", "model.aspp_rates=[12,24,36]",
        f"model.shape_width={int(sd['res1.conv1.weight'].shape[0])}", "model.shape_level=res0",
        "model.shape_stem=false", "model.shape_gate_levels=[res2,res3,res5]", "model.gscnn_fine_level=res1",
        "model.gscnn_fine_norm=false", "model.gscnn_classifier_bias=false", "model.dropout=0.0",
        "model.canny_input=normalized_uint8", "model.canny_thresholds=[10.0,100.0]",
        "model.pixel_mean=[123.675,116.28,103.53]", "model.pixel_std=[58.395,57.12,57.375]",
    ]
    return Conversion(out, overrides, num_classes, ignored)
