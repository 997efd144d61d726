"""MP-Former's mask-piloted training (arXiv 2303.07336) as a training-only add-on to Mask2Former.

During training, extra "MP" queries are placed in front of Mask2Former's learnable queries:

* one per GT segment and group, whose content is a learnable embedding of the GT class
  (label-guided; with probability `label_noise` the embedded class is a random one, the class
  target stays the clean label), with zero positional embedding;
* whose cross-attention masks are the GT masks (area-downsampled to each level, blocked where the
  coverage is 0) instead of their own previous predictions, in every piloted layer, optionally
  corrupted by point noise (XOR flips, about `point_noise` x the mask's area per layer) and by
  shift / scale noise;
* hidden from the matching queries and from the other groups in self-attention, so the matching
  queries compute exactly what Mask2Former computes;
* supervised directly against their own GT at every layer (no Hungarian matching).

Nothing here runs at inference: `MaskFormer.predict` never touches this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from omniseg.masks import boxes_from_masks
from omniseg.models.layers.point_sampling import Generators
from omniseg.models.maskformer.criterion import SetCriterion, count_num_masks
from omniseg.models.maskformer.masked_decoder import MultiScaleMaskedTransformerDecoder
from omniseg.models.mp_former.settings import PilotSettings

__all__ = ["PilotSettings", "MaskPilot"]


@dataclass
class PilotedOutputs:
    """What a piloted decoder pass returns."""

    matching: dict  # the Mask2Former outputs of the learnable queries (same format as the decoder's)
    piloted: list[dict]  # per prediction set (initial queries, then after each layer): MP queries' outputs
    indices: list[tuple[torch.Tensor, torch.Tensor]]  # per image (slot index, GT index), fixed
    num_slots: int  # P = groups x largest GT count in the batch


@dataclass
class PilotedQueries:
    """The MP queries of one batch, in the form the decoder's `extra` argument takes (`ExtraQueries`)."""

    pilot: "MaskPilot"
    targets: Sequence[dict]
    max_num: int
    content: torch.Tensor  # [B, P, C] label embeddings
    pos: torch.Tensor  # [B, P, C] zeros: MP queries carry no positional query
    self_attn_blocked: torch.Tensor  # [P+Q, P+Q]
    coverage: dict = field(default_factory=dict)  # level size -> GT coverage, resized once per level

    def attention_mask(self, layer: int, size: tuple[int, int]) -> torch.Tensor | None:
        """GT masks (noised afresh) as the MP rows' cross-attention mask, or None past `piloted_layers`."""
        if not self.content.shape[1] or not self.pilot.is_piloted(layer):
            return None
        if size not in self.coverage:
            self.coverage[size] = self.pilot.gt_coverage(self.targets, self.max_num, size)
        return self.pilot.piloted_blocked(self.coverage[size])


class MaskPilot(nn.Module):
    """Builds MP queries and their attention masks, runs a piloted decoder pass, and computes MP losses."""

    def __init__(self, num_classes: int, hidden_dim: int, settings: PilotSettings | None = None):
        super().__init__()
        self.num_classes = num_classes
        self.settings = settings or PilotSettings()
        self.label_enc = nn.Embedding(num_classes, hidden_dim)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, {self.settings}"

    # ------------------------------------------------------------------ queries
    def noisy_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Each label replaced with probability `label_noise` by a uniform random class (may coincide)."""
        p = self.settings.label_noise
        if p <= 0 or labels.numel() == 0:
            return labels
        flip = torch.rand(labels.shape, device=labels.device) < p
        random_classes = torch.randint(0, self.num_classes, labels.shape, device=labels.device)
        return torch.where(flip, random_classes, labels)

    def slot_layout(self, targets: Sequence[dict]) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Slot g * max_num + j of image b holds GT j of that image (official layout).
        -> (max_num, per image (slot indices, GT indices))."""
        max_num = max((len(t["labels"]) for t in targets), default=0)
        indices = []
        for t in targets:
            n = len(t["labels"])
            gt = torch.arange(n, dtype=torch.int64)
            slots = torch.cat([g * max_num + gt for g in range(self.settings.groups)]) if n else gt
            indices.append((slots, gt.repeat(self.settings.groups)))
        return max_num, indices

    def query_content(self, targets: Sequence[dict], max_num: int) -> torch.Tensor:
        """[B, P, C]: label embeddings of the (noised) GT classes, zero in empty slots."""
        groups = self.settings.groups
        weight = self.label_enc.weight
        content = weight.new_zeros((len(targets), groups, max_num, weight.shape[1]))
        for b, t in enumerate(targets):
            n = len(t["labels"])
            if n == 0:
                continue
            labels = t["labels"].to(weight.device).unsqueeze(0).expand(groups, n)
            content[b, :, :n] = self.label_enc(self.noisy_labels(labels))
        return content.flatten(1, 2)

    # ------------------------------------------------------------------ attention masks
    @staticmethod
    def gt_coverage(targets: Sequence[dict], max_num: int, size: tuple[int, int]) -> torch.Tensor:
        """[B, max_num, h, w] fraction of each level cell covered by each GT mask (area interpolation);
        empty slots are 0."""
        device = next((t["masks"].device for t in targets), torch.device("cpu"))
        out = torch.zeros((len(targets), max_num, *size), device=device)
        for b, t in enumerate(targets):
            if len(t["labels"]):
                out[b, : len(t["labels"])] = F.interpolate(t["masks"][None].float(), size=size, mode="area")[0]
        return out

    def shift_scale(self, coverage: torch.Tensor) -> torch.Tensor:
        """Shift / scale noise on [B, N, h, w] coverage maps: each mask moved by U(-1,1) x shift_noise x
        half its box size, and with probability 0.5 enlarged by (1 + scale_noise) about its box centre."""
        s = self.settings
        if (s.shift_noise <= 0 and s.scale_noise <= 0) or coverage.numel() == 0:
            return coverage
        b, n, h, w = coverage.shape
        flat = coverage.reshape(b * n, 1, h, w)
        boxes = boxes_from_masks(flat[:, 0] > 1e-8)  # pixel xyxy
        scale_px = torch.tensor([2.0 / w, 2.0 / h, 2.0 / w, 2.0 / h], device=flat.device)
        nb = boxes * scale_px - 1.0  # normalised [-1, 1] xyxy
        centre = torch.stack([(nb[:, 0] + nb[:, 2]) / 2, (nb[:, 1] + nb[:, 3]) / 2], dim=1)
        half = torch.stack([(nb[:, 2] - nb[:, 0]) / 2, (nb[:, 3] - nb[:, 1]) / 2], dim=1)
        shift = (torch.rand_like(centre) * 2 - 1) * s.shift_noise * half
        enlarge = torch.rand(b * n, device=flat.device) < 0.5
        factor = torch.where(enlarge, 1.0 + s.scale_noise, 1.0).to(flat.dtype)
        # output(x) = input(c + (x - c - shift) / factor): theta maps output to input coordinates.
        theta = torch.zeros((b * n, 2, 3), device=flat.device, dtype=flat.dtype)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / factor
        theta[:, :, 2] = centre - (centre + shift) / factor[:, None]
        grid = F.affine_grid(theta, list(flat.shape), align_corners=False)
        moved = F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return moved.reshape(b, n, h, w)

    def point_noise(self, allowed: torch.Tensor) -> torch.Tensor:
        """XOR-flip every cell of each [.., h, w] mask with probability point_noise x area / (h w), so
        about point_noise x area cells flip; redrawn on every call (every layer and iteration)."""
        ns = self.settings.point_noise
        if ns <= 0 or allowed.numel() == 0:
            return allowed
        h, w = allowed.shape[-2:]
        rate = ns * allowed.flatten(-2).float().sum(-1) / (h * w)  # [..]
        flips = torch.rand(allowed.shape, device=allowed.device) < rate[..., None, None]
        return allowed ^ flips

    def piloted_blocked(self, coverage: torch.Tensor) -> torch.Tensor:
        """[B, max_num, h, w] coverage -> [B, P, h*w] blocked (True = not attended) for the MP rows,
        groups noised independently."""
        allowed = self.shift_scale(coverage.repeat(1, self.settings.groups, 1, 1)) > 1e-8
        return ~self.point_noise(allowed).flatten(2)

    def is_piloted(self, layer: int) -> bool:
        n = self.settings.piloted_layers
        return n is None or layer < n

    def self_attention_mask(self, num_slots: int, num_queries: int, device=None) -> torch.Tensor:
        """[T, T] bool, True = blocked, T = P + Q with the MP slots first: matching queries cannot see
        any MP slot, an MP group cannot see another group; MP slots see the matching queries."""
        total = num_slots + num_queries
        blocked = torch.zeros((total, total), dtype=torch.bool, device=device)
        blocked[num_slots:, :num_slots] = True
        groups = self.settings.groups
        per_group = num_slots // groups if groups else 0
        for g in range(groups):
            start, end = g * per_group, (g + 1) * per_group
            blocked[start:end, :start] = True
            blocked[start:end, end:num_slots] = True
        return blocked

    # ------------------------------------------------------------------ decoder pass
    def run_decoder(self, decoder: MultiScaleMaskedTransformerDecoder, multi_scale_features: list[torch.Tensor],
                    mask_features: torch.Tensor, targets: Sequence[dict]) -> PilotedOutputs:
        """One decoder pass with MP slots prepended to the learnable queries (the decoder's `extra`
        queries): the learnable queries go through exactly Mask2Former's computation."""
        max_num, indices = self.slot_layout(targets)
        content = self.query_content(targets, max_num)
        extra = PilotedQueries(self, targets, max_num, content, content.new_zeros(content.shape),
                               self.self_attention_mask(content.shape[1], decoder.num_queries, mask_features.device))
        outputs = decoder(multi_scale_features, mask_features, extra=extra)
        piloted = outputs.pop("extra_outputs")
        return PilotedOutputs(outputs, piloted, indices, content.shape[1])

    # ------------------------------------------------------------------ losses
    def losses(self, criterion: SetCriterion, piloted: PilotedOutputs, targets: Sequence[dict],
               generator: Generators = None) -> dict[str, torch.Tensor]:
        """Weighted class / mask / dice losses of the MP slots at every prediction set, each slot against
        its own GT: `loss_ce_mp` ... for the final set, `loss_ce_mp_{i}` for set i. Mask terms are
        normalised by num_masks x groups (every GT is supervised once per group)."""
        names = ("loss_ce", "loss_mask", "loss_dice")
        if piloted.num_slots == 0:
            # No GT anywhere in the batch: nothing to pilot. Zero losses that still touch label_enc
            # keep DDP's gradient graph identical across ranks.
            zero = self.label_enc.weight.sum() * 0.0
            keys = [f"{n}_mp" for n in names] + [f"{n}_mp_{i}" for i in range(len(piloted.piloted) - 1) for n in names]
            return {k: zero.clone() for k in keys}
        device = piloted.piloted[-1]["pred_logits"].device
        num_masks = count_num_masks(targets, device) * self.settings.groups
        out = {}
        for k, preds in enumerate(piloted.piloted):
            preds = {key: value.float() for key, value in preds.items()}
            terms = criterion.compute_losses_for_indices(preds, targets, piloted.indices, num_masks, generator)
            if not self.settings.class_loss:
                terms["loss_ce"] = terms["loss_ce"] * 0.0
            suffix = "_mp" if k == len(piloted.piloted) - 1 else f"_mp_{k}"
            out.update({f"{name}{suffix}": value for name, value in terms.items()})
        return out
