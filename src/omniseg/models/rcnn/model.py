"""Mask R-CNN and PANet on torchvision's detection stack, behind omniseg's Segmenter interface.

torchvision's `MaskRCNN` supplies the RPN, RoIHeads, box coder, sampling, losses, NMS and mask pasting; omniseg
supplies the backbone (timm ResNet, res2..res5) under a torchvision FPN, the normalisation (inside the model,
as every omniseg family) and the data pipeline. torchvision's transform is replaced by one that only batches:
the engine has already augmented and padded the images, and resizing again would break the padded targets.

`arch: panet` swaps in PANet's bottom-up path, adaptive feature pooling and fully-connected-fusion mask head
(omniseg.models.rcnn.panet); every other part, including losses and inference, is the Mask R-CNN one.

Switches for checkpoints trained elsewhere (defaults keep the plain torchvision / detectron2 behaviour):
GroupNorm in the FPN (`fpn_norm`) and RoI heads (`roi.head_norm`), a conv box head (`roi.box_head: conv_fc`),
and Detectron's legacy geometry: `rpn.anchors: detectron_legacy`, `roi.box_geometry: legacy` (+1 box widths in
box coding, sizes and NMS; clipping to W - 1) and `roi.aligned: false` (legacy RoIAlign).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform, paste_masks_in_image, resize_boxes
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign, roi_align
from torchvision.ops import boxes as box_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.poolers import LevelMapper

from omniseg.masks import boxes_from_masks
from omniseg.models.backbones import FEATURE_NAMES, build_backbone
from omniseg.models.base import Segmenter, class_weight_tensor
from omniseg.models.layers.nms import exportable_torchvision_nms
from omniseg.models.rcnn.family import RCNNSettings
from omniseg.models.rcnn.panet import (
    AdaptiveRoIAlign, AdaptiveTwoMLPHead, BottomUpPath, ConvFCBoxHead, FusedMaskHead, group_norm, rois_from_boxes,
)




class BatchOnlyTransform(GeneralizedRCNNTransform):
    """GeneralizedRCNNTransform that neither resizes nor normalises: inputs arrive normalised at their final
    size. It still batches (zero-padding to `size_divisible`) for callers of `MaskRCNN.forward`; omniseg's
    `predict` pastes with the same torchvision functions as its `postprocess` (`paste_detections`)."""

    def __init__(self, size_divisible: int = 32):
        super().__init__(min_size=1, max_size=1, image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0],
                         size_divisible=size_divisible)

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        return image

    def resize(self, image: torch.Tensor, target: dict | None = None):
        return image, target


class FPNBackbone(nn.Module):
    """omniseg backbone (res2..res5) -> torchvision FPN (P2..P5) [-> PANet bottom-up path (N2..N5)] -> + max-pool
    level ("pool", stride 64, RPN only). Returns the OrderedDict torchvision's detection heads expect."""

    def __init__(self, body: nn.Module, out_channels: int = 256, bottom_up: bool = False, norm: str = "none"):
        super().__init__()
        self.body = body
        specs = body.specs
        self.strides = [int(specs[n].stride) for n in FEATURE_NAMES]
        prefix = "n" if bottom_up else "p"
        self.level_names = [f"{prefix}{int(math.log2(s))}" for s in self.strides]
        # norm "gn": bias-free FPN convs + GroupNorm (torchvision's norm_layer), as Detectron's FPN.USE_GN
        self.fpn = FeaturePyramidNetwork([specs[n].channels for n in FEATURE_NAMES], out_channels,
                                         norm_layer=group_norm if norm == "gn" else None)
        self.bottom_up = BottomUpPath(out_channels, len(FEATURE_NAMES), norm=norm) if bottom_up else None
        self.top_block = LastLevelMaxPool()
        self.out_channels = out_channels  # what torchvision's MaskRCNN reads

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = self.body(x)
        levels = list(self.fpn(OrderedDict((n, feats[n]) for n in FEATURE_NAMES)).values())
        if self.bottom_up is not None:
            levels = self.bottom_up(levels)
        out = OrderedDict(zip(self.level_names, levels))
        # LastLevelMaxPool: P6 (N6 for PANet) = max_pool(kernel 1, stride 2) of the top level, as detectron2.
        pooled, _ = self.top_block([levels[-1]], [levels[-1]], ["top"])
        out["pool"] = pooled[-1]
        return out


class UnroundedAnchorGenerator(AnchorGenerator):
    """detectron2's DefaultAnchorGenerator (offset 0) in torchvision's interface: cell anchors of width
    size / sqrt(ratio) and height size * sqrt(ratio) centred on 0, not rounded (torchvision rounds them), placed
    every `stride` pixels of each level's own stride (torchvision divides the padded size by the grid size,
    which differs for the pooled level when the padded size is not a multiple of its stride)."""

    def __init__(self, sizes, aspect_ratios, strides: Sequence[int]):
        super().__init__(sizes, aspect_ratios)
        if len(strides) != len(sizes):
            raise ValueError(f"{len(sizes)} anchor levels but {len(strides)} strides")
        self.level_strides = [int(s) for s in strides]

    def generate_anchors(self, scales, aspect_ratios, dtype: torch.dtype = torch.float32,
                         device: torch.device = torch.device("cpu")) -> torch.Tensor:
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        ws = (scales[None, :] / torch.sqrt(ratios)[:, None]).reshape(-1)
        hs = (scales[None, :] * torch.sqrt(ratios)[:, None]).reshape(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2

    def forward(self, image_list: ImageList, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        grid_sizes = [f.shape[-2:] for f in feature_maps]
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        strides = [[torch.tensor(s, dtype=torch.int64, device=device)] * 2 for s in self.level_strides]
        self.set_cell_anchors(dtype, device)
        per_level = self.grid_anchors(grid_sizes, strides)
        return [torch.cat(per_level) for _ in image_list.image_sizes]


class LegacyAnchorGenerator(UnroundedAnchorGenerator):
    """Detectron's generate_anchors at each level: the reference window (0, 0, stride - 1, stride - 1); per aspect
    ratio r a width round(sqrt(stride^2 / r)) and height round(width * r) about its centre (stride - 1) / 2; both
    scaled by size / stride; corners centre -+ (side - 1) / 2 (inclusive pixels). Placed every `stride` pixels
    from 0, in the order (location, ratio), as Detectron's RPN reads its outputs."""

    def set_cell_anchors(self, dtype: torch.dtype, device: torch.device) -> None:
        self.cell_anchors = [legacy_cell_anchors(stride, sizes, ratios, dtype, device)
                             for stride, sizes, ratios in zip(self.level_strides, self.sizes, self.aspect_ratios)]


def legacy_cell_anchors(stride: int, sizes, aspect_ratios, dtype: torch.dtype = torch.float32,
                        device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """One level's Detectron anchors [len(ratios) * len(sizes), 4] (x1, y1, x2, y2), ratio-major. Computed in
    float64, rounding half to even as numpy does."""
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float64)
    scales = torch.as_tensor(sizes, dtype=torch.float64) / stride
    centre = (stride - 1) / 2.0
    ws = torch.round(torch.sqrt(stride * stride / ratios))
    hs = torch.round(ws * ratios)
    ws = (ws[:, None] * scales[None, :]).reshape(-1)
    hs = (hs[:, None] * scales[None, :]).reshape(-1)
    anchors = torch.stack([centre - 0.5 * (ws - 1), centre - 0.5 * (hs - 1),
                           centre + 0.5 * (ws - 1), centre + 0.5 * (hs - 1)], dim=1)
    return anchors.to(dtype=dtype, device=device)


class LegacyBoxCoder(BoxCoder):
    """Detectron's box coding: widths and heights x2 - x1 + 1, decoded x2 = centre + w / 2 - 1. Equal to the
    continuous coding of boxes whose x2, y2 are moved out by one pixel, moved back after decoding."""

    def encode_single(self, reference_boxes: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
        return super().encode_single(_exclusive(reference_boxes), _exclusive(proposals))

    def decode_single(self, rel_codes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        decoded = super().decode_single(rel_codes, _exclusive(boxes.to(rel_codes.dtype)))
        return decoded - decoded.new_tensor(_ONE_PIXEL).repeat(decoded.shape[1] // 4)


_ONE_PIXEL = (0.0, 0.0, 1.0, 1.0)


def _exclusive(boxes: torch.Tensor) -> torch.Tensor:
    """Pixel-inclusive boxes (Detectron) moved out by one pixel at x2, y2: continuous boxes whose widths, areas
    and IoUs are Detectron's (x2 - x1 + 1)."""
    return boxes + boxes.new_tensor(_ONE_PIXEL)


def _clip_inclusive(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Clip to [0, W - 1] x [0, H - 1], as Detectron (torchvision clips to [0, W] x [0, H])."""
    return box_ops.clip_boxes_to_image(boxes, (size[0] - 1, size[1] - 1))


class LegacyClipRPN(RegionProposalNetwork):
    """torchvision's RPN proposal filtering on Detectron's pixel-inclusive boxes: per level top-k, clipping to
    W - 1, minimum size and NMS IoU on x2 - x1 + 1 widths."""

    def filter_proposals(self, proposals, objectness, image_shapes, num_anchors_per_level):
        num_images, device = proposals.shape[0], proposals.device
        objectness = objectness.detach().reshape(num_images, -1)
        levels = torch.cat([torch.full((n,), i, dtype=torch.int64, device=device)
                            for i, n in enumerate(num_anchors_per_level)])
        levels = levels.reshape(1, -1).expand_as(objectness)
        top = self._get_top_n_idx(objectness, num_anchors_per_level)
        batch = torch.arange(num_images, device=device)[:, None]
        probs, levels, proposals = torch.sigmoid(objectness[batch, top]), levels[batch, top], proposals[batch, top]
        final_boxes, final_scores = [], []
        for boxes, scores, level, size in zip(proposals, probs, levels, image_shapes):
            wide = _exclusive(_clip_inclusive(boxes, size))
            keep = box_ops.remove_small_boxes(wide, self.min_size)
            wide, scores, level = wide[keep], scores[keep], level[keep]
            keep = torch.where(scores >= self.score_thresh)[0]
            wide, scores, level = wide[keep], scores[keep], level[keep]
            keep = box_ops.batched_nms(wide, scores, level, self.nms_thresh)[: self.post_nms_top_n()]
            final_boxes.append(wide[keep] - wide.new_tensor(_ONE_PIXEL))
            final_scores.append(scores[keep])
        return final_boxes, final_scores


class LevelRoIAlign(MultiScaleRoIAlign):
    """Mask R-CNN's pooler: each RoI pooled from the one FPN level of Eq. (1) of the FPN paper
    (k = floor(4 + log2(sqrt(area) / 224)), clamped), with torchvision's roi_align. `aligned=True` is
    detectron2's ROIAlignV2 (torchvision's own MultiScaleRoIAlign is aligned=False); strides are the
    backbone's, not inferred from the padded size."""

    def __init__(self, featmap_names: Sequence[str], strides: Sequence[int], output_size: int,
                 sampling_ratio: int = 2, aligned: bool = True, canonical_scale: int = 224, canonical_level: int = 4):
        super().__init__(list(featmap_names), output_size, sampling_ratio,
                         canonical_scale=canonical_scale, canonical_level=canonical_level)
        self.strides = [int(s) for s in strides]
        self.aligned = aligned
        levels = [int(math.log2(s)) for s in self.strides]
        self.mapper = LevelMapper(levels[0], levels[-1], canonical_scale, canonical_level)

    def forward(self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                image_shapes: list[tuple[int, int]] | None = None) -> torch.Tensor:
        rois = rois_from_boxes(boxes)
        first = x[self.featmap_names[0]]
        out = first.new_zeros((rois.shape[0], first.shape[1], *self.output_size))
        target = self.mapper(boxes)
        # no branch on box counts (symbolic in an exported graph): an empty level pools nothing
        for level, (name, stride) in enumerate(zip(self.featmap_names, self.strides)):
            idx = torch.where(target == level)[0]
            pooled = roi_align(x[name], rois[idx].to(x[name].dtype), self.output_size, spatial_scale=1.0 / stride,
                               sampling_ratio=self.sampling_ratio, aligned=self.aligned)
            out = out.index_put((idx,), pooled.to(out.dtype))
        return out


class RCNNSegmenter(Segmenter):
    """Mask R-CNN (`arch: maskrcnn`) or PANet (`arch: panet`) instance segmentation.

    Args:
        settings: the `model` section (RCNNSettings, or a mapping checked against it).
        num_classes: K (contiguous ids 0..K-1; torchvision's class 0 is background, so it sees K + 1).
        thing_ids: kept for the contract (targets of the instance task are things only).
    """

    settings_class = RCNNSettings
    tasks = ("instance",)
    raw_output_names = ("boxes", "labels", "scores", "mask_probs")
    single_image_export = True

    def __init__(self, settings: RCNNSettings | Mapping, num_classes: int, thing_ids: Sequence[int] = ()):
        super().__init__(settings, num_classes, thing_ids)
        s = self.settings
        is_panet = self.arch == "panet"
        bottom_up, adaptive, fc_fusion = (s.panet.bottom_up, s.panet.adaptive_pooling, s.panet.fc_fusion) if is_panet \
            else (False, False, False)

        backbone = FPNBackbone(build_backbone(s.backbone, **s.backbone_options()), s.fpn_dim, bottom_up=bottom_up,
                               norm=s.fpn_norm)
        names, strides, dim = backbone.level_names, backbone.strides, s.fpn_dim

        rpn, roi, test = s.rpn, s.roi, s.test
        if len(rpn.anchor_sizes) != len(names) + 1:
            raise ValueError(f"model.rpn.anchor_sizes needs one size per level ({len(names) + 1}: "
                             f"{names + ['pool']}), got {list(rpn.anchor_sizes)}")
        anchor_args = (tuple((int(a),) for a in rpn.anchor_sizes),
                       (tuple(float(r) for r in rpn.aspect_ratios),) * len(rpn.anchor_sizes))
        if rpn.anchors == "detectron2":
            anchors = UnroundedAnchorGenerator(*anchor_args, strides=[*strides, 2 * strides[-1]])
        elif rpn.anchors == "detectron_legacy":
            anchors = LegacyAnchorGenerator(*anchor_args, strides=[*strides, 2 * strides[-1]])
        else:
            anchors = AnchorGenerator(*anchor_args)
        box_res, mask_res, ratio = roi.box_resolution, roi.mask_resolution, roi.sampling_ratio
        if adaptive:
            # PANet's adaptive pooling: RoIAlign on every level (aligned by default; the released PANet: legacy).
            box_pool = AdaptiveRoIAlign(names, strides, box_res, ratio, aligned=roi.aligned)
            mask_pool = AdaptiveRoIAlign(names, strides, mask_res, ratio, aligned=roi.aligned)
        else:
            box_pool = LevelRoIAlign(names, strides, box_res, ratio, roi.aligned)
            mask_pool = LevelRoIAlign(names, strides, mask_res, ratio, roi.aligned)
        if roi.box_head == "conv_fc":
            box_head = ConvFCBoxHead(len(names) if adaptive else 1, dim, roi.box_conv_dim, roi.box_head_convs, box_res,
                                     roi.box_head_dim, norm=roi.head_norm)
            if not adaptive:
                box_head = _OneLevel(box_head)
        elif adaptive:
            box_head = AdaptiveTwoMLPHead(len(names), dim * box_res * box_res, roi.box_head_dim)
        else:
            box_head = TwoMLPHead(dim * box_res * box_res, roi.box_head_dim)
        if is_panet:
            mask_head = FusedMaskHead(len(names) if adaptive else 1, dim, num_classes + 1, roi.mask_head_dim, mask_res,
                                      fc_fusion=fc_fusion, fusion_relu=s.panet.fusion_relu, norm=roi.head_norm)
            if not adaptive:
                mask_head = _OneLevel(mask_head)
            mask_predictor = nn.Identity()  # FusedMaskHead already returns per-class logits
        else:
            mask_head = MaskRCNNHeads(dim, [roi.mask_head_dim] * roi.mask_convs, 1,
                                      norm_layer=group_norm if roi.head_norm == "gn" else None)
            mask_predictor = MaskRCNNPredictor(roi.mask_head_dim, roi.mask_head_dim, num_classes + 1)

        self.mask_threshold = test.mask_threshold
        self.detector = MaskRCNN(
            backbone, num_classes=None,
            rpn_anchor_generator=anchors,
            rpn_pre_nms_top_n_train=rpn.pre_nms_topk_train, rpn_pre_nms_top_n_test=rpn.pre_nms_topk_test,
            rpn_post_nms_top_n_train=rpn.post_nms_topk_train, rpn_post_nms_top_n_test=rpn.post_nms_topk_test,
            rpn_nms_thresh=rpn.nms_thresh, rpn_fg_iou_thresh=rpn.fg_iou_thresh, rpn_bg_iou_thresh=rpn.bg_iou_thresh,
            rpn_batch_size_per_image=rpn.batch_size_per_image, rpn_positive_fraction=rpn.positive_fraction,
            box_roi_pool=box_pool, box_head=box_head,
            box_predictor=FastRCNNPredictor(roi.box_head_dim, num_classes + 1),
            box_score_thresh=test.score_thresh, box_nms_thresh=test.nms_thresh,
            box_detections_per_img=test.detections_per_img,
            box_fg_iou_thresh=roi.fg_iou_thresh, box_bg_iou_thresh=roi.bg_iou_thresh,
            box_batch_size_per_image=roi.batch_size_per_image, box_positive_fraction=roi.positive_fraction,
            bbox_reg_weights=tuple(float(w) for w in roi.bbox_reg_weights),
            mask_roi_pool=mask_pool, mask_head=mask_head, mask_predictor=mask_predictor,
        )
        self.detector.transform = BatchOnlyTransform(32)
        if roi.box_geometry == "legacy":
            # Detectron's +1 widths in both stages' box coding and NMS, clipping to W - 1 (parameter names unchanged)
            rpn_module, heads = self.detector.rpn, self.detector.roi_heads
            rpn_module.box_coder = LegacyBoxCoder(rpn_module.box_coder.weights, rpn_module.box_coder.bbox_xform_clip)
            heads.box_coder = LegacyBoxCoder(heads.box_coder.weights, heads.box_coder.bbox_xform_clip)
            rpn_module.__class__ = LegacyClipRPN
            heads.__class__ = LegacyClipRoIHeads
        weights = class_weight_tensor(s.loss.class_weights, num_classes)
        self.register_buffer("classifier_weights", None if weights is None else torch.cat([weights.new_ones(1), weights]),
                             persistent=False)  # background (torchvision's class 0) keeps weight 1
        if weights is not None and roi.box_geometry != "legacy":  # LegacyClipRoIHeads taps too
            self.detector.roi_heads.__class__ = TappedRoIHeads
        if weights is not None:  # keep what the weighted classifier loss needs; parameter names unchanged
            self.detector.roi_heads.box_predictor.register_forward_hook(self._keep_class_logits)

    def _keep_class_logits(self, module, inputs, outputs) -> None:
        self._class_logits = outputs[0]

    @property
    def backbone(self) -> nn.Module:
        """The omniseg backbone, so `backbone_multiplier` and weight loading find it as in other families."""
        return self.detector.backbone.body

    # -- training ------------------------------------------------------------------------------
    def _detection_targets(self, targets: list[dict]) -> list[dict]:
        """Engine targets -> torchvision's: boxes from the masks (x2 = last pixel + 1, the continuous
        convention of detectron2's BitMasks boxes), labels shifted to 1..K (0 is background)."""
        out = []
        for t in targets:
            masks = t["masks"].bool()
            labels = t["labels"].to(torch.int64)
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                raise ValueError(f"instance labels must be in [0, {self.num_classes}), got {labels.tolist()}")
            out.append({"boxes": boxes_from_masks(masks), "labels": labels + 1, "masks": masks})
        return out

    def losses(self, images: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        """images: uint8 [B,3,Hp,Wp] padded; targets: [{"labels": [N], "masks": bool [N,Hp,Wp]}] (N may be 0).
        Returns torchvision's five terms: loss_objectness, loss_rpn_box_reg, loss_classifier, loss_box_reg,
        loss_mask. The padded size serves as every image's size (the engine passes no unpadded sizes)."""
        x = self.normalize(images)
        det_targets = self._detection_targets(targets)
        image_list = ImageList(x, [tuple(x.shape[-2:])] * x.shape[0])
        features = self.detector.backbone(x)
        proposals, rpn_losses = self.detector.rpn(image_list, features, det_targets)
        _, roi_losses = self.detector.roi_heads(features, proposals, image_list.image_sizes, det_targets)
        if self.classifier_weights is not None:  # torchvision's classifier CE, with the class weights
            heads = self.detector.roi_heads
            roi_losses["loss_classifier"] = F.cross_entropy(self._class_logits, torch.cat(heads.labels),
                                                            weight=self.classifier_weights)
        return {**rpn_losses, **roi_losses}

    # -- inference -----------------------------------------------------------------------------
    @contextmanager
    def _inference_mode(self):
        """RPN / RoIHeads / transform pick their inference branch from `.training`: force it for predict."""
        parts = (self.detector.rpn, self.detector.roi_heads, self.detector.transform)
        modes = [p.training for p in parts]
        for p in parts:
            p.training = False
        try:
            yield
        finally:
            for p, m in zip(parts, modes):
                p.training = m

    def detections(self, x: torch.Tensor, sizes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        """Normalised images -> per image its detections at the input resolution, boxes clipped to its (h, w):
        boxes [N,4], labels [N] (0..K-1), scores [N], mask_probs [N,28,28] (unpasted). What `infer` pastes
        and what an exported graph returns."""
        with self._inference_mode(), exportable_torchvision_nms():
            features = self.detector.backbone(x)
            proposals, _ = self.detector.rpn(ImageList(x, sizes), features)
            detections, _ = self.detector.roi_heads(features, proposals, sizes)
        return [{"boxes": d["boxes"], "labels": d["labels"] - 1, "scores": d["scores"], "mask_probs": d["masks"][:, 0]}
                for d in detections]

    def infer(self, images: torch.Tensor, image_sizes: list[tuple[int, int]], output_sizes: list[tuple[int, int]],
              tasks: list[str], *, return_raw: bool = False, semantic_scores: bool = False) -> list[dict]:
        """Detections pasted at the output size (`paste_detections`). `return_raw` adds "raw": the detections
        at the input resolution with the unpasted mask probabilities."""
        results = []
        for raw, size, out in zip(self.detections(self.normalize(images), image_sizes), image_sizes, output_sizes):
            result = {}
            if "instance" in tasks:
                result["instances"] = paste_detections(raw, size, out, self.mask_threshold)
            if return_raw:
                result["raw"] = raw
            results.append(result)
        return results

    def forward_raw(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """One normalised image [1,3,H,W] -> its `detections`, N varying with the image."""
        if x.shape[0] != 1:
            raise ValueError(f"{self.describe()}: forward_raw takes one image, got {x.shape[0]}")
        return self.detections(x, [(x.shape[-2], x.shape[-1])])[0]

    def export_metadata(self) -> dict:
        return {**super().export_metadata(), "instance_masks": "rcnn", "mask_threshold": self.mask_threshold}


def paste_detections(raw: dict[str, torch.Tensor], image_size: tuple[int, int], output_size: tuple[int, int],
                     mask_threshold: float) -> dict[str, torch.Tensor]:
    """Detections at the image size (`RCNNSegmenter.detections`, or an exported graph's outputs) -> instances at
    the output size: torchvision's postprocess (boxes rescaled, 28x28 probabilities pasted), thresholded."""
    boxes = resize_boxes(raw["boxes"], tuple(image_size), tuple(output_size))
    masks = paste_masks_in_image(raw["mask_probs"][:, None], boxes, tuple(output_size))[:, 0] > mask_threshold
    return {"masks": masks, "labels": raw["labels"].to(torch.int64), "scores": raw["scores"].float(),
            "boxes": boxes.float()}


class TappedRoIHeads(RoIHeads):
    """torchvision's RoIHeads, keeping the sampled proposals' labels of the last training forward, so the
    classifier loss can be recomputed with class weights (torchvision's is unweighted)."""

    def select_training_samples(self, proposals, targets):
        proposals, matched_idxs, labels, regression_targets = super().select_training_samples(proposals, targets)
        self.labels = labels
        return proposals, matched_idxs, labels, regression_targets


class LegacyClipRoIHeads(TappedRoIHeads):
    """RoIHeads post-processing Detectron's pixel-inclusive detections: clipped to [0, W - 1] x [0, H - 1],
    per-class NMS IoU on x2 - x1 + 1 widths, no empty-box filter (every such box is at least 1 px wide; Detectron
    has none); score threshold and top-k as torchvision. Taps the sampled labels like TappedRoIHeads."""

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        counts = [p.shape[0] for p in proposals]
        decoded = self.box_coder.decode(box_regression, proposals).split(counts, 0)
        probabilities = F.softmax(class_logits, -1).split(counts, 0)
        all_boxes, all_scores, all_labels = [], [], []
        for boxes, scores, size in zip(decoded, probabilities, image_shapes):
            boxes = _clip_inclusive(boxes, size)
            labels = torch.arange(scores.shape[-1], device=scores.device).view(1, -1).expand_as(scores)
            boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = box_ops.batched_nms(_exclusive(boxes), scores, labels, self.nms_thresh)[: self.detections_per_img]
            all_boxes.append(boxes[keep])
            all_scores.append(scores[keep])
            all_labels.append(labels[keep])
        return all_boxes, all_scores, all_labels


class _OneLevel(nn.Module):
    """Feeds a single-level pooled map [R,C,S,S] to a per-level head as one level (PANet without adaptive pooling)."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x[None])
