"""Converters of released checkpoint layouts into omniseg state dicts, one module per source format.

Each module has `convert(source: Path, preset: DictConfig) -> Conversion`: it reads the checkpoint safely
(`omniseg.hub.load_state_dict_file`), derives from the tensors the settings in which the checkpoint
differs from the preset (backbone variant and depth, widths, classes), and renames every tensor.
`omniseg.hub.convert.convert` builds the model, checks that nothing is unmapped or missing, and writes the file.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch

from omniseg.hub.errors import CheckpointError

# --from name -> (module, what it reads); the CLI's help lists these.
SOURCES = {
    "detectron2": ("detectron2", "Mask2Former / MaskFormer / MP-Former .pkl (ResNet, Swin); Mask R-CNN .pkl"),
    "oneformer": ("oneformer", "OneFormer's official .pth (ResNet, Swin)"),
    "adelaidet": ("adelaidet", "AdelaiDet BlendMask .pth (R-50/101, RT)"),
    "mmseg": ("mmseg", "MMSegmentation .pth: PSPNet, DANet, FastFCN (JPU), UPerNet-ViT"),
    "segvit": ("segvit", "SegViT / SegViT v2 official .pth (ViT + ATM)"),
    "gscnn": ("gscnn", "Gated-SCNN's official .pth"),
    "panet": ("panet", "the released PyTorch PANet .pth"),
    "torchvision": ("torchvision", "torchvision Mask R-CNN .pth"),
    "hf": ("hf", "an HF transformers folder (Mask2Former, MaskFormer, OneFormer)"),
}


@dataclass
class Conversion:
    """What a converter made.

    state_dict: omniseg tensor names -> tensors. overrides: `a.b=c` settings applied over the preset
    (the config follows the checkpoint). num_classes: the checkpoint's K. ignored: checkpoint tensors
    deliberately left out, with the reason. model: a whole `model` section replacing the preset's (HF
    folders, whose config.json describes the network). meta: classes the checkpoint itself names.
    """

    state_dict: dict[str, torch.Tensor]
    overrides: list[str]
    num_classes: int
    ignored: dict[str, str] = field(default_factory=dict)
    model: dict | None = None
    meta: object | None = None


def load_converter(fmt: str):
    """The `convert` function of source format `fmt`."""
    if fmt not in SOURCES:
        raise CheckpointError(f"--from {fmt}: choose from {', '.join(SOURCES)}")
    module = importlib.import_module(f"omniseg.hub.converters.{SOURCES[fmt][0]}")
    return module.convert


def resnet_depth(keys, prefix: str, *, stage: str = "layer{}", first: int = 1, conv3: str | None = None) -> str:
    """resnet18/34/50/101/152 from the number of blocks per stage and the block type in a ResNet's keys.

    `stage` names the stages (`layer{}` 1..4 for torchvision/timm/mmseg, `res{}` 2..5 for detectron2 with
    first=2); `conv3` is the key of the first block's third conv (bottleneck test)."""
    depth_of = len(prefix.split("."))
    names = [prefix + stage.format(first + i) + "." for i in range(4)]
    blocks = [len({k.split(".")[depth_of] for k in keys if k.startswith(n)}) for n in names]
    bottleneck = any(k.startswith(names[0] + "0." + (conv3 or "conv3") + ".") for k in keys)
    depths = {(2, 2, 2, 2, False): "resnet18", (3, 4, 6, 3, False): "resnet34", (3, 4, 6, 3, True): "resnet50",
              (3, 4, 23, 3, True): "resnet101", (3, 8, 36, 3, True): "resnet152"}
    name = depths.get((*blocks, bottleneck))
    if name is None:
        raise CheckpointError(f"backbone with {blocks} blocks per stage ({'bottleneck' if bottleneck else 'basic'}) "
                              f"is not a ResNet omniseg builds")
    return name
