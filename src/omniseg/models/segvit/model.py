"""SegViT / SegViT v2: a plain ViT (optionally Shrunk or Shrunk++) with ATM decoders, and the
class-incremental (continual) setting.

Classes are split into contiguous groups, one per learning step (`model.continual.steps`, e.g. [6, 5];
one group of all classes when not continual). Each step has its own ATM decoder with its own class
tokens and class head; the prediction concatenates the steps' per-class scores. At step t > 0 with
`continual.freeze` (SegViT's recipe), the encoder, QU and every earlier decoder are frozen (no gradient,
kept in eval mode) and only decoder t trains; with `freeze: false` everything trains (plain
fine-tuning, the forgetting baseline). Either way only the current step's classes are labelled: the
others are negatives, so earlier decoders, if trained, learn their classes as absent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from omniseg.models.base import Segmenter, class_weight_tensor, label_map_from_targets, semantic_results
from omniseg.models.segvit.atm import ATMDecoder, atm_losses, semantic_scores
from omniseg.models.segvit.family import ContinualSettings, SegViTSettings
from omniseg.models.segvit.vit import GridQueryUpsample, PlainViT, QueryUpsample, edge_patch_targets



def class_steps(continual: ContinualSettings, num_classes: int) -> tuple[list[int], int]:
    """(class counts per step, current step) from model.continual; one step of all classes by default."""
    steps = [int(s) for s in (continual.steps or [num_classes])]
    if sum(steps) != num_classes or any(s < 1 for s in steps):
        raise ValueError(f"model.continual.steps {steps} must be positive and sum to the {num_classes} classes")
    step = int(continual.step if continual.step is not None else len(steps) - 1)
    if not 0 <= step < len(steps):
        raise ValueError(f"model.continual.step {step} outside the {len(steps)} steps {steps}")
    return steps, step


class SegViT(Segmenter):
    """ViT encoder -> (Shrunk: QU) -> one ATM decoder per learning step -> per-class scores.

    Args:
        settings: the `model` section (SegViTSettings, or a mapping checked against it).
        num_classes: K over all steps.
        thing_ids: kept for the contract (semantic only).
    """

    settings_class = SegViTSettings
    tasks = ("semantic",)
    raw_output_names = ("sem_seg",)
    semantic_scores_are_probabilities = True  # ATM: class probability x mask probability per class token

    def __init__(self, settings: SegViTSettings | Mapping, num_classes: int, thing_ids: Sequence[int] = ()):
        super().__init__(settings, num_classes, thing_ids)
        s = self.settings
        self.ignore_index = 255
        self.shrink = s.shrink
        if s.backbone_freeze_at:
            raise ValueError("model.backbone_freeze_at applies to ResNet backbones; SegViT's continual recipe "
                             "freezes the ViT itself (model.continual.freeze)")
        self.backbone = PlainViT(s.backbone, out_indices=tuple(s.vit_out_indices), shrink=self.shrink,
                                 qd_index=s.qd_index, tau=s.edge_tau, weights=s.backbone_weights,
                                 drop_path_rate=s.drop_path_rate, **dict(s.backbone_kwargs or {}))
        enc_dim = self.backbone.embed_dim
        dim = s.hidden_dim or enc_dim // 2
        heads = s.nheads or max(1, dim // 64)
        self.qu = None
        stages = len(self.backbone.out_indices)
        use_proj = True
        self.qu_mode = s.qu_mode
        self.qu_grid_pad = bool(s.qu_grid_pad)
        self.upsample_mask_logits = bool(s.upsample_mask_logits)
        if self.shrink and self.qu_mode == "grid":
            self.qu = GridQueryUpsample(enc_dim, dim, heads, s.qu_grid, s.qu_layers, 2, s.dropout)
            stages, in_dim, use_proj = 1, dim, False
        elif self.shrink:
            self.qu = QueryUpsample(enc_dim, dim, heads, s.qu_layers, s.dropout)
            stages, in_dim = 1, dim
        else:
            in_dim = enc_dim
        self.steps, self.step = class_steps(s.continual, num_classes)
        self.offsets = [sum(self.steps[:i]) for i in range(len(self.steps))]
        self.decoders = nn.ModuleList(
            ATMDecoder(in_dim, k, dim=dim, heads=heads, stages=stages, layers_per_stage=s.dec_layers,
                       dropout=s.dropout, use_proj=use_proj)
            for k in self.steps[: self.step + 1])
        self.freeze_old = s.continual.freeze and self.step > 0
        loss = s.loss
        self.loss_weights = {"class_weight": loss.class_weight, "focal_weight": loss.focal_weight,
                             "dice_weight": loss.dice_weight, "eos_coef": loss.eos_coef}
        self.edge_weight = loss.edge_weight
        self.register_buffer("class_weights", class_weight_tensor(loss.class_weights, num_classes), persistent=False)
        if self.freeze_old:
            for module in self.frozen_modules():
                module.requires_grad_(False)
        if s.activation_checkpointing:
            self.set_activation_checkpointing(True)

    @property
    def seen_classes(self) -> int:
        """Classes the model predicts: those of steps 0..step."""
        return sum(self.steps[: self.step + 1])

    def frozen_modules(self) -> list[nn.Module]:
        """What SegViT's continual recipe freezes at step t > 0: encoder, QU and the earlier decoders."""
        if not self.freeze_old:
            return []
        return [m for m in (self.backbone, self.qu) if m is not None] + list(self.decoders[: self.step])

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.frozen_modules():  # frozen parts keep eval behaviour (no dropout / drop-path)
            module.eval()
        return self

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute the ViT blocks in backward."""
        self.backbone.body.set_grad_checkpointing(enabled)

    # -- network -------------------------------------------------------------------------------
    def fit_query_grid(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """qu_mode grid: normalised images -> (images at the learned query grid's size, the patch grid of the
        input within it). Each learned query stands for one patch of the training crop, so an input larger
        than the crop has no queries for its extra patches and is refused; a smaller one (a sliding window
        over a smaller image, a small training crop) is padded at the bottom / right with black pixels, as
        batches and crops are padded, and its masks are cropped back to its own patches."""
        patch = self.backbone.patch_size
        side = self.qu.grid * patch
        height, width = int(x.shape[-2]), int(x.shape[-1])
        grid = (-(-height // patch), -(-width // patch))
        if (height, width) == (side, side):
            return x, grid
        if height > side or width > side or not self.qu_grid_pad:
            stride = side * 2 // 3
            raise ValueError(
                f"{self.describe()}: model.qu_mode=grid learns {self.qu.grid}x{self.qu.grid} query-upsampling "
                f"queries, one per {patch} px patch of the {side}x{side} px training crop (model.qu_grid), but the "
                f"input is {height}x{width} px"
                + ("" if height > side or width > side else " and model.qu_grid_pad is false") +
                f". Predict images of other sizes by sliding {side} px windows, as the official model is "
                f"evaluated: inference.mode=slide inference.crop_size={side} inference.stride={stride} "
                f"(--slide {side},{stride})")
        canvas = (-self.pixel_mean / self.pixel_std).to(x.dtype).expand(x.shape[0], -1, side, side).clone()
        canvas[..., :height, :width] = x
        return canvas, grid

    def decoder_inputs(self, x: torch.Tensor):
        """Normalised images -> (decoder features deepest first, their paddings, grid, encoder output)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_old):
            enc = self.backbone(x)
            grid = enc.grid
            if self.qu is not None and self.qu_mode == "grid":
                feats, pads = [self.qu([enc.hi_res, enc.deep], [None, enc.deep_padding])], [None]
                grid = (self.qu.grid, self.qu.grid)
            elif self.qu is not None:
                feats, pads = [self.qu(enc.hi_res, enc.deep, enc.deep_padding)], [None]
            else:
                feats, pads = list(reversed(enc.taps)), [None] * len(enc.taps)
        return feats, pads, grid, enc

    def network(self, x: torch.Tensor) -> tuple[list[list[dict]], object]:
        """Normalised images -> (per step, the ATM outputs of its decoder; the encoder output)."""
        own_grid = None
        if self.qu is not None and self.qu_mode == "grid":
            x, own_grid = self.fit_query_grid(x)
        feats, pads, grid, enc = self.decoder_inputs(x)
        outs = []
        for t, decoder in enumerate(self.decoders):
            trains = torch.is_grad_enabled() and (t == self.step or not self.freeze_old)
            with torch.set_grad_enabled(trains):
                outs.append(decoder(feats, grid, pads))
        if own_grid is not None and own_grid != tuple(grid):  # a padded input: its own patches only
            h, w = own_grid
            outs = [[{**o, "pred_masks": o["pred_masks"][..., :h, :w]} for o in out] for out in outs]
        return outs, enc

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images -> per-class scores [B, seen classes, h, w] at the patch grid (at the input
        size with `upsample_mask_logits`, the mask logits being resized before the sigmoid)."""
        outs, _ = self.network(x)
        scores = []
        for o in outs:
            masks = o[-1]["pred_masks"]
            if self.upsample_mask_logits:
                masks = F.interpolate(masks, size=x.shape[-2:], mode="bilinear", align_corners=False)
            scores.append(semantic_scores(o[-1]["pred_logits"], masks))
        return torch.cat(scores, dim=1)

    def forward_raw(self, x: torch.Tensor) -> dict:
        """Normalised images [B,3,H,W] -> {"sem_seg": per-class scores [B, seen classes, H, W]}."""
        return {"sem_seg": F.interpolate(self.scores(x), size=x.shape[-2:], mode="bilinear", align_corners=False)}

    def export_refusal(self) -> str | None:
        if self.shrink == "shrunkpp":
            return (f"{self.describe()} with Shrunk++ cannot be exported yet: its edge-aware query downsampling "
                    f"keeps an image-dependent number of tokens, which the exported graph would have to fix")
        return super().export_refusal()

    # -- training ------------------------------------------------------------------------------
    def current_targets(self, targets: Sequence[dict]) -> list[dict]:
        """Only the current step's classes are labelled; other classes' masks are dropped."""
        lo, hi = self.offsets[self.step], self.offsets[self.step] + self.steps[self.step]
        out = []
        for t in targets:
            keep = (t["labels"] >= lo) & (t["labels"] < hi)
            out.append({**t, "labels": t["labels"][keep], "masks": t["masks"][keep]})
        return out

    def losses(self, images: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        """images: uint8 [B,3,Hp,Wp]; targets: the engine's semantic targets (one mask per class)."""
        outs, enc = self.network(self.normalize(images))
        current = self.current_targets(targets)
        losses: dict[str, torch.Tensor] = {}
        with torch.autocast(images.device.type, enabled=False):
            for t, out in enumerate(outs):
                if self.freeze_old and t != self.step:
                    continue
                prefix = "" if len(outs) == 1 else f"step{t}_"
                step_weights = None if self.class_weights is None else \
                    self.class_weights[self.offsets[t]:self.offsets[t] + self.steps[t]]
                for k, v in atm_losses(out, current, self.steps[t], label_offset=self.offsets[t],
                                       class_weights=step_weights, **self.loss_weights).items():
                    losses[prefix + k] = v
            if enc.edge_logits is not None and not self.freeze_old:
                labels = label_map_from_targets(targets, tuple(images.shape[-2:]), self.ignore_index)
                edge_gt = edge_patch_targets(labels, self.backbone.patch_size, enc.grid, self.ignore_index)
                losses["loss_edge"] = self.edge_weight * F.cross_entropy(
                    enc.edge_logits.float().flatten(0, 1), edge_gt.flatten(), ignore_index=self.ignore_index)
        return losses

    # -- inference -----------------------------------------------------------------------------
    def infer(self, images: torch.Tensor, image_sizes: list[tuple[int, int]], output_sizes: list[tuple[int, int]],
              tasks: list[str], *, return_raw: bool = False, semantic_scores: bool = False) -> list[dict]:
        """Labels are global class ids of the steps learnt so far."""
        scores = self.scores(self.normalize(images))
        scores = F.interpolate(scores, size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False)
        return semantic_results(scores, image_sizes, output_sizes, tasks, return_raw, semantic_scores)
