"""Gated-SCNN's official `.pth` (nv-tlabs/GSCNN) -> refused, naming what omniseg's `gscnn` lacks.

The only released model (`best_cityscapes_checkpoint.pth`, Cityscapes) is `network.gscnn.GSCNN`, which
always builds a WideResNet-38-A2 trunk (`mod1`..`mod7`, in-place-ABN style pre-activation blocks),
whatever `--trunk` says: the official code has no ResNet variant whose head and shape-stream tensors
could be mapped alone. omniseg's `gscnn` is built on a ResNet and its head is laid out differently, so
the checkpoint is identified and refused with the missing components listed, instead of being loaded
into a network that would compute something else.
"""

from __future__ import annotations

from pathlib import Path

from omniseg.hub import load_state_dict_file
from omniseg.hub.converters import Conversion
from omniseg.hub.errors import CheckpointError

_HEAD_KEYS = ("gate1._gate_conv.1.weight", "aspp.edge_conv.0.weight", "bot_aspp.weight", "final_seg.0.weight")
_WIDE_RESNET_KEYS = tuple(f"mod{i}." for i in range(1, 8))


def _strip_data_parallel(sd: dict) -> dict:
    """The official training wraps the network in DataParallel: every name starts with `module.`."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


def convert(source: Path, preset=None) -> Conversion:
    sd = _strip_data_parallel(load_state_dict_file(source))
    absent = [k for k in _HEAD_KEYS if k not in sd]
    if absent:
        raise CheckpointError(f"{source}: not a Gated-SCNN checkpoint of the official code (no {', '.join(absent)})")
    trunk = sorted({k.split(".")[0] for k in sd if k.startswith(_WIDE_RESNET_KEYS)})
    num_classes = int(sd["final_seg.6.weight"].shape[0]) if "final_seg.6.weight" in sd else None
    if trunk:
        raise CheckpointError(
            f"{source}: the official Gated-SCNN ({num_classes} classes) runs on a WideResNet-38-A2 backbone "
            f"({', '.join(trunk)}), which omniseg does not have: omniseg's gscnn is built on a ResNet. Converting it "
            f"needs the WideResNet-38 backbone (pre-activation identity-residual blocks, dilated mod4..mod7, "
            f"4096-channel output) and the official head layout: shape stream on the stride-1 mod1 features "
            f"(res1/d1/gate1..3, side outputs dsn3/dsn4/dsn7), ASPP concatenating image pooling, edge and branches "
            f"in that order, a 1x1 bot_fine without normalisation, and final_seg ending in a bias-free 1x1 conv")
    raise CheckpointError(f"{source}: a Gated-SCNN checkpoint without the WideResNet-38 trunk (mod1..mod7); the "
                          f"official network has no other backbone, so this layout is not one omniseg knows")
