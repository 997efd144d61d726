"""BlendMask (Chen et al., CVPR 2020; AdelaiDet): FCOS + a bottom module predicting K bases + per-detection
K x M x M attentions, blended inside each box into an R x R mask.

Variants (`model.variant`): "standard" (AdelaiDet R_50 configs), "rt" (BlendMask-RT: P3-P6, 3 shared BN
tower convs, 2 basis convs, M = 7) and "panoptic" (a stuff branch, merged with the instances as Panoptic-FPN:
`model.blendmask.stuff_head` "basis" on the bottom module's features, or "panoptic_fpn", detectron2's
Panoptic-FPN semantic head on P2-P5 as AdelaiDet's release). Every `model.blendmask.*` key left null takes the
variant's value (family.py VARIANTS).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
from torch.nn import functional as F
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelP6P7

from omniseg.masks import boxes_from_masks
from omniseg.models.backbones import build_backbone
from omniseg.models.base import Segmenter, class_weight_tensor
from omniseg.models.blendmask.basis import BasisModule, SemanticHead
from omniseg.models.blendmask.family import BlendMaskSettings
from omniseg.models.blendmask.blender import blend, crop_masks, paste_masks, pool_bases
from omniseg.models.blendmask.panoptic_fpn import SemanticFPNHead
from omniseg.models.blendmask.fcos import (
    FCOSHead, fcos_detect, fcos_losses, fcos_targets, flatten_levels, locations, size_ranges,
)
from omniseg.masks import combine_panoptic
from omniseg.models.layers.nms import exportable_torchvision_nms

BASIS_STRIDE = 4


class LastLevelP6(ExtraFPNBlock):
    """P6 = conv3x3 stride 2 on P5 (AdelaiDet's LastLevelP6, FCOS TOP_LEVELS 1: the RT / 550 configs)."""

    def __init__(self, channels: int):
        super().__init__()
        self.p6 = torch.nn.Conv2d(channels, channels, 3, 2, 1)
        torch.nn.init.kaiming_uniform_(self.p6.weight, a=1)
        torch.nn.init.constant_(self.p6.bias, 0)

    def forward(self, p, c, names):
        return [*p, self.p6(p[-1])], [*names, "p6"]


def stuff_loss(logits: torch.Tensor, labels: torch.Tensor, weight: float,
               class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """`weight` x CE of stride-4 stuff logits [B,C,h,w], bilinearly upsampled to the labels [B,H,W] (255:
    ignored), averaged over the labelled pixels (weighted by `class_weights` when given): detectron2's
    SemSegFPNHead loss, whose x4 upsampling is this one for inputs padded to a multiple of 4."""
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return weight * F.cross_entropy(logits, labels, weight=class_weights, ignore_index=255)


def paste_instances(raw: dict[str, torch.Tensor], image_size: tuple[int, int], output_size: tuple[int, int],
                    mask_threshold: float) -> dict[str, torch.Tensor]:
    """Detections at the image size (`BlendMask.detections`, or an exported graph's outputs) -> instances at the
    output size: boxes rescaled, mask logits pasted bilinearly into them and thresholded."""
    (h, w), (oh, ow) = image_size, output_size
    boxes = raw["boxes"] * raw["boxes"].new_tensor([ow / w, oh / h, ow / w, oh / h])
    masks = paste_masks(raw["mask_logits"].sigmoid(), boxes, (int(oh), int(ow)), mask_threshold)
    return {"masks": masks, "labels": raw["labels"].to(torch.int64), "scores": raw["scores"].float(),
            "boxes": boxes.float()}


class BlendMask(Segmenter):
    """FCOS detector + blender masks; `predict` gives instances (and panoptic / semantic for the panoptic variant).

    Args:
        settings: the `model` section (BlendMaskSettings, or a mapping checked against it).
        num_classes: all contiguous classes of the dataset.
        thing_ids: contiguous ids of thing classes (the detector's classes; the rest are stuff). Empty: all
            classes are things.
    """

    settings_class = BlendMaskSettings
    training_only = ("aux_semantic",)
    single_image_export = True  # the auxiliary thing-semantic head only shapes the bases in training

    def __init__(self, settings: BlendMaskSettings | Mapping, num_classes: int, thing_ids: Sequence[int] = ()):
        super().__init__(settings, num_classes, thing_ids)
        s = self.settings
        self.variant = s.variant
        opt = s.blendmask.for_variant(self.variant)
        self.test_cfg = opt.test
        self.thing_ids = self.thing_ids or list(range(num_classes))  # none given: every class is a thing
        self.stuff_ids = [c for c in range(num_classes) if c not in set(self.thing_ids)]
        self.panoptic = self.variant == "panoptic"
        if self.panoptic and not self.stuff_ids:
            raise ValueError("the panoptic BlendMask needs stuff classes (classes not in thing_ids)")
        self.tasks = ("panoptic", "instance", "semantic") if self.panoptic else ("instance",)
        self.raw_output_names = ("boxes", "labels", "scores", "mask_logits") + (("stuff_logits",) if self.panoptic else ())
        # contiguous id -> detector class (-1: stuff); -> stuff-branch class (0 = "things", j = stuff_ids[j-1]).
        det_of = torch.full((num_classes,), -1, dtype=torch.int64)
        det_of[self.thing_ids] = torch.arange(len(self.thing_ids))
        stuff_of = torch.zeros(num_classes, dtype=torch.int64)
        if self.stuff_ids:
            stuff_of[self.stuff_ids] = torch.arange(1, len(self.stuff_ids) + 1)
        self.register_buffer("det_of", det_of, persistent=False)
        self.register_buffer("stuff_of", stuff_of, persistent=False)
        self.register_buffer("thing_table", torch.tensor(self.thing_ids, dtype=torch.int64), persistent=False)
        self.register_buffer("stuff_table", torch.tensor(self.stuff_ids, dtype=torch.int64), persistent=False)
        weights = class_weight_tensor(opt.class_weights, num_classes, "model.blendmask.class_weights")
        self.register_buffer("det_weights", None if weights is None else weights[self.thing_ids], persistent=False)
        self.register_buffer("stuff_weights", None if weights is None or not self.stuff_ids
                             else torch.cat([weights.new_ones(1), weights[self.stuff_ids]]), persistent=False)

        self.num_levels = opt.num_levels
        self.strides = [8, 16, 32, 64, 128][: self.num_levels]
        self.sizes_of_interest = [float(x) for x in opt.sizes_of_interest]
        if len(self.sizes_of_interest) != self.num_levels - 1:
            raise ValueError(f"model.blendmask.sizes_of_interest needs {self.num_levels - 1} split points")
        self.num_bases = opt.num_bases
        self.attn_size = opt.attn_size
        self.resolution = opt.bottom_resolution
        self.radius = opt.center_sample_radius
        self.focal = (opt.focal_alpha, opt.focal_gamma)
        self.aux_weight = opt.aux_semantic_weight
        self.stuff_weight = opt.stuff_weight
        self.stuff_head_kind = opt.stuff_head if self.panoptic else None

        self.backbone = build_backbone(s.backbone, **s.backbone_options())
        specs = self.backbone.specs
        width = s.fpn_channels
        # P6 (/P7) from P5 (LastLevelP6P7 reads P5 when in == out channels), as FCOS / AdelaiDet. The
        # Panoptic-FPN stuff head also needs P2: AdelaiDet's Base-Panoptic feeds res2-res5 to the FPN.
        extra = (None if self.num_levels == 3 else LastLevelP6(width) if self.num_levels == 4
                 else LastLevelP6P7(width, width))
        self.with_p2 = self.stuff_head_kind == "panoptic_fpn"
        self.fpn_inputs = ("res2", "res3", "res4", "res5") if self.with_p2 else ("res3", "res4", "res5")
        self.fpn = FeaturePyramidNetwork([specs[n].channels for n in self.fpn_inputs], width, extra_blocks=extra)
        self.head = FCOSHead(width, len(self.thing_ids), self.num_levels, num_cls_convs=opt.num_cls_convs,
                             num_box_convs=opt.num_box_convs, num_share_convs=opt.num_share_convs,
                             norm=opt.tower_norm, attn_channels=self.num_bases * self.attn_size ** 2)
        channels = opt.basis_channels
        self.basis = BasisModule(width, 3, channels, opt.basis_num_convs, self.num_bases)
        self.aux_semantic = (SemanticHead(width, len(self.thing_ids) + 1, channels, 2) if self.aux_weight > 0
                             else None)
        num_stuff = len(self.stuff_ids) + 1  # stuff classes + "things"
        self.stuff_head = (None if not self.panoptic
                           else SemanticFPNHead(width, num_stuff, opt.stuff_channels) if self.with_p2
                           else SemanticHead(channels, num_stuff, channels, 1))

    # -- network -------------------------------------------------------------------------------
    def network(self, x: torch.Tensor) -> dict:
        """Normalised images -> FPN levels from P3 ("pyramid"; P2 apart, when built), FCOS outputs per level,
        bases, basis features."""
        feats = self.backbone(x)
        pyramid = list(self.fpn(OrderedDict((n, feats[n]) for n in self.fpn_inputs)).values())
        p2, pyramid = (pyramid[0], pyramid[1:]) if self.with_p2 else (None, pyramid)
        out = self.head(pyramid)
        out["bases"], out["basis_feats"] = self.basis(pyramid[:3])
        out["pyramid"] = pyramid
        if p2 is not None:
            out["p2"] = p2
        return out

    def stuff_logits(self, out: dict) -> torch.Tensor:
        """`network` outputs -> the stuff branch's logits [B, 1 + stuff classes, ~H/4, ~W/4] (index 0: "things")."""
        if self.with_p2:
            return self.stuff_head([out["p2"], *out["pyramid"][:3]])
        return self.stuff_head(out["basis_feats"])

    def _flat(self, out: dict, device) -> dict:
        sizes = [tuple(m.shape[-2:]) for m in out["logits"]]
        xy, strides, levels = locations(sizes, self.strides, device)
        return {"logits": flatten_levels(out["logits"]), "reg": flatten_levels(out["reg"]),
                "ctr": flatten_levels(out["ctr"])[..., 0], "attn": flatten_levels(out["attn"]),
                "xy": xy, "strides": strides, "levels": levels}

    # -- training ------------------------------------------------------------------------------
    def losses(self, images: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        """images uint8 [B,3,Hp,Wp] (padded); targets [{"labels" [N], "masks" bool [N,Hp,Wp]}] (stuff ones too
        for the panoptic variant). FCOS + blender mask loss (+ auxiliary thing semantics, + stuff)."""
        out = self.network(self.normalize(images))
        flat = self._flat(out, images.device)
        ranges = size_ranges(self.sizes_of_interest, flat["levels"], images.device)
        num_det = len(self.thing_ids)
        cls_t, reg_t, gt_global, gt_boxes, gt_masks, gt_image = [], [], [], [], [], []
        offset = 0
        for i, t in enumerate(targets):
            labels, masks = t["labels"].to(images.device), t["masks"].to(images.device)
            det = self.det_of[labels]
            things = det >= 0
            boxes = boxes_from_masks(masks[things])
            c, r, g = fcos_targets(flat["xy"], flat["strides"], ranges, boxes, det[things], num_det, self.radius)
            cls_t.append(c)
            reg_t.append(r)
            gt_global.append(torch.where(g >= 0, g + offset, g))
            gt_boxes.append(boxes)
            gt_masks.append(masks[things])
            gt_image.append(torch.full((boxes.shape[0],), i, dtype=torch.int64, device=images.device))
            offset += boxes.shape[0]
        with torch.autocast(images.device.type, enabled=False):
            losses, ctr_t, pos = fcos_losses(
                flat["logits"].flatten(0, 1).float(), flat["reg"].flatten(0, 1).float(), flat["ctr"].flatten().float(),
                torch.cat(cls_t), torch.cat(reg_t), num_det, *self.focal, class_weights=self.det_weights)
            losses["loss_mask"] = self._mask_loss(out["bases"].float(), flat["attn"].flatten(0, 1).float(), pos,
                                                  ctr_t, torch.cat(gt_global), torch.cat(gt_boxes),
                                                  torch.cat(gt_image), torch.cat(gt_masks))
            if self.aux_semantic is not None:
                losses["loss_aux_semantic"] = self.aux_weight * self._aux_semantic_loss(out["pyramid"][0], targets)
            if self.stuff_head is not None:
                losses["loss_stuff"] = stuff_loss(self.stuff_logits(out).float(),
                                                  self._stuff_labels(targets, tuple(images.shape[-2:])),
                                                  self.stuff_weight, self.stuff_weights)
        return losses

    def mask_proposals(self, pos: torch.Tensor, gt_global: torch.Tensor, gt_boxes: torch.Tensor,
                       gt_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training proposals: every positive location's assigned GT box (AdelaiDet: GT boxes, no top-D).
        Returns (box index [P] into gt_boxes, boxes [P,4], image index [P])."""
        g = gt_global[pos]
        return g, gt_boxes[g], gt_image[g]

    def _mask_loss(self, bases, attn, pos, ctr_t, gt_global, gt_boxes, gt_image, gt_masks) -> torch.Tensor:
        """Per positive location: mean BCE of blend(its GT box's RoI, its attention) against the GT mask
        cropped to 56 x 56, weighted by its centerness target, summed / the weights' sum."""
        if not bool(pos.any()):
            return bases.sum() * 0 + attn.sum() * 0
        g, _, _ = self.mask_proposals(pos, gt_global, gt_boxes, gt_image)
        # Each GT box is pooled once and shared by its positive locations.
        rois = pool_bases(bases, gt_boxes, gt_image, self.resolution, BASIS_STRIDE)
        crops = crop_masks(gt_masks, gt_boxes, self.resolution)
        logits = blend(rois[g], attn[pos])
        bce = F.binary_cross_entropy_with_logits(logits, crops[g].float(), reduction="none").flatten(1).mean(1)
        return (bce * ctr_t).sum() / ctr_t.sum().clamp(min=1e-6)

    def _aux_semantic_loss(self, p3: torch.Tensor, targets: list[dict]) -> torch.Tensor:
        """CE of thing classes + background (0) on P3 against the instance map (later instances overwrite),
        nearest-subsampled by 8 as AdelaiDet's offline sem_seg target. Padding counts as background."""
        h, w = targets[0]["masks"].shape[-2:]
        labels = torch.zeros((len(targets), h, w), dtype=torch.int64, device=p3.device)
        for i, t in enumerate(targets):
            det = self.det_of[t["labels"].to(p3.device)]
            for m, c in zip(t["masks"][det >= 0].to(p3.device), det[det >= 0].tolist()):
                labels[i][m] = c + 1
        labels = labels[:, ::8, ::8][:, : p3.shape[-2], : p3.shape[-1]]
        return F.cross_entropy(self.aux_semantic(p3).float()[..., : labels.shape[-2], : labels.shape[-1]], labels)

    def _stuff_labels(self, targets: list[dict], size: tuple[int, int]) -> torch.Tensor:
        """Panoptic-FPN "separated" targets: 0 on thing pixels, j on stuff class stuff_ids[j-1], 255 elsewhere."""
        out = torch.full((len(targets), *size), 255, dtype=torch.int64, device=self.det_of.device)
        for i, t in enumerate(targets):
            for m, c in zip(t["masks"].to(out.device), t["labels"].tolist()):
                out[i][m] = 0 if int(self.det_of[c]) >= 0 else int(self.stuff_of[c])
        return out

    # -- inference -----------------------------------------------------------------------------
    def detections(self, out: dict, image_sizes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        """`network` outputs -> per image its detections at the input resolution, boxes clipped to its (h, w):
        boxes [N,4], labels [N] (dataset-contiguous ids), scores [N], mask_logits [N,R,R] (unpasted). What
        `infer` pastes and what an exported graph returns. One RoIAlign and one blend for the whole batch."""
        flat = self._flat(out, out["bases"].device)
        tc = self.test_cfg
        with exportable_torchvision_nms():
            dets = [fcos_detect(flat["logits"][i], flat["reg"][i], flat["ctr"][i], flat["xy"], flat["strides"],
                                flat["levels"], self.num_levels, tuple(size),
                                score_threshold=tc.score_threshold, pre_nms_topk=tc.pre_nms_topk,
                                nms_threshold=tc.nms_threshold, max_detections=tc.detections_per_image)
                    for i, size in enumerate(image_sizes)]
        boxes = torch.cat([d[0] for d in dets])
        image_idx = torch.cat([torch.full((d[0].shape[0],), i, dtype=torch.int64, device=boxes.device)
                               for i, d in enumerate(dets)])
        attn = torch.cat([flat["attn"][i, d[3]] for i, d in enumerate(dets)]).float()
        mask_logits = blend(pool_bases(out["bases"].float(), boxes, image_idx, self.resolution, BASIS_STRIDE), attn)
        return [{"boxes": det_boxes, "labels": self.thing_table[cls], "scores": scores, "mask_logits": logits}
                for (det_boxes, scores, cls, _), logits in zip(dets, mask_logits.split([d[0].shape[0] for d in dets]))]

    def infer(self, images: torch.Tensor, image_sizes: list[tuple[int, int]], output_sizes: list[tuple[int, int]],
              tasks: list[str], *, return_raw: bool = False, semantic_scores: bool = False) -> list[dict]:
        """FCOS detections, blended masks pasted at the output size (`paste_instances`); the panoptic variant
        merges them with the stuff branch (Panoptic-FPN) for "panoptic" and "semantic"."""
        out = self.network(self.normalize(images))
        want_stuff = self.panoptic and ("panoptic" in tasks or "semantic" in tasks)
        stuff_logits = self.stuff_logits(out).float() if want_stuff else None
        results = []
        for i, (raw, size, out_size) in enumerate(zip(self.detections(out, image_sizes), image_sizes, output_sizes)):
            instances = paste_instances(raw, size, out_size, self.test_cfg.mask_threshold)
            result = {"instances": instances} if "instance" in tasks else {}
            if stuff_logits is not None:
                result.update(self._panoptic(instances, stuff_logits[i], tuple(images.shape[-2:]), size, out_size,
                                             tasks))
            if return_raw:
                result["raw"] = {**raw, "bases": out["bases"][i]}
                if stuff_logits is not None:
                    result["raw"]["stuff_logits"] = stuff_logits[i]
            results.append(result)
        return results

    def forward_raw(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """One normalised image [1,3,H,W] -> its `detections`, N varying; the panoptic variant adds
        stuff_logits [1 + stuff classes, H/4, W/4] (index 0: "thing")."""
        if x.shape[0] != 1:
            raise ValueError(f"{self.describe()}: forward_raw takes one image, got {x.shape[0]}")
        out = self.network(x)
        raw = self.detections(out, [(x.shape[-2], x.shape[-1])])[0]
        if self.panoptic:
            raw["stuff_logits"] = self.stuff_logits(out).float()[0]
        return raw

    def export_metadata(self) -> dict:
        tc = self.test_cfg
        return {**super().export_metadata(), "instance_masks": "blendmask", "mask_threshold": tc.mask_threshold,
                "stuff_ids": list(self.stuff_ids)}

    def _panoptic(self, instances: dict, stuff_logits: torch.Tensor, padded: tuple[int, int],
                  image_size: tuple[int, int], output_size: tuple[int, int], tasks: Sequence[str]) -> dict:
        """Stuff logits -> padded input -> crop -> output size (the mask-classification order); Panoptic-FPN
        merge; semantic = each thing segment's class, elsewhere the most likely stuff class."""
        (h, w), (oh, ow) = image_size, output_size
        logits = F.interpolate(stuff_logits[None], size=padded, mode="bilinear", align_corners=False)[..., :h, :w]
        if (h, w) != (oh, ow):
            logits = F.interpolate(logits, size=(oh, ow), mode="bilinear", align_corners=False)
        probs = logits[0].softmax(0)
        tc = self.test_cfg
        segment_map, infos = combine_panoptic(
            instances["masks"], instances["scores"], instances["labels"], probs.argmax(0), probs, self.stuff_ids,
            overlap_threshold=tc.overlap_threshold, stuff_area_threshold=tc.stuff_area_threshold,
            instance_score_threshold=tc.instance_score_threshold)
        result = {}
        if "panoptic" in tasks:
            result["panoptic"] = {"segment_map": segment_map, "segments_info": infos}
        if "semantic" in tasks:
            lut = torch.zeros(len(infos) + 1, dtype=torch.int64, device=segment_map.device)
            is_thing = torch.zeros(len(infos) + 1, dtype=torch.bool, device=segment_map.device)
            for s in infos:
                lut[s["id"]], is_thing[s["id"]] = s["category"], s["isthing"]
            semantic = self.stuff_table[probs[1:].argmax(0)]
            result["semantic"] = torch.where(is_thing[segment_map], lut[segment_map], semantic)
        return result
