"""WideResNet-38-A2 (Wu, Shen, van den Hengel 2016, "Wider or Deeper"), the trunk of the released
Gated-SCNN, dilated to output stride 8 as Gated-SCNN runs it.

Pre-activation ("identity mapping") residual blocks: BN -> ReLU feeds both the residual convolutions and,
when the width or stride changes, a 1x1 projection shortcut; otherwise the shortcut is the block's raw
input. Modules `mod1` (a single 3x3 conv, stride 1) .. `mod7`, with 3x3/2 max pooling before mod2 and mod3
and a strided first block in mod4; mod5 is dilated 2, mod6 and mod7 dilated 4. Module and parameter
names follow the released layout (`modN.blockM.bn1.0`, `convs.conv1`, `proj_conv`, ...) so checkpoints
map by name.

Outputs, in omniseg's naming by stride: `res0` = mod1 (stride 1, 64 ch), `res1` = mod2 (stride 2, 128),
`res2` = mod3 (stride 4, 256), `res3` = mod4 (stride 8, 512), `res4` = mod6 (stride 8, 2048), `res5` =
mod7 (stride 8, 4096). Gated-SCNN reads res0 (shape stream), res1 (decoder), res2/res3/res5 (gates).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from omniseg.models.layers.features import FeatureSpec

# Per module mod2..mod7: number of blocks, block widths (two: 3x3-3x3 block; three: 1x1-3x3-1x1 bottleneck),
# dilation, stride of the first block, dropout before the last conv (training only).
WRN38_MODULES = (
    (3, (128, 128), 1, 1, 0.0),
    (3, (256, 256), 1, 1, 0.0),
    (6, (512, 512), 1, 2, 0.0),
    (3, (512, 1024), 2, 1, 0.0),
    (1, (512, 1024, 2048), 4, 1, 0.3),
    (1, (1024, 2048, 4096), 4, 1, 0.5),
)
OUTPUT_LEVELS = {"res0": "mod1", "res1": "mod2", "res2": "mod3", "res3": "mod4", "res4": "mod6", "res5": "mod7"}


def bn_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


class PreActBlock(nn.Module):
    """BN -> ReLU -> convolutions, plus the shortcut: the raw input, or a 1x1 (strided) projection of the
    pre-activated input where the width or resolution changes."""

    def __init__(self, in_channels: int, widths: tuple[int, ...], stride: int = 1, dilation: int = 1,
                 dropout: float = 0.0):
        super().__init__()
        if len(widths) not in (2, 3):
            raise ValueError(f"a pre-activation block has two or three widths, got {widths}")
        self.bn1 = bn_relu(in_channels)
        if len(widths) == 2:
            layers = [("conv1", nn.Conv2d(in_channels, widths[0], 3, stride, dilation, dilation, bias=False)),
                      ("bn2", bn_relu(widths[0])),
                      ("conv2", nn.Conv2d(widths[0], widths[1], 3, 1, dilation, dilation, bias=False))]
        else:
            layers = [("conv1", nn.Conv2d(in_channels, widths[0], 1, stride, bias=False)),
                      ("bn2", bn_relu(widths[0])),
                      ("conv2", nn.Conv2d(widths[0], widths[1], 3, 1, dilation, dilation, bias=False)),
                      ("bn3", bn_relu(widths[1])),
                      ("conv3", nn.Conv2d(widths[1], widths[2], 1, bias=False))]
        if dropout:
            layers.insert(len(layers) - 1, ("dropout", nn.Dropout2d(dropout)))
        self.convs = nn.Sequential(OrderedDict(layers))
        self.proj_conv = (nn.Conv2d(in_channels, widths[-1], 1, stride, bias=False)
                          if stride != 1 or in_channels != widths[-1] else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.bn1(x)
        shortcut = x if self.proj_conv is None else self.proj_conv(activated)
        return self.convs(activated) + shortcut


class WiderResNet38(nn.Module):
    """WideResNet-38-A2 at output stride 8 returning {res0..res5} (see the module doc) with `specs`."""

    def __init__(self, *, norm: str = "bn", weights: str | None = None, output_stride: int = 8,
                 freeze_at: int = 0, drop_path_rate: float = 0.0):
        super().__init__()
        if output_stride != 8:
            raise ValueError(f"wider_resnet38 is the dilated, output stride 8 trunk of Gated-SCNN; "
                             f"model.output_stride={output_stride} is not available")
        if weights or freeze_at or drop_path_rate:
            raise ValueError("wider_resnet38 takes no backbone_weights, backbone_freeze_at or drop_path_rate: "
                             "its weights come with a converted Gated-SCNN checkpoint (omniseg convert --from gscnn)")
        self.mod1 = nn.Sequential(OrderedDict([("conv1", nn.Conv2d(3, 64, 3, padding=1, bias=False))]))
        self.pool2 = nn.MaxPool2d(3, stride=2, padding=1)
        self.pool3 = nn.MaxPool2d(3, stride=2, padding=1)
        channels, stride = 64, 1
        self.specs = {"res0": FeatureSpec(64, 1)}
        for index, (blocks, widths, dilation, first_stride, dropout) in enumerate(WRN38_MODULES):
            module = nn.Sequential(OrderedDict(
                (f"block{b + 1}", PreActBlock(channels if b == 0 else widths[-1], widths,
                                              first_stride if b == 0 else 1, dilation, dropout))
                for b in range(blocks)))
            self.add_module(f"mod{index + 2}", module)
            channels = widths[-1]
            stride *= first_stride * (2 if index < 2 else 1)  # pool2 / pool3 precede mod2 / mod3
            for level, name in OUTPUT_LEVELS.items():
                if name == f"mod{index + 2}":
                    self.specs[level] = FeatureSpec(channels, stride)
        if norm == "frozen_bn":
            from timm.layers import freeze_batch_norm_2d

            for name in [f"mod{i}" for i in range(2, 8)]:
                setattr(self, name, freeze_batch_norm_2d(getattr(self, name)))
        elif norm != "bn":
            raise ValueError(f"backbone norm must be 'bn' or 'frozen_bn', got {norm!r}")

    @property
    def size_divisibility(self) -> int:
        return 8

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        m1 = self.mod1(x)
        m2 = self.mod2(self.pool2(m1))
        m3 = self.mod3(self.pool3(m2))
        m4 = self.mod4(m3)
        m6 = self.mod6(self.mod5(m4))
        return {"res0": m1, "res1": m2, "res2": m3, "res3": m4, "res4": m6, "res5": self.mod7(m6)}
