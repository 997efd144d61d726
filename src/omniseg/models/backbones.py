"""Multi-scale backbones from timm with one output convention: {"res2".."res5"} NCHW feature maps.

Pretrained weights are never downloaded: pass `weights=` a local file (timm / torchvision / HF-style
state dict in safetensors or a weights-only torch file); `hub.load_state_dict_file` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import timm
import torch
from timm.models.swin_transformer import SwinTransformerBlock
from torch import nn
from torch.nn import functional as F

from omniseg.models.layers.eager import eager_cached
from omniseg.models.layers.features import FEATURE_NAMES, FeatureSpec

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


class TimmBackbone(nn.Module):
    """A timm model in features_only mode, exposing res2..res5 (strides 4..32) as NCHW tensors.

    `norm="frozen_bn"` freezes BatchNorm statistics and affine parameters, as detectron2 does for
    ImageNet-initialised ResNets; `norm="bn"` trains them (use for from-scratch training).
    Swin uses the original pad-then-shift windows (as detectron2 / HF), so published Swin
    Mask2Former weights give the published outputs at any input size.
    `stride_in_1x1=True` (set through `model.backbone_kwargs`) gives a bottleneck ResNet the MSRA / caffe2 layout
    of detectron2's model-zoo and Detectron's ImageNet weights: the downsampling stride in the first 1x1 conv.
    `out_norms=True` (default for Swin) adds a LayerNorm on every returned level (`out_norms.res2` ...): detectron2's and
    HF's Swin backbones have them, timm's features_only Swin does not.
    """

    def __init__(self, name: str, *, norm: str = "bn", weights: str | None = None, drop_path_rate: float = 0.0,
                 freeze_at: int = 0, out_norms: bool | None = None, stride_in_1x1: bool = False, **timm_kwargs):
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
        if stride_in_1x1:
            move_stride_to_1x1(self.body)
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
        self.freeze_stages(freeze_at)

    def freeze_stages(self, freeze_at: int) -> None:
        """detectron2's BACKBONE.FREEZE_AT on a timm ResNet: 1 freezes the stem, 2 also res2 (`layer1`), ...
        Frozen parameters get no gradient and the frozen stages' BatchNorm layers become FrozenBatchNorm2d,
        so their statistics stop moving too, as detectron2's `freeze()` does."""
        if freeze_at <= 0:
            return
        body = self.body
        stem = [n for n, _ in body.named_children() if n in ("conv1", "bn1")]
        if not stem:
            raise ValueError(f"model.backbone_freeze_at applies to ResNet backbones (stem conv1/bn1 + layer1..4), "
                             f"not {self.timm_name}")
        from timm.layers import freeze_batch_norm_2d

        for name in stem + [f"layer{i}" for i in range(1, freeze_at) if hasattr(body, f"layer{i}")]:
            frozen = freeze_batch_norm_2d(getattr(body, name))
            frozen.requires_grad_(False)
            setattr(body, name, frozen)

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


def move_stride_to_1x1(body: nn.Module) -> nn.Module:
    """Moves the stride of each stage's first bottleneck from its 3x3 conv (torchvision / timm) to its first
    1x1 conv (MSRA / caffe2 ResNets: detectron2 STRIDE_IN_1X1, Detectron STRIDE_1X1). Same parameters, other
    outputs: a checkpoint trained one way needs its own layout. Basic blocks have no 1x1 and are left as they are.
    In place."""
    for stage in ("layer2", "layer3", "layer4"):
        block = getattr(body, stage)[0]
        if not hasattr(block, "conv3"):
            continue
        block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)
    return body


def build_backbone(name: str, **kwargs) -> nn.Module:
    """timm ResNet / Swin (TimmBackbone), for `vit*` names a plain ViT with a multi-level neck
    (segvit.vit.ViTFeaturePyramid), or `wider_resnet38` (per_pixel.wider_resnet); all return {"res2".."res5"}
    (WideResNet-38 also its stride-1/2 levels res0/res1) and carry `specs`."""
    if name == "wider_resnet38":  # Gated-SCNN's trunk: {"res0".."res5"}, output stride 8
        from omniseg.models.per_pixel.wider_resnet import WiderResNet38

        return WiderResNet38(**kwargs)
    if name.startswith("vit"):
        from omniseg.models.segvit.vit import ViTFeaturePyramid

        if kwargs.pop("freeze_at", 0):
            raise ValueError("model.backbone_freeze_at applies to ResNet backbones, not ViT")
        return ViTFeaturePyramid(name, **kwargs)
    return TimmBackbone(name, **kwargs)


# -- Swin window semantics -----------------------------------------------------------------------

@dataclass(frozen=True)
class _WindowLayout:
    """Where the tokens of a (h, w) map go in Swin's windows, pad-then-shift (original Swin order).

    Window order: windows row-major, tokens row-major inside a window, on the padded, cyclically shifted
    map. `gather` [num_windows * N] is each slot's token index in the row-major (h, w) map (0 for a
    padding slot, which `padding` [P] lists, or flags as a bool mask [num_windows * N] in the traced layout);
    `scatter` [h * w] is each token's slot."""

    gather: torch.Tensor
    padding: torch.Tensor
    scatter: torch.Tensor
    num_windows: int
    padded: tuple[int, int]


_LAYOUTS: dict[tuple, _WindowLayout] = {}  # index tensors per (size, window, shift, device), eager calls only


def _window_layout(h: int, w: int, window: tuple[int, int], shift: tuple[int, int], x: torch.Tensor) -> _WindowLayout:
    """The layout's index tensors on x's device, made from cached numpy arrays (so never traced). They
    are kept for later calls only when `x` is a plain eager tensor: nothing made while tracing (fake
    tensors) is kept, and eager calls on a GPU do not copy the indices to the device again. Symbolic
    sizes (an export with dynamic sizes) get the same layout computed in the graph (`_traced_window_layout`)."""
    if isinstance(h, torch.SymInt) or isinstance(w, torch.SymInt):
        return _traced_window_layout(h, w, window, shift, x.device)

    def make() -> _WindowLayout:
        gather, padding, scatter, num_windows, padded = _window_indices(h, w, window, shift)
        return _WindowLayout(*(torch.as_tensor(a, device=x.device) for a in (gather, padding, scatter)),
                             num_windows, padded)

    return eager_cached(_LAYOUTS, lambda: (h, w, window, shift, str(x.device)), x, make, limit=64)


def _traced_window_layout(h, w, window: tuple[int, int], shift: tuple[int, int], device) -> _WindowLayout:
    """`_window_indices` in torch operations on (possibly symbolic) sizes, with no data-dependent shapes:
    `padding` is a bool mask over the slots (True = padding) instead of their indices, and each token's
    slot is computed in closed form: the slot of map row r is (r - shift) mod padded height."""
    (win_h, win_w), (shift_h, shift_w) = window, shift
    hp, wp = h + (win_h - h % win_h) % win_h, w + (win_w - w % win_w) % win_w
    windows_w = wp // win_w
    on_shifted = lambda count, win: torch.arange(count, device=device).view(-1, 1) * win + torch.arange(win, device=device)
    rows = ((on_shifted(hp // win_h, win_h) + shift_h) % hp)[:, None, :, None]  # [wi, 1, ti, 1]
    cols = ((on_shifted(windows_w, win_w) + shift_w) % wp)[None, :, None, :]  # [1, wj, 1, tj]
    real = (rows < h) & (cols < w)
    gather = torch.where(real, rows * w + cols, 0).reshape(-1)
    r = (torch.arange(h, device=device) - shift_h) % hp
    c = (torch.arange(w, device=device) - shift_w) % wp
    scatter = (((r // win_h)[:, None] * windows_w + (c // win_w)[None, :]) * (win_h * win_w)
               + (r % win_h)[:, None] * win_w + (c % win_w)[None, :]).reshape(-1)
    return _WindowLayout(gather, ~real.reshape(-1), scatter, (hp // win_h) * windows_w, (hp, wp))


def _batched(index: torch.Tensor, batch: int, stride: int) -> torch.Tensor:
    """Row indices of one image -> the same rows of each of `batch` images laid `stride` rows apart."""
    if batch == 1:
        return index
    return (index + torch.arange(batch, device=index.device)[:, None] * stride).flatten()


@lru_cache(maxsize=64)
def _window_indices(h: int, w: int, window: tuple[int, int], shift: tuple[int, int]):
    win_h, win_w = window
    hp, wp = h + (win_h - h % win_h) % win_h, w + (win_w - w % win_w) % win_w
    # slot (window row, window col, row in window, col in window) -> coordinates on the shifted map
    wi, wj, ti, tj = np.meshgrid(np.arange(hp // win_h), np.arange(wp // win_w), np.arange(win_h),
                                 np.arange(win_w), indexing="ij")
    rows = ((wi * win_h + ti + shift[0]) % hp).reshape(-1)  # torch.roll(x, -shift) reads x[(i + shift) % size]
    cols = ((wj * win_w + tj + shift[1]) % wp).reshape(-1)
    real = (rows < h) & (cols < w)
    gather = np.where(real, rows * w + cols, 0)
    scatter = np.empty(h * w, dtype=np.int64)
    scatter[gather[real]] = np.flatnonzero(real)
    padding = np.flatnonzero(~real)  # (shared by every call: only read)
    return gather.astype(np.int64), padding.astype(np.int64), scatter, (hp // win_h) * (wp // win_w), (hp, wp)


def _original_swin_attn(self, x: torch.Tensor) -> torch.Tensor:
    """Window attention with the original Swin order: pad to whole windows, THEN cyclic-shift, with
    the shift mask computed on the padded map. timm 1.0 shifts first and pads after, which gives
    different windows (and a misplaced mask) whenever a stage size is not a multiple of the window.

    The same computation arranged for speed: q/k/v are projected on the real tokens only (a padding
    token is zero after norm1, so its q/k/v are the projection's bias), one row gather replaces
    pad + roll + window partition, one more replaces window reverse + crop + roll, the output
    projection runs on the real tokens only, and the relative-position bias plus shift mask are
    formed once per input size and reused while the bias table is unchanged and not being trained.
    """
    b, h, w, c = x.shape
    attn = self.attn
    layout = _window_layout(h, w, tuple(self.window_size), tuple(self.shift_size), x)
    slots = layout.gather.numel()
    qkv = F.linear(x.reshape(b * h * w, c), attn.qkv.weight, attn.qkv.bias)
    windows = qkv.index_select(0, _batched(layout.gather, b, h * w))
    if layout.padding.dtype == torch.bool:  # traced layout: a padding mask over the slots
        bias = attn.qkv.bias if attn.qkv.bias is not None else qkv.new_zeros(3 * c)
        windows = torch.where(layout.padding.repeat(b)[:, None], bias.to(windows.dtype), windows)
    elif len(layout.padding):
        padding = _batched(layout.padding, b, slots)
        bias = attn.qkv.bias if attn.qkv.bias is not None else qkv.new_zeros(3 * c)
        windows.index_copy_(0, padding, bias.to(windows.dtype).expand(padding.numel(), -1))
    heads, area = attn.num_heads, self.window_area
    q, k, v = windows.view(b * layout.num_windows, area, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=_attention_bias(self, layout, b).to(q.dtype),
                                         dropout_p=attn.attn_drop.p if self.training else 0.0, scale=attn.scale)
    out = out.transpose(1, 2).reshape(b * slots, c)
    out = attn.proj_drop(attn.proj(out.index_select(0, _batched(layout.scatter, b, slots))))
    return out.view(b, h, w, c)


def _attention_bias(block, layout: _WindowLayout, batch: int) -> torch.Tensor:
    """Relative-position bias + shift mask: [batch * num_windows, heads, N, N], or [1, heads, N, N] for
    every window when unshifted; cached on the block while the bias table is unchanged (same storage
    and version) and needs no gradient."""
    table = block.attn.relative_position_bias_table

    def make() -> torch.Tensor:
        bias = block.attn._get_rel_pos_bias()  # [1, heads, N, N]
        if any(block.shift_size):  # the shift mask (0 / -100) of the padded map, per window
            if isinstance(layout.padded[0], torch.SymInt) or isinstance(layout.padded[1], torch.SymInt):
                mask = _traced_shift_mask(layout.padded, tuple(block.window_size), tuple(block.shift_size),
                                          table.device, table.dtype)
            else:
                shape = (1, *layout.padded, 1)
                mask = block.get_attn_mask(torch.empty(shape, device=table.device, dtype=table.dtype))
            bias = bias + mask[:, None]
            if batch > 1:
                bias = bias.repeat(batch, 1, 1, 1)
        return bias.contiguous()

    if torch.is_grad_enabled() and table.requires_grad:
        return make()
    def key():  # the table's storage and version: a new key whenever the weights change
        return layout.padded, batch, table.data_ptr(), table._version, table.dtype, str(table.device)

    return eager_cached(block.__dict__.setdefault("_attention_bias_cache", {}), key, table, make, limit=1)


def _traced_shift_mask(padded, window: tuple[int, int], shift: tuple[int, int], device, dtype) -> torch.Tensor:
    """timm's `get_attn_mask` for (symbolic) padded sizes, without its negative-index slices (which a saved
    dynamic-size program cannot load): each position of the padded, shifted map is in one of 3 x 3 regions
    (before the last window, in it before the shift, in the shift), and two tokens of a window whose
    regions differ get -100. [num_windows, N, N]."""
    def regions(size, win, step):
        i = torch.arange(size // win, device=device).view(-1, 1) * win + torch.arange(win, device=device)
        return (i >= size - win).long() + (i >= size - step).long()  # [windows along the axis, win]

    rows, cols = regions(padded[0], window[0], shift[0]), regions(padded[1], window[1], shift[1])
    label = (rows[:, None, :, None] * 3 + cols[None, :, None, :]).reshape(-1, window[0] * window[1])
    differs = label[:, None, :] != label[:, :, None]
    return torch.zeros(differs.shape, device=device, dtype=dtype).masked_fill(differs, -100.0)


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
