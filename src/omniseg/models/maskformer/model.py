"""MaskFormer and Mask2Former as configurations of one meta-architecture.

backbone -> pixel decoder -> transformer decoder -> (criterion | post-processing), as in the papers'
figures. The network proper (`forward_raw`) takes a normalised float batch and returns raw query
predictions, so it can be exported; `losses` and `predict` wrap it for training and inference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from omniseg.models.backbones import build_backbone
from omniseg.models.base import Segmenter, class_weight_tensor
from omniseg.models.maskformer.criterion import SetCriterion
from omniseg.models.maskformer.family import MaskFormerSettings
from omniseg.models.maskformer.matcher import HungarianMatcher
from omniseg.models.maskformer.postprocess import MODES, postprocess



def _to_float(obj):
    if isinstance(obj, torch.Tensor):
        return obj.float()
    if isinstance(obj, dict):
        return {k: _to_float(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_float(v) for v in obj)
    return obj


class MaskFormer(Segmenter):
    """Mask-classification segmenter. `arch="mask2former"` uses the MSDeformAttn pixel decoder and the
    masked-attention decoder; `arch="maskformer"` the FPN pixel decoder and a DETR decoder on res5.

    Args:
        settings: the `model` section (MaskFormerSettings, or a mapping checked against it).
        num_classes: K, the number of classes (no-object is added internally).
        thing_ids: contiguous ids of thing classes (panoptic / instance post-processing).
    """

    settings_class = MaskFormerSettings
    learned_query_content = True  # OneFormer builds its queries from the task token instead
    training_only = ("criterion", "mask_pilot")  # children (and parameters) that inference never uses
    postprocess_modes = MODES
    raw_output_names = ("pred_logits", "pred_masks")
    semantic_scores_are_probabilities = True  # sum over queries of class probability x mask probability

    def __init__(self, settings: MaskFormerSettings | Mapping, num_classes: int, thing_ids: Sequence[int] = ()):
        super().__init__(settings, num_classes, thing_ids)
        s = self.settings
        self.backbone = build_backbone(s.backbone, **s.backbone_options())
        specs = self.backbone.specs
        if self.arch in ("mask2former", "oneformer"):
            from omniseg.models.maskformer.masked_decoder import MultiScaleMaskedTransformerDecoder
            from omniseg.models.maskformer.msdeform_pixel_decoder import MSDeformAttnPixelDecoder

            self.pixel_decoder = MSDeformAttnPixelDecoder(
                specs, conv_dim=s.conv_dim, mask_dim=s.mask_dim, num_encoder_layers=s.enc_layers,
                num_heads=s.nheads, dim_feedforward=s.enc_dim_feedforward, num_points=s.enc_num_points,
                common_stride=s.common_stride,
            )
            self.predictor = MultiScaleMaskedTransformerDecoder(
                s.conv_dim, num_classes=num_classes, hidden_dim=s.hidden_dim, num_queries=s.num_queries,
                nheads=s.nheads, dim_feedforward=s.dim_feedforward, dec_layers=s.dec_layers, mask_dim=s.mask_dim,
                pre_norm=s.pre_norm, enforce_input_project=s.enforce_input_project,
                learned_query_content=self.learned_query_content,
            )
        else:
            from omniseg.models.maskformer.detr_decoder import DetrTransformerPredictor
            from omniseg.models.maskformer.fpn_pixel_decoder import FPNPixelDecoder

            self.pixel_decoder = FPNPixelDecoder(specs, conv_dim=s.conv_dim, mask_dim=s.mask_dim)
            self.predictor = DetrTransformerPredictor(
                specs["res5"].channels, num_classes=num_classes, hidden_dim=s.hidden_dim, num_queries=s.num_queries,
                nheads=s.nheads, dropout=s.dropout, dim_feedforward=s.dim_feedforward, enc_layers=s.enc_layers,
                dec_layers=s.dec_layers, pre_norm=s.pre_norm, mask_dim=s.mask_dim,
            )

        loss = s.loss
        weights = {"loss_ce": loss.class_weight, "loss_mask": loss.mask_weight, "loss_dice": loss.dice_weight}
        matcher = HungarianMatcher(cost_class=weights["loss_ce"], cost_mask=weights["loss_mask"],
                                   cost_dice=weights["loss_dice"], num_points=loss.train_num_points,
                                   mask_loss=loss.mask_loss)
        self.deep_supervision = loss.deep_supervision
        self.criterion = SetCriterion(
            num_classes, matcher, weight_dict=weights, eos_coef=loss.no_object_weight,
            num_points=loss.train_num_points, oversample_ratio=loss.oversample_ratio,
            importance_sample_ratio=loss.importance_sample_ratio, mask_loss=loss.mask_loss,
            class_weights=class_weight_tensor(loss.class_weights, num_classes),
        )
        self.mask_pilot = None  # MP-Former's mask-piloted training (training only)
        if s.mp.enabled:
            if self.arch != "mask2former":
                raise ValueError(f"model.mp (mask-piloted training) needs arch=mask2former (masked attention), "
                                 f"not {self.arch}")
            from omniseg.models.mp_former import MaskPilot

            self.mask_pilot = MaskPilot(num_classes, s.hidden_dim, s.mp)
        if s.activation_checkpointing:
            self.set_activation_checkpointing(True)
        self.object_mask_threshold = s.test.object_mask_threshold
        self.overlap_threshold = s.test.overlap_threshold
        self.topk = s.test.topk
        self.postprocess_mode = s.test.postprocess

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute activations in backward instead of storing them (training memory for about one
        extra forward): the timm backbone's stages and every block that has an `activation_checkpointing`
        switch (the MSDeformAttn encoder's and the masked-attention decoder's layers)."""
        body = self.backbone.body
        if not hasattr(body, "set_grad_checkpointing"):
            raise ValueError(f"backbone {self.backbone.timm_name} does not support activation checkpointing")
        body.set_grad_checkpointing(enabled)
        for module in self.modules():
            if hasattr(module, "activation_checkpointing"):
                module.activation_checkpointing = enabled

    # -- network -------------------------------------------------------------------------------
    def pixel_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Normalised images -> (per-pixel mask features, multi-scale features for the decoder)."""
        return self.pixel_decoder(self.backbone(x))

    def forward_raw(self, x: torch.Tensor, aux_outputs: bool = True) -> dict:
        """Normalised images [B,3,H,W] (H, W multiples of 32) -> raw query predictions; with
        `aux_outputs=False` the last prediction set only, computed the cheaper way inference allows."""
        mask_features, multi_scale = self.pixel_features(x)
        return self.predictor(multi_scale, mask_features, aux_outputs=aux_outputs)

    def compile_network(self, **options) -> None:
        """`torch.compile` the network (`forward_raw`, hence `predict`) for inference; `options` go to
        torch.compile. It fuses the many small elementwise ops eager mode runs one by one; compiling
        takes minutes on a CPU (`omniseg bench --compile` reports the time and the speed-up, see
        docs/results.md). Each new input size compiles again; training and `losses` stay eager."""
        self.forward_raw = torch.compile(type(self).forward_raw.__get__(self), **options)

    # -- training ------------------------------------------------------------------------------
    def losses(self, images: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        """images: uint8 [B,3,Hp,Wp] padded; targets: per image {"labels": [N], "masks": bool [N,Hp,Wp]}
        and optionally an int "seed": then each image's random loss points come from its own RNG, so
        losses do not depend on how images are grouped into batches or DDP ranks."""
        generators = None
        if targets and all("seed" in t for t in targets):
            generators = [torch.Generator().manual_seed(int(t["seed"])) for t in targets]
        outputs, extra_losses = self.training_outputs(self.normalize(images), targets)
        # GT masks as float once for every prediction set's matching and losses (MP-Former's too)
        targets = [{"labels": t["labels"], "masks": t["masks"].to(images.device, torch.float32)} for t in targets]
        if not self.deep_supervision:
            outputs = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        # Matching and losses in fp32 even under autocast: costs and sigmoid-BCE are precision-sensitive.
        with torch.autocast(images.device.type, enabled=False):
            losses = self.criterion(_to_float(outputs), targets, generator=generators)
            if extra_losses is not None:
                losses.update(extra_losses(targets, generators))
            return losses

    def training_outputs(self, x: torch.Tensor, targets: list[dict]):
        """Normalised images -> (raw outputs the criterion matches to the targets, None or a callable
        (targets, generators) -> further losses, run in fp32 next to the set losses). MP-Former's
        piloted queries enter here; OneFormer overrides it."""
        if self.mask_pilot is None:
            return type(self).forward_raw(self, x), None  # eager, also after compile_network
        mask_features, multi_scale = self.pixel_features(x)
        piloted = self.mask_pilot.run_decoder(self.predictor, multi_scale, mask_features, targets)

        def pilot_losses(targets, generators):
            if not self.deep_supervision:
                piloted.piloted = piloted.piloted[-1:]
            return self.mask_pilot.losses(self.criterion, piloted, targets, generators)

        return piloted.matching, pilot_losses

    # -- inference -----------------------------------------------------------------------------
    def decoder_passes(self, images: torch.Tensor, tasks: Sequence[str]) -> list[tuple[list[str], dict]]:
        """(tasks, raw outputs) per decoder pass `predict` needs: one pass serves every task here;
        a task-conditioned model (OneFormer) runs one per task."""
        return [(list(tasks), self.forward_raw(self.normalize(images), aux_outputs=False))]

    def infer(self, images: torch.Tensor, image_sizes: list[tuple[int, int]], output_sizes: list[tuple[int, int]],
              tasks: list[str], *, return_raw: bool = False, semantic_scores: bool = False) -> list[dict]:
        """Post-processing of each decoder pass's last prediction set (see `Segmenter.predict`). With
        `return_raw`, "raw" holds the image's raw outputs (keyed by task when each task had its own pass)."""
        passes = self.decoder_passes(images, tasks)
        results = [{} for _ in image_sizes]
        for pass_tasks, outputs in passes:
            for i, (image_size, out_size) in enumerate(zip(image_sizes, output_sizes)):
                results[i].update(postprocess(
                    {"pred_logits": outputs["pred_logits"][i].float(), "pred_masks": outputs["pred_masks"][i].float()},
                    image_size=tuple(image_size), output_size=tuple(out_size), tasks=pass_tasks,
                    thing_ids=self.thing_ids, padded_size=tuple(images.shape[-2:]),
                    object_mask_threshold=self.object_mask_threshold, overlap_threshold=self.overlap_threshold,
                    topk=self.topk, return_semantic_scores=semantic_scores and "semantic" in pass_tasks,
                    mode="official" if semantic_scores else self.postprocess_mode,  # fast never forms [K,H,W]
                ))
                if return_raw:
                    raw = {k: v[i] for k, v in outputs.items() if k in self.raw_output_names}
                    if len(passes) == 1:
                        results[i]["raw"] = raw
                    else:
                        results[i].setdefault("raw", {})[pass_tasks[0]] = raw
        return results

    def query_layers(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Every prediction set of the decoder (Mask2Former: the initial queries, then after each layer;
        MaskFormer: after each layer); a task-conditioned model's for its default task."""
        raw = self.forward_raw(x)
        return [*raw.get("aux_outputs", []), {k: raw[k] for k in self.raw_output_names}]

    # -- export --------------------------------------------------------------------------------
    def raw_forward_options(self, task: str | None = None) -> dict:
        """The last prediction set only, computed the cheaper way inference allows."""
        super().raw_forward_options(task)  # refuses a task: only OneFormer is task-conditioned
        return {"aux_outputs": False}

    def export_metadata(self) -> dict:
        return {"thing_ids": list(self.thing_ids), "object_mask_threshold": self.object_mask_threshold,
                "overlap_threshold": self.overlap_threshold, "topk": self.topk}
