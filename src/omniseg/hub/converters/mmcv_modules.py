"""MMCV module layouts shared by the MMSeg converters (`mmseg`, `mmseg_vit`): ConvModule's
child names, and MMSeg's auxiliary FCNHead."""

from __future__ import annotations

import torch

AUX_WEIGHT = 0.4  # every MMSeg config trains its auxiliary FCN head at 0.4


class Renamed(dict):
    """omniseg name -> tensor, remembering which checkpoint tensors were used: the rest keep their names
    and reach the unmapped-tensor check."""

    def __init__(self):
        super().__init__()
        self.used: set[str] = set()

    def put(self, source_key: str, target: str, value: torch.Tensor) -> None:
        self.used.add(source_key)
        self[target] = value


def conv_module_child(name: str) -> str:
    """MMCV ConvModule children (`conv`, `bn`) -> ConvNormAct's (`0`, `1`)."""
    return name.replace("conv.", "0.", 1) if name.startswith("conv.") else name.replace("bn.", "1.", 1)


def auxiliary_fcn_head(sd: dict, out: Renamed, ignored: dict, level: str = "res4") -> list[str]:
    """MMSeg's auxiliary FCNHead (one conv; on res4, on the last level for UPerNet-ViT) -> omniseg's aux head,
    trained at MMSeg's weight."""
    aux = {k[len("auxiliary_head."):]: v for k, v in sd.items() if k.startswith("auxiliary_head.")}
    if not aux:
        return []
    convs = {k.split(".")[1] for k in aux if k.startswith("convs.")}
    if convs != {"0"} or any(k.startswith("conv_cat.") for k in aux) or "conv_seg.weight" not in aux:
        for key in aux:
            ignored["auxiliary_head." + key] = "auxiliary head (training only) of a shape omniseg's FCN head lacks"
        return []
    for key, value in aux.items():
        if key.startswith("convs.0."):
            out.put("auxiliary_head." + key, "aux_head.conv." + conv_module_child(key[len("convs.0."):]), value)
        elif key.startswith("conv_seg."):
            out.put("auxiliary_head." + key, "aux_head.classifier.1." + key[len("conv_seg."):], value)
    return [f"model.loss.aux_weight={AUX_WEIGHT}", f"model.aux_width={int(aux['convs.0.conv.weight'].shape[0])}",
            f"model.aux_level={level}"]
