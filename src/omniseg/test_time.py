"""Test-time inference modes for semantic results, as MMSegmentation 1.x computes them; the `inference`
config section (omniseg.settings.InferenceSettings) chooses, for `omniseg eval`, `omniseg predict`, the
`Predictor` and validation during training alike.

- **whole** (default): one pass over the test-resized image, as plain `Segmenter.predict`.
- **slide**: windows of `crop_size` every `stride` px over the test-resized image, MMSeg's
  `slide_inference` grid: `max(H - crop + stride - 1, 0) // stride + 1` windows per axis, each clipped
  to the image and the last moved back inside it (a window is the image's side where the image is
  shorter). Each window is padded to the model's size divisibility (as `collate` pads whole images),
  its per-class scores cropped back; scores are summed and divided by each pixel's window count, then
  resized to the original size as whole-image scores are.
- **Multi-scale + flip** (`scales`, `flip`), MMSeg's `SegTTAModel`: every scale is a factor of the test
  resize, each view predicted whole or by sliding windows, flipped views flipped back, every view's
  scores brought to the original size and averaged. Logits (per-pixel families) are soft-maxed before
  averaging, as MMSeg does; mask-classification and SegViT scores are already class probabilities
  (sums of class probability x mask probability) and are averaged as they are
  (`Segmenter.semantic_scores_are_probabilities`).

The modes apply to the semantic task: a panoptic or instance result is not an average of per-pixel
scores, and is refused (`omniseg predict --tile` predicts huge images for every task).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from omniseg.schema import ConfigError
from omniseg.tiling import tile_starts

__all__ = ["InferenceMode", "slide_windows", "window_starts", "slide_scores", "view_scores", "resize_view",
           "predict_semantic"]

WINDOWS_PER_PASS = 4  # sliding windows (all of one size) predicted in one batch


def _pair(value, key: str, source: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{source}: {key} must be an int or [h, w] of ints, got {value!r}")
    if isinstance(value, int):
        value = [value, value]
    try:
        pair = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {key} must be an int or [h, w] of ints, got {value!r}") from None
    if len(pair) != 2 or any(not isinstance(v, int) or isinstance(v, bool) for v in value) or min(pair) < 1:
        raise ConfigError(f"{source}: {key} must be a positive int or [h, w] of positive ints, got {value!r}")
    return pair


@dataclass(frozen=True)
class InferenceMode:
    """The checked `inference` section: how each image's semantic scores are computed."""

    mode: str = "whole"
    crop_size: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False

    @classmethod
    def from_settings(cls, settings=None, *, source: str = "config") -> "InferenceMode":
        """From the `inference` section (DictConfig, mapping or InferenceSettings; None: the defaults);
        ConfigError names the key when a value cannot run."""
        if settings is None:
            return cls()
        get = settings.get if isinstance(settings, Mapping) or hasattr(settings, "get") else \
            (lambda k, d=None: getattr(settings, k, d))
        mode = str(get("mode", "whole"))
        if mode not in ("whole", "slide"):
            raise ConfigError(f"{source}: inference.mode must be 'whole' or 'slide', got {mode!r}")
        crop = _pair(get("crop_size", None), "inference.crop_size", source)
        stride = _pair(get("stride", None), "inference.stride", source)
        if mode == "slide":
            if crop is None or stride is None:
                raise ConfigError(f"{source}: inference.mode=slide needs inference.crop_size and inference.stride "
                                  f"(e.g. inference.crop_size=512 inference.stride=341)")
            if stride[0] > crop[0] or stride[1] > crop[1]:
                raise ConfigError(f"{source}: inference.stride {list(stride)} is larger than inference.crop_size "
                                  f"{list(crop)}: windows would leave pixels unseen")
        scales = tuple(float(s) for s in (get("scales", None) or (1.0,)))
        if not scales or any(not s > 0 for s in scales):
            raise ConfigError(f"{source}: inference.scales must be positive factors, got {list(scales)}")
        return cls(mode, crop, stride, scales, bool(get("flip", False)))

    @property
    def plain(self) -> bool:
        """One whole-image pass at the test resize: today's `Segmenter.predict`, nothing to do here."""
        return self.mode == "whole" and not self.augmented

    @property
    def augmented(self) -> bool:
        """Several views (or one rescaled view) averaged, MMSeg's test-time augmentation."""
        return self.flip or self.scales != (1.0,)

    def describe(self) -> str:
        parts = [f"slide {self.crop_size[0]}x{self.crop_size[1]} stride {self.stride[0]}x{self.stride[1]}"
                 if self.mode == "slide" else "whole"]
        if self.scales != (1.0,):
            parts.append("scales " + ",".join(f"{s:g}" for s in self.scales))
        if self.flip:
            parts.append("flip")
        return ", ".join(parts)

    def check_tasks(self, tasks: Sequence[str]) -> None:
        """Refuse panoptic / instance under slide or augmentation: only semantic scores average."""
        if self.plain:
            return
        other = [t for t in tasks if t != "semantic"]
        if other:
            raise ValueError(f"inference ({self.describe()}) computes semantic results only, not {', '.join(other)}: "
                             f"ask for --task semantic, or predict huge images for every task tile by tile "
                             f"with `omniseg predict --tile`")


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of MMSeg's sliding windows along one axis: `max(length - crop + stride - 1, 0) //
    stride + 1` windows every `stride` px, the last moved back inside (from 0 when crop >= length).
    The same windows as tiles of size `crop` overlapping by `crop - stride` (omniseg.tiling)."""
    if not 1 <= stride <= crop:
        raise ValueError(f"sliding windows need 1 <= stride <= crop, got stride {stride}, crop {crop}")
    return tile_starts(length, crop, crop - stride)


def slide_windows(height: int, width: int, crop: tuple[int, int], stride: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """(y1, x1, y2, x2) of every window over an image of (height, width), rows first (MMSeg's order)."""
    ch, cw = min(crop[0], height), min(crop[1], width)
    return [(y, x, y + ch, x + cw) for y in window_starts(height, crop[0], stride[0])
            for x in window_starts(width, crop[1], stride[1])]


def _scores(pred: dict, model) -> torch.Tensor:
    scores = pred.get("semantic_scores")
    if scores is None:
        raise ValueError(f"{model.describe()}: its semantic map is not the argmax of per-class scores, which "
                         f"sliding windows and test-time augmentation average")
    return scores.float()


def slide_scores(model, image: torch.Tensor, crop: tuple[int, int], stride: tuple[int, int], *,
                 size_divisibility: int = 32, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [3,h,w] (test-resized) -> float [K,h,w]: window scores summed, divided by the window count."""
    from omniseg.data.loader import collate

    height, width = int(image.shape[-2]), int(image.shape[-1])
    windows = slide_windows(height, width, crop, stride)
    total = count = None
    for start in range(0, len(windows), WINDOWS_PER_PASS):
        chunk = windows[start:start + WINDOWS_PER_PASS]
        batch = collate([{"image": image[:, y1:y2, x1:x2]} for y1, x1, y2, x2 in chunk],
                        size_divisibility=size_divisibility)
        preds = model.predict(batch.images.to(device), batch.image_sizes, batch.image_sizes, tasks=["semantic"],
                              semantic_scores=True)
        for (y1, x1, y2, x2), pred in zip(chunk, preds):
            scores = _scores(pred, model)
            if total is None:
                total = scores.new_zeros((scores.shape[0], height, width))
                count = scores.new_zeros((1, height, width))
            total[:, y1:y2, x1:x2] += scores
            count[:, y1:y2, x1:x2] += 1
    return total / count


def resize_view(image: torch.Tensor, min_size_test: int | None, scale: float = 1.0,
                max_size_test: int | None = None) -> torch.Tensor:
    """The image as the model reads it at `scale` x the test resize: shorter side `min_size_test * scale`,
    longer side at most `max_size_test * scale` (min_size_test null: the image's own shorter side x scale);
    scale 1 is exactly the eval transform."""
    from torchvision import tv_tensors

    from omniseg.data.transforms import eval_resize

    if min_size_test is None and scale == 1.0:
        return image
    base = min_size_test if min_size_test is not None else min(image.shape[-2:])
    return eval_resize(base, max_size_test, scale)(tv_tensors.Image(image)).as_subclass(torch.Tensor)


def view_scores(model, image: torch.Tensor, mode: InferenceMode, output_size: tuple[int, int], *,
                size_divisibility: int = 32, device: torch.device | str = "cpu") -> torch.Tensor:
    """One view (an already resized uint8 [3,h,w]) -> float [K, *output_size]: whole or by sliding windows."""
    from omniseg.data.loader import collate

    if mode.mode == "slide":
        scores = slide_scores(model, image, mode.crop_size, mode.stride, size_divisibility=size_divisibility,
                              device=device)
        if tuple(scores.shape[-2:]) != tuple(output_size):
            scores = F.interpolate(scores[None], size=tuple(output_size), mode="bilinear", align_corners=False)[0]
        return scores
    batch = collate([{"image": image}], size_divisibility=size_divisibility)
    pred = model.predict(batch.images.to(device), batch.image_sizes, [tuple(output_size)], tasks=["semantic"],
                         semantic_scores=True)[0]
    return _scores(pred, model)


@torch.no_grad()
def predict_semantic(model, image: torch.Tensor, mode: InferenceMode, *, min_size_test: int | None,
                     max_size_test: int | None = None, size_divisibility: int = 32, device: torch.device | str = "cpu",
                     with_scores: bool = False) -> dict:
    """An original uint8 [3,H,W] image -> {"semantic": int64 [H,W]} (with_scores: also "semantic_scores"
    [K,H,W], the averaged scores whose argmax it is) under `mode` (see the module docstring)."""
    size = (int(image.shape[-2]), int(image.shape[-1]))
    total = None
    views = 0
    for scale in mode.scales:
        resized = resize_view(image, min_size_test, scale, max_size_test)
        for flipped in ((False, True) if mode.flip else (False,)):
            scores = view_scores(model, resized.flip(-1) if flipped else resized, mode, size,
                                 size_divisibility=size_divisibility, device=device)
            if flipped:
                scores = scores.flip(-1)
            if mode.augmented and not model.semantic_scores_are_probabilities:
                scores = scores.softmax(0)
            total = scores if total is None else total + scores
            views += 1
    if views > 1:
        total = total / views
    result = {"semantic": total.argmax(0)}
    if with_scores:
        result["semantic_scores"] = total
    return result
