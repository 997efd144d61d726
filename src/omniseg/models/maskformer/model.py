"""MaskFormer and Mask2Former as configurations of one meta-architecture.

backbone -> pixel decoder -> transformer decoder -> (criterion | post-processing), as in the papers'
figures. The network proper (`forward_raw`) takes a normalised float batch and returns raw query
predictions, so it can be exported; `losses` and `predict` wrap it for training and inference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from omniseg.models.backbones import build_backbone
from omniseg.models.base import Segmenter, cfg_get
from omniseg.models.maskformer.criterion import SetCriterion
from omniseg.models.maskformer.matcher import HungarianMatcher
from omniseg.models.maskformer.postprocess import check_mode, postprocess



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
        cfg: the `model` section of a config (see configs/_base_.yaml).
        num_classes: K, the number of classes (no-object is added internally).
        thing_ids: contiguous ids of thing classes (panoptic / instance post-processing).
    """

    learned_query_content = True  # OneFormer builds its queries from the task token instead
    default_task = None  # the task forward_raw predicts, for task-conditioned models (OneFormer)
    training_only = ("criterion", "mask_pilot")  # children (and parameters) that inference never uses

    def __init__(self, cfg: Mapping, num_classes: int, thing_ids: Sequence[int] = ()):
        super().__init__()
        self.arch = cfg_get(cfg, "arch", "mask2former")
        self.num_classes = num_classes
        self.thing_ids = sorted(int(i) for i in thing_ids)
        hidden = int(cfg_get(cfg, "hidden_dim", 256))
        conv_dim = int(cfg_get(cfg, "conv_dim", 256))
        mask_dim = int(cfg_get(cfg, "mask_dim", 256))
        self.backbone = build_backbone(
            cfg_get(cfg, "backbone", "resnet50"),
            norm=cfg_get(cfg, "backbone_norm", "bn"),
            weights=cfg_get(cfg, "backbone_weights"),
            drop_path_rate=float(cfg_get(cfg, "drop_path_rate", 0.0)),
            **dict(cfg_get(cfg, "backbone_kwargs", {}) or {}),
        )
        specs = self.backbone.specs
        if self.arch in ("mask2former", "oneformer"):
            from omniseg.models.maskformer.masked_decoder import MultiScaleMaskedTransformerDecoder
            from omniseg.models.maskformer.msdeform_pixel_decoder import MSDeformAttnPixelDecoder

            self.pixel_decoder = MSDeformAttnPixelDecoder(
                specs, conv_dim=conv_dim, mask_dim=mask_dim, num_encoder_layers=int(cfg_get(cfg, "enc_layers", 6)),
                num_heads=int(cfg_get(cfg, "nheads", 8)), dim_feedforward=int(cfg_get(cfg, "enc_dim_feedforward", 1024)),
                num_points=int(cfg_get(cfg, "enc_num_points", 4)), common_stride=int(cfg_get(cfg, "common_stride", 4)),
            )
            self.predictor = MultiScaleMaskedTransformerDecoder(
                conv_dim, num_classes=num_classes, hidden_dim=hidden, num_queries=int(cfg_get(cfg, "num_queries", 100)),
                nheads=int(cfg_get(cfg, "nheads", 8)), dim_feedforward=int(cfg_get(cfg, "dim_feedforward", 2048)),
                dec_layers=int(cfg_get(cfg, "dec_layers", 9)), mask_dim=mask_dim, pre_norm=bool(cfg_get(cfg, "pre_norm", False)),
                enforce_input_project=bool(cfg_get(cfg, "enforce_input_project", False)),
                learned_query_content=self.learned_query_content,
            )
        elif self.arch == "maskformer":
            from omniseg.models.maskformer.detr_decoder import DetrTransformerPredictor
            from omniseg.models.maskformer.fpn_pixel_decoder import FPNPixelDecoder

            self.pixel_decoder = FPNPixelDecoder(specs, conv_dim=conv_dim, mask_dim=mask_dim)
            self.predictor = DetrTransformerPredictor(
                specs["res5"].channels, num_classes=num_classes, hidden_dim=hidden,
                num_queries=int(cfg_get(cfg, "num_queries", 100)), nheads=int(cfg_get(cfg, "nheads", 8)),
                dropout=float(cfg_get(cfg, "dropout", 0.1)), dim_feedforward=int(cfg_get(cfg, "dim_feedforward", 2048)),
                enc_layers=int(cfg_get(cfg, "enc_layers", 0)), dec_layers=int(cfg_get(cfg, "dec_layers", 6)),
                pre_norm=bool(cfg_get(cfg, "pre_norm", False)), mask_dim=mask_dim,
            )
        else:
            raise ValueError(f"unknown mask-classification arch {self.arch!r} (mask2former | maskformer | oneformer)")

        loss = dict(cfg_get(cfg, "loss", {}) or {})
        mask_loss = loss.get("mask_loss", "bce")
        num_points = int(loss.get("train_num_points", 12544))
        weights = {"loss_ce": float(loss.get("class_weight", 2.0)), "loss_mask": float(loss.get("mask_weight", 5.0)),
                   "loss_dice": float(loss.get("dice_weight", 5.0))}
        matcher = HungarianMatcher(cost_class=weights["loss_ce"], cost_mask=weights["loss_mask"],
                                   cost_dice=weights["loss_dice"], num_points=num_points, mask_loss=mask_loss)
        self.deep_supervision = bool(loss.get("deep_supervision", True))
        self.criterion = SetCriterion(
            num_classes, matcher, weight_dict=weights, eos_coef=float(loss.get("no_object_weight", 0.1)),
            num_points=num_points, oversample_ratio=float(loss.get("oversample_ratio", 3.0)),
            importance_sample_ratio=float(loss.get("importance_sample_ratio", 0.75)), mask_loss=mask_loss,
        )
        mp = dict(cfg_get(cfg, "mp", {}) or {})
        self.mask_pilot = None  # MP-Former's mask-piloted training (training only)
        if mp.get("enabled", False):
            if self.arch != "mask2former":
                raise ValueError("model.mp (mask-piloted training) needs arch=mask2former (masked attention)")
            from omniseg.models.mp_former import MaskPilot, PilotSettings

            self.mask_pilot = MaskPilot(num_classes, hidden, PilotSettings.from_config(mp))
        if bool(cfg_get(cfg, "activation_checkpointing", False)):
            self.set_activation_checkpointing(True)
        test = dict(cfg_get(cfg, "test", {}) or {})
        self.object_mask_threshold = float(test.get("object_mask_threshold", 0.8))
        self.overlap_threshold = float(test.get("overlap_threshold", 0.8))
        self.topk = int(test.get("topk", 100))
        self.postprocess_mode = check_mode(str(test.get("postprocess", "official")))
        self.register_pixel_stats(cfg)

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

    @torch.no_grad()
    def predict(self, images: torch.Tensor, image_sizes: Sequence[tuple[int, int]],
                output_sizes: Sequence[tuple[int, int]] | None = None,
                tasks: Sequence[str] = ("semantic", "panoptic", "instance"), *, return_raw: bool = False) -> list[dict]:
        """Padded uint8 images -> one prediction dict per image (docs/design.md) at `output_sizes`.
        With `return_raw`, "raw" holds the image's raw outputs (keyed by task when each task had its
        own decoder pass)."""
        passes = self.decoder_passes(images, tasks)
        output_sizes = output_sizes or image_sizes
        results = [{} for _ in image_sizes]
        for pass_tasks, outputs in passes:
            for i, (image_size, out_size) in enumerate(zip(image_sizes, output_sizes)):
                results[i].update(postprocess(
                    {"pred_logits": outputs["pred_logits"][i].float(), "pred_masks": outputs["pred_masks"][i].float()},
                    image_size=tuple(image_size), output_size=tuple(out_size), tasks=pass_tasks,
                    thing_ids=self.thing_ids, padded_size=tuple(images.shape[-2:]),
                    object_mask_threshold=self.object_mask_threshold, overlap_threshold=self.overlap_threshold,
                    topk=self.topk, mode=self.postprocess_mode,
                ))
                if return_raw:
                    raw = {k: v[i] for k, v in outputs.items() if k in ("pred_logits", "pred_masks")}
                    if len(passes) == 1:
                        results[i]["raw"] = raw
                    else:
                        results[i].setdefault("raw", {})[pass_tasks[0]] = raw
        return results
