"""The released PyTorch PANet (ShuLiu1993/PANet, on Detectron.pytorch) -> omniseg's `panet`: refused, naming why.

The released COCO models (e2e_panet_R-50-FPN_1x_det, _1x_det_2fc, _2x_mask) differ from omniseg's PANet in
structure, not only in names: GroupNorm after every FPN, bottom-up-path and head conv (FPN.USE_GN), a box head of a
per-level conv + 3 convs + 1 fc (roi_Xconv1fc_gn_head_panet) where omniseg has per-level fc6 + fc7, a mask head
with GroupNorm, and Detectron's geometry (boxes with +1 widths, rounded legacy anchors, unaligned RoIAlign). A
checkpoint whose weights would need those layers is refused with the components it has that omniseg lacks,
rather than converted into a network that computes something else.
"""

from __future__ import annotations

from pathlib import Path

from omniseg.hub import load_state_dict_file
from omniseg.hub.converters import Conversion
from omniseg.hub.errors import CheckpointError


def _differences(keys: set[str]) -> list[str]:
    """The components of a Detectron.pytorch PANet checkpoint that omniseg's `panet` does not have."""
    found = []
    gn_fpn = any(k.startswith(("Conv_Body.posthoc_modules.", "Conv_Body.panet_buttomup_conv1_modules.",
                               "Conv_Body.conv_top.")) and ".1.weight" in k for k in keys)
    if gn_fpn:
        found.append("GroupNorm in the FPN and bottom-up path (FPN.USE_GN; omniseg's have no norm)")
    if any(k.startswith("Box_Head.conv1_head.") for k in keys):
        found.append("a convolutional box head with GroupNorm (per-level conv + 3 convs + fc, "
                     "roi_Xconv1fc_gn_head_panet; omniseg's is per-level fc6 + fc7)")
    if any(k.startswith("Mask_Head.") and (".1.weight" in k) for k in keys):
        found.append("GroupNorm in the mask head (mask_rcnn_fcn_head_v1upXconvs_gn_adp_ff; omniseg's has no norm)")
    if not any(k.startswith("Mask_Head.") for k in keys):
        found.append("no mask head (a Faster R-CNN detection model; omniseg's panet segments instances)")
    found.append("Detectron's box geometry (+1 box widths, rounded legacy anchors, unaligned RoIAlign)")
    return found


def convert(source: Path, preset=None) -> Conversion:
    sd = load_state_dict_file(source)
    keys = set(sd)
    if not any(k.startswith("Conv_Body.") for k in keys) or not any(k.startswith("Box_Head.") for k in keys):
        raise CheckpointError(f"{source}: not a PANet (Detectron.pytorch) checkpoint: no Conv_Body.* / Box_Head.* "
                              f"tensors")
    raise CheckpointError(f"{source}: the released PANet differs from omniseg's panet in structure: "
                          + "; ".join(_differences(keys)) + ". omniseg does not convert it")
