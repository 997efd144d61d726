"""Per-pixel classification segmenters: FCN, PSPNet, DANet, EncNet, DeepLabV3 (ASPP) and Gated-SCNN heads on a
dilated ResNet, or on a plain stride-32 ResNet with FastFCN's Joint Pyramid Upsampling (`neck: jpu`).

They plug into the same engine as the mask-classification models: `losses(images, targets)` takes the
engine's per-class semantic masks (rebuilt here into a label map), `predict` returns {"semantic": ...}
at the requested resolution, and `forward_raw` (normalised images -> logits) is the exportable network.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from omniseg.models.backbones import build_backbone
from omniseg.models.base import Segmenter, class_weight_tensor, label_map_from_targets, semantic_results
from omniseg.models.layers.conv import ConvNormAct
from omniseg.models.per_pixel.blocks import (
    ASPP, ASPPHead, Classifier, DANetHead, EncHead, FCNHead, JointPyramidUpsampling, PSPHead, UPerHead,
    class_presence,
)
from omniseg.models.per_pixel.family import PerPixelSettings


def set_stage_dilations(body: nn.Module, dilations: Sequence[int]) -> None:
    """Give a timm ResNet's stages `dilations` (one per stage, strides unchanged) as MMSeg's ResNet with
    contract_dilation: a dilated stage's first block at half the dilation; a Bottleneck dilates its 3x3, a
    BasicBlock only its first 3x3 (timm dilates both)."""
    if len(dilations) != 4 or not hasattr(body, "layer4"):
        raise ValueError("model.stage_dilations: four dilations, for a ResNet backbone")
    for index, dilation in enumerate(dilations):
        stage = getattr(body, f"layer{index + 1}")
        for number, block in enumerate(stage):
            first = dilation // 2 if number == 0 and dilation > 1 else dilation
            convs = [(block.conv2, first)] if hasattr(block, "conv3") else [(block.conv1, first), (block.conv2, 1)]
            for conv, d in convs:
                conv.dilation, conv.padding = (int(d), int(d)), (int(d), int(d))


def set_multi_grid(body: nn.Module, base: int, grid: Sequence[int]) -> None:
    """Dilate block i of a ResNet's res5 by `base` x grid[i % len(grid)] (every 3x3 conv of the block)."""
    if not hasattr(body, "layer4") or not grid:
        raise ValueError("model.multi_grid: a non-empty list of multipliers, for a ResNet backbone")
    for number, block in enumerate(body.layer4):
        d = int(base * grid[number % len(grid)])
        for conv in ([block.conv2] if hasattr(block, "conv3") else [block.conv1, block.conv2]):
            conv.dilation, conv.padding = (d, d), (d, d)


class GatedSCNNHead(nn.Module):
    """Gated-SCNN's fusion: ASPP on res5 with an edge branch (the fused boundary map, resized to res5
    and embedded by 1x1 conv), 1x1 projection (no BN, as the original), upsample to res2, concatenate
    with a 48-channel 1x1 of res2, two 3x3 convs, classifier. The shape stream lives in the model.
    `fine_norm=False` leaves the fine 1x1 conv bare and `classifier_bias=False` drops the classifier's
    bias, as the released WideResNet-38 model."""

    def __init__(self, cin: int, fine_channels: int, num_classes: int, width: int = 256,
                 rates: Sequence[int] = (12, 24, 36), dropout: float = 0.1, fine_norm: bool = True,
                 classifier_bias: bool = True):
        super().__init__()
        self.edge_embed = ConvNormAct(1, width, kernel_size=1, norm="bn")
        self.aspp = ASPP(cin, width, rates, extra=width, project_bn=False)
        self.fine = ConvNormAct(fine_channels, 48, kernel_size=1, norm="bn" if fine_norm else None,
                                activation=fine_norm)
        self.fuse = nn.Sequential(ConvNormAct(width + 48, width, norm="bn"), ConvNormAct(width, width, norm="bn"))
        self.classifier = Classifier(width, num_classes, dropout)
        if not classifier_bias:
            self.classifier[1] = nn.Conv2d(width, num_classes, 1, bias=False)

    def forward(self, x: torch.Tensor, fine: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
        edge = self.edge_embed(F.interpolate(acts, size=x.shape[-2:], mode="bilinear", align_corners=True))
        y = F.interpolate(self.aspp(x, edge), size=fine.shape[-2:], mode="bilinear", align_corners=True)
        return self.classifier(self.fuse(torch.cat([y, self.fine(fine)], dim=1)))


class PerPixelSegmenter(Segmenter):
    """Backbone (dilated, output stride 8 or 16; or stride 32 + JPU) -> head -> per-pixel class logits.

    Args:
        settings: the `model` section (PerPixelSettings, or a mapping checked against it).
        num_classes: K.
        thing_ids: kept for the contract (semantic only).
    """

    settings_class = PerPixelSettings
    tasks = ("semantic",)
    training_only = ("aux_head", "se_classifier")
    raw_output_names = ("sem_seg",)

    def __init__(self, settings: PerPixelSettings | Mapping, num_classes: int, thing_ids: Sequence[int] = ()):
        super().__init__(settings, num_classes, thing_ids)
        s = self.settings
        self.ignore_index = 255
        self.neck_name = s.neck
        output_stride = 32 if self.neck_name == "jpu" else s.output_stride  # the JPU replaces the dilation
        options = s.backbone_options()
        if output_stride != 32:
            options["output_stride"] = output_stride
        self.backbone = build_backbone(s.backbone, **options)
        if s.stage_dilations is not None:
            set_stage_dilations(self.backbone.body, s.stage_dilations)
        if s.multi_grid is not None:
            res5_dilation = s.stage_dilations[3] if s.stage_dilations is not None else 32 // output_stride
            set_multi_grid(self.backbone.body, res5_dilation, s.multi_grid)
        specs = self.backbone.specs
        top_channels = specs["res5"].channels
        self.neck = None
        if self.neck_name == "jpu":
            self.neck = JointPyramidUpsampling([specs[n].channels for n in ("res3", "res4", "res5")], s.jpu_width,
                                               align_corners=s.jpu_align_corners)
            top_channels = self.neck.out_channels
        width, dropout = s.head_width, s.dropout
        rates, bins = tuple(s.aspp_rates), tuple(s.psp_bins)
        if self.arch == "fcn":
            self.head = FCNHead(top_channels, num_classes, width, dropout)
        elif self.arch == "pspnet":
            self.head = PSPHead(top_channels, num_classes, width, bins, dropout, branch_width=s.psp_branch_width)
        elif self.arch == "danet":
            self.head = DANetHead(top_channels, num_classes, width, dropout, pam_channels=s.pam_channels)
        elif self.arch == "deeplabv3":
            self.head = ASPPHead(top_channels, num_classes, width, rates, dropout, project=s.aspp_project)
        elif self.arch == "encnet":
            lateral_channels = [specs[n].channels for n in ("res3", "res4")] if s.enc_lateral else []
            self.head = EncHead(top_channels, num_classes, width, s.num_codes, dropout, lateral_channels)
        elif self.arch == "upernet":
            if self.neck is not None:
                raise ValueError("UPerNet reads every backbone level: model.neck must be null")
            self.head = UPerHead([specs[n].channels for n in ("res2", "res3", "res4", "res5")], num_classes, width,
                                 bins, dropout)
        else:
            from omniseg.models.per_pixel.gscnn import EdgeFusion, ShapeStream

            missing = [n for n in (s.shape_level, s.gscnn_fine_level, *s.shape_gate_levels) if n not in specs]
            if missing:
                raise ValueError(f"Gated-SCNN reads {', '.join(missing)}, which backbone {s.backbone} does not give "
                                 f"(it gives {', '.join(specs)})")
            self.shape_stream = ShapeStream(specs[s.shape_level].channels,
                                            [specs[n].channels for n in s.shape_gate_levels], s.shape_width,
                                            stem=s.shape_stem)
            self.edge_fusion = EdgeFusion(*s.canny_thresholds)
            self.head = GatedSCNNHead(top_channels, specs[s.gscnn_fine_level].channels, num_classes, width, rates,
                                      dropout, fine_norm=s.gscnn_fine_norm, classifier_bias=s.gscnn_classifier_bias)
        loss = s.loss
        default_aux = 0.4 if self.arch in ("fcn", "pspnet", "deeplabv3", "upernet", "encnet") else 0.0
        self.aux_weight = default_aux if loss.aux_weight is None else loss.aux_weight
        self.aux_level = s.aux_level
        self.aux_head = (FCNHead(specs[self.aux_level].channels, num_classes, s.aux_width, dropout=dropout)
                         if self.aux_weight > 0 else None)
        # EncNet's SE-loss: which classes the image holds, predicted from the encoded context.
        self.se_weight = loss.se_weight if self.arch == "encnet" else 0.0
        self.se_classifier = nn.Linear(width, num_classes) if self.se_weight > 0 else None
        self.branch_weight = loss.branch_weight  # DANet: each attention branch's own CE
        self.edge_weight = loss.edge_weight  # Gated-SCNN's weights
        self.edge_att_weight = loss.edge_attention_weight
        self.dual_weight = loss.dual_task_weight
        self.edge_radius = loss.edge_radius
        self.image_weighted_ce = loss.image_weighted_ce
        self.image_weight_upper_bound = loss.image_weight_upper_bound
        if self.image_weighted_ce and self.arch != "gscnn":
            raise ValueError(f"model.loss.image_weighted_ce weights Gated-SCNN's loss; arch {self.arch} has none")
        if self.image_weighted_ce and loss.class_weights is not None:
            raise ValueError("model.loss.image_weighted_ce computes the class weights of each image: "
                             "model.loss.class_weights must be null")
        self.register_buffer("class_weights", class_weight_tensor(loss.class_weights, num_classes), persistent=False)
        if s.activation_checkpointing:
            self.set_activation_checkpointing(True)

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute the backbone stages in backward (timm's gradient checkpointing)."""
        body = getattr(self.backbone, "body", None)
        if not hasattr(body, "set_grad_checkpointing"):
            raise ValueError(f"model.activation_checkpointing: the {self.settings.backbone} backbone has no "
                             f"gradient checkpointing (timm ResNets and ViTs do)")
        body.set_grad_checkpointing(enabled)

    # -- network -------------------------------------------------------------------------------
    def _unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.pixel_std + self.pixel_mean).clamp(0, 255)

    def _canny_input(self, x: torch.Tensor) -> torch.Tensor:
        """The uint8 image Gated-SCNN's Canny reads. `canny_input: normalized_uint8` reproduces the released
        model's input, the normalised image cast to uint8 (the edges its fusion weights were trained on)."""
        if self.settings.canny_input == "normalized_uint8":
            from omniseg.models.per_pixel.gscnn import numpy_uint8_cast

            return numpy_uint8_cast(x)
        return self._unnormalize(x).round().to(torch.uint8)

    def network(self, x: torch.Tensor, *, training_outputs: bool = False) -> dict:
        """Normalised images -> {"sem_seg": logits at the head's stride, and with `training_outputs`
        the auxiliary, DANet-branch, EncNet SE-loss and Gated-SCNN boundary logits}."""
        feats = self.backbone(x)
        top = self.neck([feats["res3"], feats["res4"], feats["res5"]]) if self.neck is not None else feats["res5"]
        out: dict = {}
        if self.arch == "gscnn":
            s = self.settings
            edge = self.shape_stream(feats[s.shape_level], [feats[n] for n in s.shape_gate_levels])
            edge = F.interpolate(edge, size=x.shape[-2:], mode="bilinear", align_corners=True)
            acts = self.edge_fusion(edge, self._canny_input(x))
            out["sem_seg"] = self.head(top, feats[s.gscnn_fine_level], acts)
            out["edge"] = edge
        elif self.arch == "upernet":
            out["sem_seg"] = self.head([feats[n] for n in ("res2", "res3", "res4", "res5")])
        elif self.arch == "encnet":
            laterals = [feats["res3"], feats["res4"]] if self.settings.enc_lateral else []
            out["sem_seg"], context = self.head(top, laterals, context=True)
            if training_outputs and self.se_classifier is not None:
                out["se"] = self.se_classifier(context)
        elif self.arch == "danet" and training_outputs:
            out["sem_seg"], branches = self.head(top, branches=True)
            out.update(branches)
        else:
            out["sem_seg"] = self.head(top)
        if training_outputs and self.aux_head is not None:
            out["aux"] = self.aux_head(feats[self.aux_level])
        return out

    def forward_raw(self, x: torch.Tensor) -> dict:
        """Normalised images [B,3,H,W] (H, W multiples of 32) -> {"sem_seg": logits [B,K,H,W]}."""
        logits = self.network(x)["sem_seg"]
        return {"sem_seg": F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)}

    # -- training ------------------------------------------------------------------------------
    def _ce(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(logits, labels, weight=self.class_weights, ignore_index=self.ignore_index)

    def _seg_ce(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The main segmentation CE; with `image_weighted_ce`, Gated-SCNN's per-image class-weighted one."""
        if not self.image_weighted_ce:
            return self._ce(logits, labels)
        from omniseg.models.per_pixel.gscnn import image_weighted_cross_entropy

        logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        return image_weighted_cross_entropy(logits, labels, self.image_weight_upper_bound, self.ignore_index)

    def losses(self, images: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        """images: uint8 [B,3,Hp,Wp] padded; targets: the engine's semantic targets (see module doc)."""
        labels = label_map_from_targets(targets, tuple(images.shape[-2:]), self.ignore_index)
        out = self.network(self.normalize(images), training_outputs=True)
        with torch.autocast(images.device.type, enabled=False):
            losses = {"loss_ce": self._seg_ce(out["sem_seg"], labels)}
            if "aux" in out:
                losses["loss_aux"] = self.aux_weight * self._ce(out["aux"], labels)
            for branch in ("pam", "cam"):
                if branch in out:
                    losses[f"loss_{branch}"] = self.branch_weight * self._ce(out[branch], labels)
            if "se" in out:
                presence = class_presence(labels, self.num_classes, self.ignore_index)
                losses["loss_se"] = self.se_weight * F.binary_cross_entropy_with_logits(out["se"].float(), presence)
            if "edge" in out:
                losses.update(self._boundary_losses(out, labels, targets))
        return losses

    def _boundary_losses(self, out: dict, labels: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        from omniseg.models.per_pixel.gscnn import (
            balanced_edge_bce, dual_task_loss, image_weighted_cross_entropy, label_boundaries,
        )

        edge = out["edge"].float()[:, 0]
        valid = labels != self.ignore_index
        losses = {"loss_edge": self.edge_weight * balanced_edge_bce(
            edge, label_boundaries(labels, self.edge_radius, self.ignore_index), valid)}
        seg = F.interpolate(out["sem_seg"].float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        # Edge attention: the segmentation CE again, only where the shape stream is confident of a boundary.
        attended = torch.where(torch.sigmoid(edge.detach()) > 0.8, labels, self.ignore_index)
        if self.image_weighted_ce:  # weights from the attended pixels' labels, as the official loss
            att = image_weighted_cross_entropy(seg, attended, self.image_weight_upper_bound, self.ignore_index)
        elif (attended != self.ignore_index).any():
            att = F.cross_entropy(seg, attended, weight=self.class_weights, ignore_index=self.ignore_index)
        else:
            att = seg.sum() * 0.0
        losses["loss_edge_att"] = self.edge_att_weight * att
        generators = None
        if targets and all("seed" in t for t in targets):
            generators = [torch.Generator().manual_seed(int(t["seed"])) for t in targets]
        losses["loss_dual"] = self.dual_weight * dual_task_loss(seg, labels, self.num_classes, self.ignore_index,
                                                                generators=generators)
        return losses

    # -- inference -----------------------------------------------------------------------------
    def infer(self, images: torch.Tensor, image_sizes: list[tuple[int, int]], output_sizes: list[tuple[int, int]],
              tasks: list[str], *, return_raw: bool = False, semantic_scores: bool = False) -> list[dict]:
        """Logits upsampled to the padded input, then per image cropped, resized and argmaxed."""
        logits = self.network(self.normalize(images))["sem_seg"]
        padded = tuple(images.shape[-2:])
        logits = F.interpolate(logits.float(), size=padded, mode="bilinear", align_corners=False)
        return semantic_results(logits, image_sizes, output_sizes, tasks, return_raw, semantic_scores)
