"""Mask2Former's pixel decoder: a multi-scale deformable-attention encoder over res3-res5 plus an
FPN-style step up to the 1/4 mask features.

Module names follow detectron2 closely (`input_proj`, `transformer`, `adapter_1`, `layer_1`,
`mask_features`) so checkpoints convert with plain renames.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from torch.nn import functional as F

from omniseg.models.backbones import FeatureSpec
from omniseg.models.layers.conv import ConvNormAct
from omniseg.models.layers.checkpointing import run_block
from omniseg.models.layers.ms_deform_attn import MSDeformAttn, size_tensor
from omniseg.models.layers.position_encoding import PositionEmbeddingSine


class MSDeformAttnEncoderLayer(nn.Module):
    """Post-norm: deformable self-attention -> add & norm -> FFN (ReLU) -> add & norm."""

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float, n_levels: int, n_heads: int,
                 n_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None,
                pixel_reference=None):
        attended = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask,
                                  pixel_reference)
        src = self.norm1(src + self.dropout1(attended))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class MSDeformAttnEncoder(nn.Module):
    """Encoder-only deformable transformer over flattened multi-level maps (no padding mask: the
    padded input is attended like detectron2 does)."""

    def __init__(self, d_model: int, num_layers: int, n_heads: int, dim_feedforward: int, n_levels: int,
                 n_points: int, dropout: float):
        super().__init__()
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model))
        self.layers = nn.ModuleList(
            MSDeformAttnEncoderLayer(d_model, dim_feedforward, dropout, n_levels, n_heads, n_points)
            for _ in range(num_layers))
        self.activation_checkpointing = False  # set by the model (model.activation_checkpointing)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Official order: Xavier on every matrix, then the deformable-attention init, then level_embed ~ N(0, 1).
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)

    @staticmethod
    def reference_points(shapes: list[tuple[int, int]], batch: int, device, dtype) -> torch.Tensor:
        """Pixel centres ((i + 0.5) / size) of every level, repeated for every level: [B, L, levels, 2] (x, y)."""
        points = []
        for h, w in shapes:
            # (arange + 0.5) is linspace(0.5, size - 0.5, size) exactly, and stays symbolic in dynamic-size export
            ref_y, ref_x = torch.meshgrid((torch.arange(h, dtype=dtype, device=device) + 0.5) / h,
                                          (torch.arange(w, dtype=dtype, device=device) + 0.5) / w,
                                          indexing="ij")
            points.append(torch.stack((ref_x.reshape(-1), ref_y.reshape(-1)), -1))
        ref = torch.cat(points, 0)
        return ref[None, :, None, :].expand(batch, -1, len(shapes), -1)

    def forward(self, srcs: list[torch.Tensor], pos_embeds: list[torch.Tensor]):
        """srcs / pos_embeds: per level [B, C, h, w] -> (memory [B, sum(h*w), C], shapes list, level_start_index)."""
        shapes = [(s.shape[2], s.shape[3]) for s in srcs]
        src_flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pos_flat = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
                              for lvl, p in enumerate(pos_embeds)], 1)
        sizes = size_tensor([h * w for h, w in shapes], torch.int64, src_flat.device)
        level_start_index = torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))
        reference_points = self.reference_points(shapes, src_flat.shape[0], src_flat.device, src_flat.dtype)
        # the same in pixels, laid out for every layer's sampling-offset GEMM (computed once)
        pixel_reference = self.layers[0].self_attn.pixel_reference(reference_points, shapes) if self.layers else None
        out = src_flat
        for layer in self.layers:
            out = run_block(layer, out, pos_flat, reference_points, shapes, level_start_index, None, pixel_reference,
                            enabled=self.activation_checkpointing)
        return out, shapes, level_start_index


def _c2_xavier_fill(module: nn.Conv2d) -> None:
    """detectron2's `c2_xavier_fill`: kaiming_uniform(a=1), zero bias."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


class MSDeformAttnPixelDecoder(nn.Module):
    """res3-res5 -> 1x1 conv + GN -> deformable encoder; res2 (and any other finer level down to
    `common_stride`) is added FPN-style to give the mask features.

    Under fp16 autocast it runs in fp32, as the official implementation does (deformable attention's
    sums overflow fp16's range). bf16 has fp32's exponent range, so bf16 autocast (AMX on CPUs) runs
    through it; the benchmark checks the result against fp32 eager.
    """

    def __init__(self, input_specs: dict[str, FeatureSpec], *, conv_dim: int = 256, mask_dim: int = 256,
                 num_encoder_layers: int = 6, num_heads: int = 8, dim_feedforward: int = 1024, num_points: int = 4,
                 in_features=("res3", "res4", "res5"), common_stride: int = 4, dropout: float = 0.0):
        super().__init__()
        specs = dict(sorted(input_specs.items(), key=lambda kv: kv[1].stride))
        missing = [f for f in in_features if f not in specs]
        if missing:
            raise ValueError(f"pixel decoder needs backbone features {missing}; backbone gives {list(specs)}")
        self.in_features = list(specs)  # all levels, fine to coarse
        self.transformer_in_features = sorted(in_features, key=lambda f: specs[f].stride)
        self.num_levels = len(self.transformer_in_features)
        self.conv_dim = conv_dim
        self.mask_dim = mask_dim
        self.maskformer_num_feature_levels = 3  # levels handed to the transformer decoder

        # coarse to fine (res5 first), as the official code orders them
        self.input_proj = nn.ModuleList(
            ConvNormAct(specs[f].channels, conv_dim, 1, bias=True, activation=False, norm="gn")
            for f in self.transformer_in_features[::-1])
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)

        self.transformer = MSDeformAttnEncoder(conv_dim, num_encoder_layers, num_heads, dim_feedforward,
                                               self.num_levels, num_points, dropout)
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)

        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=1)
        _c2_xavier_fill(self.mask_features)

        min_stride = min(specs[f].stride for f in self.transformer_in_features)
        self.common_stride = common_stride
        self.num_fpn_levels = int(math.log2(min_stride) - math.log2(common_stride))
        lateral, output = [], []
        for idx, name in enumerate(self.in_features[: self.num_fpn_levels]):
            lateral_conv = ConvNormAct(specs[name].channels, conv_dim, 1, bias=False, activation=False, norm="gn")
            output_conv = ConvNormAct(conv_dim, conv_dim, 3, bias=False, activation=True, norm="gn")
            _c2_xavier_fill(lateral_conv[0])
            _c2_xavier_fill(output_conv[0])
            self.add_module(f"adapter_{idx + 1}", lateral_conv)
            self.add_module(f"layer_{idx + 1}", output_conv)
            lateral.append(lateral_conv)
            output.append(output_conv)
        # plain lists (not registered twice): applied from low to high resolution
        self._lateral_convs = lateral[::-1]
        self._output_convs = output[::-1]
        self.activation_checkpointing = False  # set by the model (model.activation_checkpointing)

    def _fpn_level(self, idx: int, feature: torch.Tensor, coarser: torch.Tensor) -> torch.Tensor:
        """One FPN step: lateral(feature) + coarser upsampled, then the 3x3 output conv."""
        lateral = self._lateral_convs[idx](feature)
        y = lateral + F.interpolate(coarser, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
        return self._output_convs[idx](y)

    def forward(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-> (mask_features [B, mask_dim, H/4, W/4], [1/32, 1/16, 1/8] maps [B, conv_dim, h, w])."""
        device_type = next(iter(features.values())).device.type
        fp16 = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.float16
        if fp16:
            features = {name: f.float() for name, f in features.items()}
        with torch.autocast(device_type=device_type, enabled=False) if fp16 else contextlib.nullcontext():
            srcs, pos = [], []
            for idx, name in enumerate(self.transformer_in_features[::-1]):
                x = features[name]
                srcs.append(self.input_proj[idx](x))
                pos.append(self.pe_layer(x))
            memory, shapes, _ = self.transformer(srcs, pos)
            b = memory.shape[0]
            outs = [z.transpose(1, 2).reshape(b, -1, h, w)
                    for z, (h, w) in zip(memory.split([h * w for h, w in shapes], dim=1), shapes)]
            for idx, name in enumerate(self.in_features[: self.num_fpn_levels][::-1]):
                # at 1/4 resolution its activations are the pixel decoder's largest: recomputed when checkpointing
                outs.append(run_block(self._fpn_level, idx, features[name], outs[-1],
                                      enabled=self.activation_checkpointing))
            multi_scale_features = outs[: self.maskformer_num_feature_levels]
            return self.mask_features(outs[-1]), multi_scale_features
