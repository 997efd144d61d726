"""The model contract: what every omniseg segmenter provides, whatever its family.

The engine, evaluation, export, the Predictor and the hub rely on this class only: nothing outside the
models package probes a model for optional attributes. A family subclasses `Segmenter`, sets the class
attributes that differ from the defaults below, and implements `losses` and `infer` (and `forward_raw`
when its network exports). `tests/test_model_contract.py` checks every preset against this contract.

    tasks              what `predict` can produce (subset of omniseg.tasks.TASKS)
    default_task       task-conditioned models (OneFormer): the task `forward_raw` predicts; else None
    training_only      child modules / parameters that inference never uses (left out of exports)
    postprocess_modes  post-processing modes `set_postprocess_mode` accepts; () for one fixed way
    raw_output_names   what `forward_raw` returns, in export order; () when the family does not export
    single_image_export  True when an exported graph takes one image at a time (detectors)
    semantic_scores_are_probabilities  "semantic_scores" are probabilities (mask classification), not logits
    settings, arch, num_classes, thing_ids, seen_classes, backbone
    losses(images, targets) -> {name: scalar}            training
    predict(images, image_sizes, output_sizes, tasks)    inference, one dict per image (docs/design.md)
    forward_raw(x, **raw_forward_options(task))          the exportable network (normalised input)
    export_refusal() -> None | reason                    why the network cannot be exported, if so
    export_metadata() -> dict                            post-processing parameters for exported outputs
    query_layers(x) -> None | per-layer predictions      query decoders: every prediction set, in order
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from omniseg.models.settings import IMAGENET_MEAN, IMAGENET_STD, ModelSettings
from omniseg.tasks import TASKS, check_tasks


class Segmenter(nn.Module, abc.ABC):
    """Base of the model families: normalisation inside the model (callers and exported graphs take uint8
    RGB), one `forward` that trains with targets and predicts without, and the contract above."""

    settings_class: type[ModelSettings] = ModelSettings
    tasks: tuple[str, ...] = TASKS
    default_task: str | None = None
    training_only: tuple[str, ...] = ()
    postprocess_modes: tuple[str, ...] = ()
    raw_output_names: tuple[str, ...] = ()
    single_image_export = False  # detectors: an exported graph takes one image (detections per image vary in number)
    # "semantic_scores" are class probabilities (mask classification: softmax-weighted mask probabilities)
    # rather than logits; test-time augmentation soft-maxes logits only before averaging views
    semantic_scores_are_probabilities = False
    num_classes: int
    thing_ids: list[int] = []
    backbone: nn.Module

    def __init__(self, settings: ModelSettings | Mapping, num_classes: int, thing_ids: Sequence[int] = ()):
        """Checks `settings` against `settings_class` (a mapping is completed with the declared defaults)
        and keeps them as `self.settings`; sets `arch`, `num_classes`, `thing_ids` and the pixel
        statistics (model.pixel_mean / pixel_std, 0-255 RGB, as non-persistent buffers that follow the
        device). Families build their modules after this."""
        super().__init__()
        self.settings = self.settings_class.coerce(settings)
        self.arch = self.settings.arch
        self.num_classes = int(num_classes)
        self.thing_ids = sorted({int(i) for i in thing_ids})
        mean, std = self.settings.pixel_mean or IMAGENET_MEAN, self.settings.pixel_std or IMAGENET_STD
        self.register_buffer("pixel_mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or float [0,255] RGB -> normalised float."""
        return (images.float() - self.pixel_mean) / self.pixel_std

    def forward(self, images: torch.Tensor, targets: list[dict] | None = None, **predict_kwargs):
        """Training mode with targets -> loss dict; otherwise -> predictions (see `predict`)."""
        if self.training and targets is not None:
            return self.losses(images, targets)
        image_sizes = predict_kwargs.pop("image_sizes", [tuple(images.shape[-2:])] * images.shape[0])
        return self.predict(images, image_sizes, **predict_kwargs)

    # -- training ------------------------------------------------------------------------------
    @abc.abstractmethod
    def losses(self, images: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        """images: uint8 [B,3,Hp,Wp] padded; targets: per image {"labels": int64 [N], "masks": bool [N,Hp,Wp]}
        (one mask per class for the semantic task), optionally "seed" (int: the image's own RNG stream for
        random loss points) and "task". Returns named scalar losses whose sum is minimised."""

    @property
    def seen_classes(self) -> int:
        """How many of the first classes the model predicts: all of them, except for a class-incremental
        model part-way through its steps (evaluation then ignores the ground truth of the others)."""
        return self.num_classes

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute activations in backward instead of storing them (less training memory)."""
        if enabled:
            raise ValueError(f"{type(self).__name__} has no activation checkpointing")

    # -- inference -----------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: torch.Tensor, image_sizes: Sequence[tuple[int, int]],
                output_sizes: Sequence[tuple[int, int]] | None = None, tasks: Sequence[str] | None = None, *,
                return_raw: bool = False, semantic_scores: bool = False) -> list[dict]:
        """Padded uint8 images [B,3,Hp,Wp] -> one dict per image, at `output_sizes` (default: `image_sizes`,
        the (h, w) of each image inside the padding):
            "semantic":  int64 [H,W] class ids
            "panoptic":  {"segment_map": int64 [H,W] (0 = void), "segments_info": [{"id", "category",
                         "isthing", "score"}]}
            "instances": {"masks": bool [n,H,W], "labels": int64 [n], "scores": float [n], "boxes": float [n,4]}
        for the `tasks` asked (default: every task in `self.tasks`; others are refused). `return_raw` adds
        "raw": the image's raw network outputs. `semantic_scores` adds "semantic_scores": float [K,H,W], the
        per-class scores whose argmax is "semantic", from the families whose semantic output is such an argmax
        (per-pixel, SegViT, mask classification; BlendMask's is a merge of instances and stuff and has none);
        tiled inference averages them where tiles overlap."""
        tasks = check_tasks(self.tasks if tasks is None else tasks, self.tasks, what=self.describe())
        sizes = [(int(h), int(w)) for h, w in image_sizes]
        outs = [(int(h), int(w)) for h, w in (output_sizes or sizes)]
        if len(sizes) != images.shape[0] or len(outs) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(sizes)} image sizes and {len(outs)} output sizes")
        return self.infer(images, sizes, outs, tasks, return_raw=return_raw, semantic_scores=semantic_scores)

    @abc.abstractmethod
    def infer(self, images: torch.Tensor, image_sizes: list[tuple[int, int]], output_sizes: list[tuple[int, int]],
              tasks: list[str], *, return_raw: bool = False, semantic_scores: bool = False) -> list[dict]:
        """`predict` after its checks: the tasks are supported, one size per image."""

    def query_layers(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]] | None:
        """Query-based models: normalised images -> the predictions {"pred_logits" [B,Q,K+1], "pred_masks"
        [B,Q,h,w]} of every prediction set in decoder order (Mask2Former's starts with its initial queries),
        the last being the output; for layer consistency and the layer-by-layer view. None for models
        without a query decoder."""
        return None

    def set_postprocess_mode(self, mode: str) -> None:
        """Choose among `postprocess_modes` (e.g. "official" | "fast")."""
        if mode not in self.postprocess_modes:
            offered = (f"offers {', '.join(self.postprocess_modes)}" if self.postprocess_modes
                       else "has one fixed post-processing")
            raise ValueError(f"post-processing mode {mode!r}: {self.describe()} {offered}")
        self.postprocess_mode = mode

    def is_training_only(self, key: str) -> bool:
        """Whether state-dict `key` belongs to a `training_only` child or parameter (inference checkpoints
        may lack it: it keeps its initialisation)."""
        return key.split(".", 1)[0] in self.training_only

    def describe(self) -> str:
        """A short name for messages: the class and its arch."""
        arch = getattr(self, "arch", None)
        return f"{type(self).__name__} ({arch})" if arch and arch != type(self).__name__.lower() else type(self).__name__

    # -- export --------------------------------------------------------------------------------
    def forward_raw(self, x: torch.Tensor, **options) -> dict[str, torch.Tensor]:
        """Normalised images [B,3,H,W] (H, W multiples of 32) -> the raw outputs named `raw_output_names`."""
        raise ValueError(self.export_refusal() or f"{self.describe()} has no exportable network")

    def export_refusal(self) -> str | None:
        """None when `forward_raw` can be exported; otherwise the reason it cannot, for the user."""
        if not self.raw_output_names:
            return f"{self.describe()} has no exportable network"
        return None

    def raw_forward_options(self, task: str | None = None) -> dict:
        """The keyword arguments an exported graph passes to `forward_raw` (inference-only outputs; the
        task of a task-conditioned model)."""
        if task is not None:
            raise ValueError(f"--task applies to task-conditioned models (OneFormer), not {self.describe()}")
        return {}

    def export_metadata(self) -> dict:
        """What post-processing the exported outputs needs besides them (written to the export sidecar)."""
        return {"thing_ids": list(self.thing_ids)}


def class_weight_tensor(weights, num_classes: int, key: str = "model.loss.class_weights") -> torch.Tensor | None:
    """Per-class loss weights from the settings as a float tensor of K entries (None: unweighted)."""
    if weights is None:
        return None
    if len(weights) != num_classes:
        raise ValueError(f"{key} has {len(weights)} entries for {num_classes} classes")
    if any(float(w) < 0 for w in weights):
        raise ValueError(f"{key} must not be negative, got {list(weights)}")
    return torch.tensor([float(w) for w in weights], dtype=torch.float32)


def semantic_results(scores: torch.Tensor, image_sizes: Sequence[tuple[int, int]],
                     output_sizes: Sequence[tuple[int, int]] | None, tasks: Sequence[str] = ("semantic",),
                     return_raw: bool = False, with_scores: bool = False) -> list[dict]:
    """Per-class scores at the padded batch size [B,K,Hp,Wp] -> [{"semantic": int64 [H,W]}] per image:
    cropped to its size inside the padding, resized to its output size (default: image size), argmax
    (`with_scores`: the resized scores too, as "semantic_scores").
    Used by the per-pixel families' `predict` and for their exported outputs alike."""
    results = []
    for i, ((h, w), out_size) in enumerate(zip(image_sizes, output_sizes or image_sizes)):
        s = scores[i:i + 1, :, :h, :w].float()
        if tuple(out_size) != (h, w):
            s = F.interpolate(s, size=tuple(out_size), mode="bilinear", align_corners=False)
        result = {"semantic": s[0].argmax(0)} if "semantic" in tasks else {}
        if with_scores and "semantic" in tasks:
            result["semantic_scores"] = s[0]
        if return_raw:
            result["raw"] = {"sem_seg": scores[i]}
        results.append(result)
    return results


def label_map_from_targets(targets: Sequence[dict], size: tuple[int, int], ignore_index: int = 255) -> torch.Tensor:
    """Engine targets ({"labels": [N], "masks": bool [N,H,W]}, one mask per class for the semantic task)
    -> int64 label maps [B,H,W]; pixels in no mask (padding, void) are `ignore_index`."""
    out = []
    for t in targets:
        sem = torch.full(size, ignore_index, dtype=torch.int64, device=t["masks"].device)
        for label, mask in zip(t["labels"].tolist(), t["masks"]):
            sem[mask] = int(label)
        out.append(sem)
    return torch.stack(out)
