"""Sample -> sample pipelines on torchvision.transforms.v2, so label maps and masks move with the image.

Every annotation is wrapped as a tv_tensor (label maps and masks as `Mask`, hence nearest-neighbour
resampling), transformed with the image, and unwrapped. Padding uses a single fill value 0 for all masks;
sem_seg is shifted by one on the way in so that 0 means "ignore" during the transform and padding therefore
lands on ignore, while pan_seg padding lands on void (0).

The training resize follows one of the official pipelines (`data.train_resize`):
- scale_jitter: detectron2's large-scale jitter (ResizeScale + FixedSizeCrop), the Mask2Former COCO recipe;
- shortest_edge: detectron2's ResizeShortestEdge (+ RandomCrop_CategoryAreaConstraint when a crop is set),
  the R-CNN / BlendMask and MaskFormer ADE20K recipes;
- ratio_range: MMSeg's RandomResize(keep_ratio) + RandomCrop(cat_max_ratio) + padding to the crop.
The photometric step is torchvision's ColorJitter or MMSeg's PhotoMetricDistortion (= detectron2's
ColorAugSSDTransform). Random draws use torch's generator, which the training set seeds per sample.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from omniseg.data.targets import boxes_from_masks, nonempty_masks


def _to_tv(sample: dict, categories: bool = False) -> dict:
    """Pick the geometric payload of a sample as tv_tensors; `categories`: also a class map (shifted by one,
    0 = unlabelled) for the category-constrained crop when the sample has no sem_seg."""
    payload = {"image": tv_tensors.Image(sample["image"])}
    if categories and "sem_seg" not in sample and "pan_seg" in sample:
        pan = sample["pan_seg"]
        cats = torch.zeros_like(pan, dtype=torch.int64)
        for s in sample["segments_info"]:
            cats[pan == int(s["id"])] = int(s["category"]) + 1
        payload["_categories"] = tv_tensors.Mask(cats)
    if "sem_seg" in sample:
        ignore = sample.get("_ignore_index", 255)
        sem = sample["sem_seg"].to(torch.int64)
        shifted = torch.where(sem == ignore, torch.zeros_like(sem), sem + 1)
        payload["sem_seg"] = tv_tensors.Mask(shifted)
    if "pan_seg" in sample:
        payload["pan_seg"] = tv_tensors.Mask(sample["pan_seg"])
    if "instances" in sample:
        payload["masks"] = tv_tensors.Mask(sample["instances"]["masks"])
    return payload


def _from_tv(sample: dict, out: dict) -> dict:
    result = dict(sample)
    image = out["image"].as_subclass(torch.Tensor)
    result["image"] = image
    result["height"], result["width"] = int(image.shape[-2]), int(image.shape[-1])
    if "sem_seg" in out:
        ignore = sample.get("_ignore_index", 255)
        shifted = out["sem_seg"].as_subclass(torch.Tensor)
        result["sem_seg"] = torch.where(shifted == 0, torch.full_like(shifted, ignore), shifted - 1)
    if "pan_seg" in out:
        pan = out["pan_seg"].as_subclass(torch.Tensor)
        result["pan_seg"] = pan
        present = set(torch.unique(pan).tolist())
        result["segments_info"] = [s for s in sample["segments_info"] if int(s["id"]) in present]
    if "masks" in out:
        inst = sample["instances"]
        masks = out["masks"].as_subclass(torch.Tensor).bool()
        keep = nonempty_masks(masks)
        new = {k: v[keep] for k, v in inst.items()
               if k != "masks" and torch.is_tensor(v) and v.shape[:1] == keep.shape}
        new["masks"] = masks[keep]
        new["boxes"] = boxes_from_masks(new["masks"])
        result["instances"] = new
    return result



def _pair(size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    h, w = (int(v) for v in size)
    return (h, w)


def _resize(payload: dict, size: tuple[int, int], antialias: bool) -> dict:
    """Every entry to (h, w): bilinear for the image, nearest for masks (by tv_tensor type)."""
    return {k: TF.resize(v, list(size), antialias=antialias) for k, v in payload.items()}


class ResizeShortestEdge:
    """detectron2's ResizeShortestEdge: the shorter side to one of `sizes` ("choice") or to an integer
    drawn uniformly from [min, max] ("range"), the longer side then bounded by `max_size`."""

    def __init__(self, sizes: Sequence[int], sampling: str = "choice", max_size: int = 1333):
        if not sizes:
            raise ValueError("data.short_edge: at least one size")
        if sampling == "range" and len(sizes) != 2:
            raise ValueError(f"data.short_edge with short_edge_sampling=range: [min, max], got {list(sizes)}")
        self.sizes, self.sampling, self.max_size = [int(s) for s in sizes], sampling, int(max_size)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        if self.sampling == "choice":
            size = self.sizes[int(torch.randint(len(self.sizes), ()))]
        else:
            size = int(torch.randint(self.sizes[0], self.sizes[1] + 1, ()))
        scale = size / min(h, w)
        newh, neww = (size, scale * w) if h < w else (scale * h, size)
        if max(newh, neww) > self.max_size:
            shrink = self.max_size / max(newh, neww)
            newh, neww = newh * shrink, neww * shrink
        return int(newh + 0.5), int(neww + 0.5)

    def __call__(self, payload: dict) -> dict:
        h, w = payload["image"].shape[-2:]
        return _resize(payload, self.output_size(int(h), int(w)), antialias=True)  # detectron2 resizes with PIL

    def __repr__(self) -> str:
        return f"ResizeShortestEdge(sizes={self.sizes}, sampling={self.sampling}, max_size={self.max_size})"


class RatioRangeResize:
    """MMSeg's RandomResize(scale, ratio_range, keep_ratio=True): the bound (long, short) x a ratio drawn
    uniformly from `ratio_range`, then the largest keep-ratio size inside it (mmcv.imrescale; bilinear
    without antialias as cv2)."""

    def __init__(self, scale: Sequence[int], ratio_range: Sequence[float]):
        self.scale, self.ratio_range = tuple(int(v) for v in scale), tuple(float(r) for r in ratio_range)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        lo, hi = self.ratio_range
        ratio = lo + float(torch.rand(())) * (hi - lo)
        bound = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        factor = min(max(bound) / max(h, w), min(bound) / min(h, w))
        return int(h * factor + 0.5), int(w * factor + 0.5)

    def __call__(self, payload: dict) -> dict:
        h, w = payload["image"].shape[-2:]
        return _resize(payload, self.output_size(int(h), int(w)), antialias=False)

    def __repr__(self) -> str:
        return f"RatioRangeResize(scale={self.scale}, ratio_range={self.ratio_range})"


class CategoryAreaCrop:
    """A random crop of at most `size`, retried (10 draws, the last kept) while one class covers
    `cat_max_ratio` or more of the crop's labelled pixels or the crop holds a single class: detectron2's
    RandomCrop_CategoryAreaConstraint = MMSeg's RandomCrop(cat_max_ratio). 1.0: any crop."""

    TRIES = 10

    def __init__(self, size: tuple[int, int], cat_max_ratio: float = 1.0):
        if not 0 < cat_max_ratio <= 1:
            raise ValueError(f"data.cat_max_ratio must be in (0, 1], got {cat_max_ratio}")
        self.size, self.cat_max_ratio = size, float(cat_max_ratio)

    @staticmethod
    def _categories(payload: dict) -> torch.Tensor | None:
        for key in ("sem_seg", "_categories"):  # both shifted by one: 0 is unlabelled
            if key in payload:
                return payload[key].as_subclass(torch.Tensor)
        return None

    def _window(self, h: int, w: int) -> tuple[int, int, int, int]:
        ch, cw = min(self.size[0], h), min(self.size[1], w)
        top = int(torch.randint(h - ch + 1, ()))
        left = int(torch.randint(w - cw + 1, ()))
        return top, left, ch, cw

    def __call__(self, payload: dict) -> dict:
        h, w = (int(v) for v in payload["image"].shape[-2:])
        window = self._window(h, w)
        if self.cat_max_ratio < 1.0:
            labels = self._categories(payload)
            if labels is None:
                raise ValueError("data.cat_max_ratio < 1 needs semantic or panoptic labels to count classes")
            for attempt in range(self.TRIES):
                top, left, ch, cw = window
                present, counts = torch.unique(labels[..., top:top + ch, left:left + cw], return_counts=True)
                counts = counts[present != 0]
                if len(counts) > 1 and int(counts.max()) < float(counts.sum()) * self.cat_max_ratio:
                    break
                if attempt < self.TRIES - 1:
                    window = self._window(h, w)
        top, left, ch, cw = window
        return {k: TF.crop(v, top, left, ch, cw) for k, v in payload.items()}

    def __repr__(self) -> str:
        return f"CategoryAreaCrop(size={self.size}, cat_max_ratio={self.cat_max_ratio})"


class PadTo:
    """Pad the bottom and right up to `size` (MMSeg's data preprocessor: image 0, labels ignore)."""

    def __init__(self, size: tuple[int, int]):
        self.size = size

    def __call__(self, payload: dict) -> dict:
        h, w = (int(v) for v in payload["image"].shape[-2:])
        pad_h, pad_w = max(self.size[0] - h, 0), max(self.size[1] - w, 0)
        if not (pad_h or pad_w):
            return payload
        return {k: TF.pad(v, [0, 0, pad_w, pad_h], fill=0) for k, v in payload.items()}

    def __repr__(self) -> str:
        return f"PadTo(size={self.size})"


class RandomHFlip:
    """A horizontal flip with probability 1/2, drawn from torch's generator."""

    def __call__(self, payload: dict) -> dict:
        if float(torch.rand(())) < 0.5:
            return {k: TF.horizontal_flip(v) for k, v in payload.items()}
        return payload

    def __repr__(self) -> str:
        return "RandomHFlip(p=0.5)"


# -- photometric distortion ------------------------------------------------------------------------

_HSV_SHIFT = 12  # OpenCV's fixed-point 8-bit RGB -> HSV


def _fixed_point_table(numerator: int, scale: float) -> torch.Tensor:
    """OpenCV's division tables: round((numerator << 12) / (scale * i)) for i in 1..255, 0 for i = 0."""
    i = torch.arange(256, dtype=torch.float64)
    table = torch.round((numerator << _HSV_SHIFT) / (scale * i.clamp(min=1)))
    table[0] = 0
    return table.to(torch.int64)


_S_DIV = _fixed_point_table(255, 1.0)
_H_DIV = _fixed_point_table(180, 6.0)


def rgb_to_hsv_uint8(image: torch.Tensor) -> torch.Tensor:
    """uint8 RGB [3,H,W] -> uint8 HSV exactly as OpenCV's 8-bit COLOR_RGB2HSV (its fixed-point arithmetic):
    H in [0, 180) (degrees / 2), S and V in [0, 255]. MMSeg and detectron2 distort colours in this space."""
    r, g, b = image.to(torch.int64)
    v = torch.maximum(torch.maximum(r, g), b)
    diff = v - torch.minimum(torch.minimum(r, g), b)
    half = 1 << (_HSV_SHIFT - 1)
    s = (diff * _S_DIV[v] + half) >> _HSV_SHIFT
    h = torch.where(v == r, g - b, torch.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _H_DIV[diff] + half) >> _HSV_SHIFT
    h = torch.where(h < 0, h + 180, h)
    return torch.stack([h, s, v]).to(torch.uint8)


def hsv_uint8_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """The inverse, as OpenCV's 8-bit COLOR_HSV2RGB: float32 in [0, 1], six sectors, rounded to uint8.
    OpenCV's own result varies by one grey level with its SIMD path (image width, CPU); this is its scalar
    formula."""
    h, s, v = hsv.to(torch.float32)
    h = h * (6.0 / 180.0)
    s, v = s * (1.0 / 255.0), v * (1.0 / 255.0)
    h = torch.where(h >= 6, h - 6, h)
    sector = torch.floor(h)
    f = h - sector
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s + s * f)
    sector = sector.long().clamp(0, 5)
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = torch.zeros((3, *v.shape), dtype=torch.float32)
    for i, (r, g, b) in enumerate(choices):
        m = sector == i
        out[0][m], out[1][m], out[2][m] = r[m], g[m], b[m]
    return torch.round(out * 255.0).clamp(0, 255).to(torch.uint8)


def _convert(x: torch.Tensor, alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
    """x * alpha + beta in float32, clipped to [0, 255] and truncated to uint8 (numpy's astype, as MMSeg)."""
    y = x.float() * torch.tensor(alpha, dtype=torch.float32)
    return (y + torch.tensor(beta, dtype=torch.float32)).clamp(0, 255).to(torch.uint8)


class PhotoMetricDistortion:
    """MMSeg's PhotoMetricDistortion (= detectron2's ColorAugSSDTransform): each with probability 1/2, a
    brightness shift in [-32, 32], a contrast factor in [0.5, 1.5] (before or after the rest, 1/2 each), a
    saturation factor in [0.5, 1.5] and a hue shift in [-18, 18) OpenCV units, on the uint8 image."""

    def __init__(self, brightness_delta: int = 32, contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5),
                 hue_delta: int = 18):
        self.brightness_delta, self.hue_delta = brightness_delta, hue_delta
        self.contrast_range, self.saturation_range = tuple(contrast_range), tuple(saturation_range)

    @staticmethod
    def _coin() -> bool:
        return bool(torch.randint(2, ()))

    @staticmethod
    def _uniform(lo: float, hi: float) -> float:
        return lo + float(torch.rand(())) * (hi - lo)

    def draw(self) -> dict:
        """The random choices of one application (None: step skipped)."""
        return {
            "brightness": self._uniform(-self.brightness_delta, self.brightness_delta) if self._coin() else None,
            "contrast_first": self._coin(),
            "contrast": self._uniform(*self.contrast_range) if self._coin() else None,
            "saturation": self._uniform(*self.saturation_range) if self._coin() else None,
            "hue": int(torch.randint(-self.hue_delta, self.hue_delta, ())) if self._coin() else None,
        }

    @staticmethod
    def apply(image: torch.Tensor, params: dict) -> torch.Tensor:
        """The distortion with the given choices on a uint8 RGB [3,H,W] image."""
        img = image
        if params["brightness"] is not None:
            img = _convert(img, beta=params["brightness"])
        if params["contrast_first"] and params["contrast"] is not None:
            img = _convert(img, alpha=params["contrast"])
        if params["saturation"] is not None:
            hsv = rgb_to_hsv_uint8(img)
            hsv[1] = _convert(hsv[1], alpha=params["saturation"])
            img = hsv_uint8_to_rgb(hsv)
        if params["hue"] is not None:
            hsv = rgb_to_hsv_uint8(img)
            hsv[0] = ((hsv[0].long() + params["hue"]) % 180).to(torch.uint8)
            img = hsv_uint8_to_rgb(hsv)
        if not params["contrast_first"] and params["contrast"] is not None:
            img = _convert(img, alpha=params["contrast"])
        return img

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.dtype != torch.uint8:
            raise TypeError(f"PhotoMetricDistortion works on uint8 images, got {image.dtype}")
        return self.apply(image, self.draw())

    def __repr__(self) -> str:
        return (f"PhotoMetricDistortion(brightness_delta={self.brightness_delta}, contrast={self.contrast_range}, "
                f"saturation={self.saturation_range}, hue_delta={self.hue_delta})")


# -- pipelines -------------------------------------------------------------------------------------

class TrainTransform:
    """Resize (one of the official pipelines), crop, h-flip, photometric: image and every annotation."""

    def __init__(self, size: int | Sequence[int] | None, scale_range=(0.1, 2.0), hflip: bool = True,
                 photometric: bool = True, ignore_index: int = 255, *, train_resize: str = "scale_jitter",
                 resize_scale: Sequence[int] = (2048, 512), short_edge: Sequence[int] = (640, 672, 704, 736, 768, 800),
                 short_edge_sampling: str = "choice", max_size: int = 1333, cat_max_ratio: float = 1.0,
                 photometric_style: str = "color_jitter"):
        self.ignore_index = ignore_index
        hw = _pair(size)
        self.needs_categories = False
        self.steps: list = []          # payload -> payload callables
        if train_resize == "scale_jitter":
            if cat_max_ratio < 1.0:
                raise ValueError("data.cat_max_ratio applies to the shortest_edge and ratio_range resizes; "
                                 "scale_jitter (large-scale jitter) crops without a class constraint")
            geometric: list = []
            if hw is not None:
                geometric += [v2.ScaleJitter(target_size=hw, scale_range=tuple(scale_range), antialias=True),
                              v2.RandomCrop(hw, pad_if_needed=True, fill=0, padding_mode="constant")]
            if hflip:
                geometric.append(v2.RandomHorizontalFlip(0.5))
            if geometric:
                self.steps.append(v2.Compose(geometric))
        elif train_resize in ("shortest_edge", "ratio_range"):
            self.steps.append(ResizeShortestEdge(short_edge, short_edge_sampling, max_size)
                              if train_resize == "shortest_edge" else RatioRangeResize(resize_scale, scale_range))
            if hw is not None:
                self.steps.append(CategoryAreaCrop(hw, cat_max_ratio))
                self.needs_categories = cat_max_ratio < 1.0
            elif cat_max_ratio < 1.0:
                raise ValueError("data.cat_max_ratio < 1 constrains the crop: set data.crop_size")
            if hflip:
                self.steps.append(RandomHFlip())
            if train_resize == "ratio_range" and hw is not None:
                self.steps.append(PadTo(hw))
        else:
            raise ValueError(f"data.train_resize: scale_jitter | shortest_edge | ratio_range, got {train_resize!r}")
        if not photometric:
            self.photometric = None
        elif photometric_style == "distortion":
            self.photometric = PhotoMetricDistortion()
        elif photometric_style == "color_jitter":
            self.photometric = v2.RandomApply(
                [v2.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.25, hue=0.03)], p=0.8)
        else:
            raise ValueError(f"data.photometric_style: color_jitter | distortion, got {photometric_style!r}")

    def __call__(self, sample: dict) -> dict:
        if self.steps:
            tagged = {**sample, "_ignore_index": self.ignore_index}
            payload = _to_tv(tagged, categories=self.needs_categories)
            for step in self.steps:
                payload = step(payload)
            payload.pop("_categories", None)
            sample = _from_tv(tagged, payload)
            sample.pop("_ignore_index", None)
        if self.photometric is not None:
            sample = dict(sample)
            if isinstance(self.photometric, PhotoMetricDistortion):
                sample["image"] = self.photometric(sample["image"].as_subclass(torch.Tensor))
            else:
                sample["image"] = self.photometric(tv_tensors.Image(sample["image"])).as_subclass(torch.Tensor)
        return sample

    def __repr__(self) -> str:
        return f"TrainTransform(steps={self.steps}, photometric={self.photometric})"


class EvalTransform:
    """Resize only the model input (shorter side to min_size_test, the longer bounded by max_size_test);
    annotations and height/width stay at the original resolution."""

    def __init__(self, min_size_test: int | None = None, max_size_test: int | None = None):
        self.resize = eval_resize(min_size_test, max_size_test)

    def __call__(self, sample: dict) -> dict:
        sample = dict(sample)
        h, w = sample["image"].shape[-2:]
        sample.setdefault("height", int(h))
        sample.setdefault("width", int(w))
        if self.resize is not None:
            sample["image"] = self.resize(tv_tensors.Image(sample["image"])).as_subclass(torch.Tensor)
        return sample

    def __repr__(self) -> str:
        return f"EvalTransform(resize={self.resize})"


def eval_resize(min_size_test: int | None, max_size_test: int | None, scale: float = 1.0):
    """The test-time resize at `scale` x (min_size_test, max_size_test): detectron2's
    ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST) = MMSeg's Resize((max, min), keep_ratio); None: keep."""
    if min_size_test is None:
        if max_size_test is not None:
            raise ValueError("data.max_size_test bounds the test resize: set data.min_size_test too")
        return None
    side = max(1, int(min_size_test * scale + 0.5))
    longest = None if max_size_test is None else max(side + 1, int(max_size_test * scale + 0.5))
    return v2.Resize(side, max_size=longest, antialias=True)


def build_transforms(
    train: bool,
    *,
    size: int | Sequence[int] | None = None,
    scale_range: Sequence[float] = (0.1, 2.0),
    hflip: bool = True,
    photometric: bool = True,
    min_size_test: int | None = None,
    max_size_test: int | None = None,
    ignore_index: int = 255,
    **resize,
) -> Callable[[dict], dict]:
    """Training: resize/crop/flip/colour applied to image and every annotation (`resize`: train_resize,
    resize_scale, short_edge, short_edge_sampling, max_size, cat_max_ratio, photometric_style; see
    TrainTransform). Evaluation: resize the image only.

    `size` is the training crop (int: square, or (h, w)); None: no crop (scale_jitter: no jitter either).
    """
    if train:
        return TrainTransform(size, scale_range, hflip, photometric, ignore_index, **resize)
    return EvalTransform(min_size_test, max_size_test)


def train_transforms(data) -> TrainTransform:
    """The training pipeline a config's `data` section describes."""
    return TrainTransform(
        data.crop_size, tuple(data.scale_range), data.hflip, data.photometric,
        train_resize=data.train_resize, resize_scale=tuple(data.resize_scale), short_edge=tuple(data.short_edge),
        short_edge_sampling=data.short_edge_sampling, max_size=data.max_size, cat_max_ratio=data.cat_max_ratio,
        photometric_style=data.photometric_style)
