"""Multi-scale backbones from timm with one output convention: {"res2".."res5"} NCHW feature maps.

Pretrained weights are never downloaded: pass `weights=` a local file (timm / torchvision / HF-style
state dict in safetensors or a weights-only torch file); `hub.load_state_dict_file` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
from timm.models.swin_transformer import SwinTransformerBlock, window_partition, window_reverse
from torch import nn
from torch.nn import functional as F

FEATURE_NAMES = ("res2", "res3", "res4", "res5")

# Short names users type -> timm model names.
TIMM_NAMES = {
    "resnet18": "resnet18",
    "resnet34": "resnet34",
    "resnet50": "resnet50",
    "resnet101": "resnet101",
    "swin_t": "swin_tiny_patch4_window7_224",
    "swin_s": "swin_small_patch4_window7_224",
    "swin_b": "swin_base_patch4_window12_384",
    "swin_l": "swin_large_patch4_window12_384",
}


@dataclass(frozen=True)
class FeatureSpec:
    channels: int
    stride: int


class TimmBackbone(nn.Module):
    """A timm model in features_only mode, exposing res2..res5 (strides 4..32) as NCHW tensors.

    `norm="frozen_bn"` freezes BatchNorm statistics and affine parameters, as detectron2 does for
    ImageNet-initialised ResNets; `norm="bn"` trains them (use for from-scratch training).
    Swin uses the original pad-then-shift windows (as detectron2 / HF), so published Swin
    Mask2Former weights give the published outputs at any input size.
    `out_norms=True` (default for Swin) adds a LayerNorm on every returned level (`out_norms.res2` ...): detectron2's and
    HF's Swin backbones have them, timm's features_only Swin does not.
    """

    def __init__(self, name: str, *, norm: str = "bn", weights: str | None = None, drop_path_rate: float = 0.0,
                 out_norms: bool | None = None, **timm_kwargs):
        super().__init__()
        timm_name = TIMM_NAMES.get(name, name)
        kwargs = dict(pretrained=False, features_only=True, out_indices=(0, 1, 2, 3) if "swin" in timm_name else (1, 2, 3, 4))
        is_swin = "swin" in timm_name
        if is_swin:
            kwargs["strict_img_size"] = False  # any padded input size, not only the pre-training size
            kwargs["always_partition"] = True  # keep the configured window at every input size
            out_norms = True if out_norms is None else out_norms  # detectron2/HF Swin normalise every output
        if drop_path_rate:
            kwargs["drop_path_rate"] = drop_path_rate
        kwargs.update(timm_kwargs)
        self.body = timm.create_model(timm_name, **kwargs)
        # How to rebuild the whole (non-features_only) model, for timm's checkpoint conversion.
        self.timm_kwargs = {k: v for k, v in kwargs.items() if k not in ("features_only", "out_indices")}
        if is_swin:
            use_original_swin_windows(self.body)
        self.timm_name = timm_name
        info = self.body.feature_info
        self._channels_last_output = "swin" in timm_name  # timm Swin returns NHWC
        self.specs = {n: FeatureSpec(c, r) for n, c, r in zip(FEATURE_NAMES, info.channels(), info.reduction())}
        self.out_norms = None
        if out_norms:
            self.out_norms = nn.ModuleDict({n: nn.LayerNorm(s.channels) for n, s in self.specs.items()})
        if weights:
            from omniseg.hub import load_backbone_weights

            load_backbone_weights(self, weights)
        if norm == "frozen_bn":
            from timm.layers import freeze_batch_norm_2d

            self.body = freeze_batch_norm_2d(self.body)
        elif norm != "bn":
            raise ValueError(f"backbone norm must be 'bn' or 'frozen_bn', got {norm!r}")

    @property
    def size_divisibility(self) -> int:
        return 32

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.body(x)
        if self.out_norms is not None:  # LayerNorm over channels: apply channels-last
            if not self._channels_last_output:
                feats = [f.permute(0, 2, 3, 1) for f in feats]
            feats = [self.out_norms[n](f) for n, f in zip(FEATURE_NAMES, feats)]
            feats = [f.permute(0, 3, 1, 2) for f in feats]
        elif self._channels_last_output:
            feats = [f.permute(0, 3, 1, 2) for f in feats]
        return dict(zip(FEATURE_NAMES, feats))


def build_backbone(name: str, **kwargs) -> nn.Module:
    """timm ResNet / Swin (TimmBackbone) or, for `vit*` names, a plain ViT with a multi-level neck
    (segvit.vit.ViTFeaturePyramid); both return {"res2".."res5"} and carry `specs`."""
    if name.startswith("vit"):
        from omniseg.models.segvit.vit import ViTFeaturePyramid

        return ViTFeaturePyramid(name, **kwargs)
    return TimmBackbone(name, **kwargs)


# -- Swin window semantics -----------------------------------------------------------------------

def _original_swin_attn(self, x: torch.Tensor) -> torch.Tensor:
    """Window attention with the original Swin order: pad to whole windows, THEN cyclic-shift, with
    the shift mask computed on the padded map. timm 1.0 shifts first and pads after, which gives
    different windows (and a misplaced mask) whenever a stage size is not a multiple of the window."""
    b, h, w, c = x.shape
    win_h, win_w = self.window_size
    pad_h = (win_h - h % win_h) % win_h
    pad_w = (win_w - w % win_w) % win_w
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    _, hp, wp, _ = x.shape
    has_shift = any(self.shift_size)
    if has_shift:
        x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
    windows = window_partition(x, self.window_size).view(-1, self.window_area, c)
    mask = self.get_attn_mask(x) if has_shift else None  # regions relative to the padded size
    windows = self.attn(windows, mask=mask)
    x = window_reverse(windows.view(-1, win_h, win_w, c), self.window_size, hp, wp)
    if has_shift:
        x = torch.roll(x, shifts=self.shift_size, dims=(1, 2))
    return x[:, :h, :w, :].contiguous()


class OriginalWindowSwinBlock(SwinTransformerBlock):
    """timm's Swin block with the original pad-then-shift window attention."""

    _attn = _original_swin_attn


def use_original_swin_windows(body: nn.Module) -> nn.Module:
    """Make every timm SwinTransformerBlock in `body` pad-then-shift like the original Swin /
    detectron2 / HF (see `_original_swin_attn`); the shift mask is built per input size. In place."""
    for module in body.modules():
        if type(module) is SwinTransformerBlock:
            module.__class__ = OriginalWindowSwinBlock
    return body
