"""Overlays of predictions or ground truth on images, and training curves from metrics.jsonl."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.ops import masks_to_boxes
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from omniseg.data.errors import DataError
from omniseg.data.meta import DatasetMeta
from omniseg.engine.logger import read_metrics
from omniseg.files import atomic_path
from omniseg.masks import CroppedMasks, mask_crops

# Keys of evaluation lines in metrics.jsonl that get their own subplot, in this order.
EVAL_METRICS = ("PQ", "PQ_th", "PQ_st", "SQ", "RQ", "mIoU", "fwIoU", "mAcc", "pAcc", "AP", "AP50", "AP75")


def _check_image(image: torch.Tensor) -> None:
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be uint8 [3,H,W], got {image.dtype} {tuple(image.shape)}")


def _palette(meta: DatasetMeta, device: torch.device) -> torch.Tensor:
    return torch.tensor(meta.colors, dtype=torch.float32, device=device).reshape(-1, 3)


def jitter_color(color: Sequence[int], seed: int, amount: float = 0.5) -> tuple[int, int, int]:
    """A deterministic nearby colour, so instances of one class look related but distinguishable.

    Same recipe as detectron2's Visualizer: add a random vector of norm `amount` (in 0..1 units).
    """
    generator = torch.Generator().manual_seed(int(seed) * 7919 + 17)
    direction = torch.rand(3, generator=generator) - 0.5
    direction = direction / direction.norm().clamp(min=1e-6) * amount
    jittered = (torch.tensor(color, dtype=torch.float32) / 255 + direction).clamp(0, 1)
    return tuple(int(round(v)) for v in (jittered * 255).tolist())


def _blend(image: torch.Tensor, colors: torch.Tensor, where: torch.Tensor, alpha: float) -> torch.Tensor:
    """image uint8 [3,H,W], colors float [3,H,W], where bool [H,W] -> blended uint8, unchanged elsewhere."""
    mixed = image.float() * (1 - alpha) + colors * alpha
    return torch.where(where[None], mixed.round().clamp(0, 255).to(torch.uint8), image)


def overlay_semantic(image: torch.Tensor, labels: torch.Tensor, meta: DatasetMeta, alpha: float = 0.5) -> torch.Tensor:
    """Blend class colours over the image; pixels with a label outside 0..K-1 (ignore) stay as they are."""
    _check_image(image)
    if tuple(labels.shape) != tuple(image.shape[1:]):
        raise ValueError(f"labels {tuple(labels.shape)} do not match image {tuple(image.shape[1:])}")
    labels = labels.to(image.device).long()
    valid = (labels >= 0) & (labels < meta.num_classes)
    colors = _palette(meta, image.device)[labels.clamp(0, meta.num_classes - 1)].permute(2, 0, 1)
    return _blend(image, colors, valid, alpha)


def _inner_boundary(segment_map: torch.Tensor) -> torch.Tensor:
    """Pixels that have a 4-neighbour with a different id (the segment's own outline)."""
    edge = torch.zeros_like(segment_map, dtype=torch.bool)
    vertical = segment_map[1:, :] != segment_map[:-1, :]
    horizontal = segment_map[:, 1:] != segment_map[:, :-1]
    edge[1:, :] |= vertical
    edge[:-1, :] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    return edge


def overlay_panoptic(
    image: torch.Tensor,
    segment_map: torch.Tensor,
    segments_info: Sequence[dict],
    meta: DatasetMeta,
    alpha: float = 0.5,
    contours: bool = True,
) -> torch.Tensor:
    """Stuff in its class colour, each thing in a jittered class colour with a darker outline.

    Void (id 0) and ids without a `segments_info` entry are left untouched.
    """
    _check_image(image)
    if tuple(segment_map.shape) != tuple(image.shape[1:]):
        raise ValueError(f"segment_map {tuple(segment_map.shape)} does not match image {tuple(image.shape[1:])}")
    segment_map = segment_map.to(image.device).long()
    ids, inverse = torch.unique(segment_map, return_inverse=True)
    by_id = {int(s["id"]): s for s in segments_info}
    table = torch.zeros(len(ids), 3)
    described = torch.zeros(len(ids), dtype=torch.bool)
    thing = torch.zeros(len(ids), dtype=torch.bool)
    for i, segment_id in enumerate(ids.tolist()):
        info = by_id.get(segment_id)
        if info is None or segment_id == 0:
            continue
        category = int(info["category"])
        is_thing = bool(info.get("isthing", meta.isthing[category]))
        color = meta.colors[category]
        table[i] = torch.tensor(jitter_color(color, segment_id) if is_thing else color, dtype=torch.float32)
        described[i], thing[i] = True, is_thing
    table, described, thing = table.to(image.device), described.to(image.device), thing.to(image.device)
    colors = table[inverse].permute(2, 0, 1)
    out = _blend(image, colors, described[inverse], alpha)
    if contours:
        outline = _inner_boundary(segment_map) & thing[inverse]
        out = torch.where(outline[None], (colors * 0.5).round().to(torch.uint8), out)
    return out


def overlay_instances(
    image: torch.Tensor,
    instances: dict,
    meta: DatasetMeta,
    score_threshold: float = 0.5,
    alpha: float = 0.5,
    draw_boxes: bool = True,
    draw_labels: bool = True,
) -> torch.Tensor:
    """Masks (torchvision `draw_segmentation_masks`) and labelled boxes for instances scoring >= threshold."""
    _check_image(image)
    masks = instances["masks"].bool()
    cropped = isinstance(masks, CroppedMasks)
    labels = instances["labels"].long().cpu()
    scores = instances.get("scores")
    keep = torch.ones(len(labels), dtype=torch.bool) if scores is None else scores.cpu() >= score_threshold
    if masks.shape[0] and tuple(masks.shape[1:]) != tuple(image.shape[1:]):
        raise ValueError(f"masks {tuple(masks.shape)} do not match image {tuple(image.shape[1:])}")
    keep_index = keep.nonzero().flatten()
    if len(keep_index) == 0:
        return image.clone()
    masks = masks[keep_index] if cropped else masks.to(image.device)[keep_index.to(image.device)]
    labels = labels[keep_index]
    colors = [jitter_color(meta.colors[int(label)], i) for i, label in enumerate(labels.tolist())]
    if cropped:
        out = _paint_crops(image, masks, colors, alpha)
    else:
        out = draw_segmentation_masks(image, masks, alpha=alpha, colors=colors)
        # torchvision truncates the float blend, which can shift untouched pixels by one level.
        out = torch.where(masks.any(dim=0)[None], out, image)
    if draw_boxes:
        has_pixels = (masks.areas() > 0) if cropped else masks.flatten(1).any(dim=1).cpu()
        if instances.get("boxes") is not None:
            boxes = instances["boxes"].float().cpu()[keep_index]
        elif cropped:
            boxes = masks.boxes() - torch.tensor([0.0, 0.0, 1.0, 1.0])  # masks_to_boxes' far edges
        else:
            boxes = torch.zeros(len(masks), 4)
            if bool(has_pixels.any()):
                boxes[has_pixels] = masks_to_boxes(masks[has_pixels.to(masks.device)]).cpu()
        texts = None
        if draw_labels:
            texts = [meta.classes[int(label)] for label in labels.tolist()]
            if scores is not None:
                texts = [f"{t} {float(s):.2f}" for t, s in zip(texts, scores.cpu()[keep_index].tolist())]
        shown = has_pixels | (instances.get("boxes") is not None)
        if bool(shown.any()):
            out = draw_bounding_boxes(
                out.cpu(),
                boxes[shown],
                labels=None if texts is None else [t for t, s in zip(texts, shown.tolist()) if s],
                colors=[c for c, s in zip(colors, shown.tolist()) if s],
                width=2,
            ).to(image.device)
    return out


def _paint_crops(image: torch.Tensor, masks: CroppedMasks, colors: Sequence, alpha: float,
                 band_rows: int = 1024) -> torch.Tensor:
    """torchvision's draw_segmentation_masks (later masks on top, overlaps black, the float blend truncated),
    for CroppedMasks, leaving pixels under no mask untouched; painted crop by crop and blended `band_rows`
    rows at a time, so a huge image needs no float copy or full-size mask stack."""
    painted = image.clone()
    coverage = torch.zeros(image.shape[1:], dtype=torch.uint8, device=image.device)  # 0, 1, or 2 = overlapped
    for (crop, y, x), color in zip(mask_crops(masks), colors):
        crop = crop.to(image.device)
        h, w = crop.shape
        painted[:, y:y + h, x:x + w][:, crop] = torch.tensor(color, dtype=image.dtype, device=image.device)[:, None]
        region = coverage[y:y + h, x:x + w]
        region[crop] = (region[crop] + 1).clamp(max=2)
    out = image.clone()
    for r in range(0, image.shape[1], band_rows):
        band = coverage[r:r + band_rows]
        drawn = painted[:, r:r + band_rows].masked_fill((band > 1)[None], 0)
        blend = (image[:, r:r + band_rows] * (1 - alpha) + drawn * alpha).to(image.dtype)
        out[:, r:r + band_rows] = torch.where((band > 0)[None], blend, image[:, r:r + band_rows])
    return out


def save_image(path: str | os.PathLike, tensor: torch.Tensor) -> Path:
    """Save uint8 [3,H,W] / [H,W] (or float in 0..1) as an image; the format follows the suffix."""
    if tensor.is_floating_point():
        tensor = (tensor.clamp(0, 1) * 255).round().to(torch.uint8)
    if tensor.ndim == 3:
        array = tensor.detach().cpu().permute(1, 2, 0).numpy()
        if array.shape[2] == 1:
            array = array[..., 0]
    elif tensor.ndim == 2:
        array = tensor.detach().cpu().numpy()
    else:
        raise ValueError(f"expected [3,H,W] or [H,W], got shape {tuple(tensor.shape)}")
    path = Path(path)
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        raise ValueError(f"{path}: unknown image suffix {path.suffix!r}")
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format=image_format)
    return path


def plot_training_curves(metrics_jsonl_path: str | os.PathLike, out_png: str | os.PathLike) -> Path:
    """One subplot for the loss, one for the learning rate, one per evaluation metric, all vs iteration."""
    # The object API renders with Agg and leaves pyplot's global backend alone (safe on headless servers).
    from matplotlib.figure import Figure

    path = Path(metrics_jsonl_path)
    records = read_metrics(path)

    def series(key: str) -> tuple[list[float], list[float]]:
        points = [
            (float(r["iter"]), float(r[key]))
            for r in records
            if isinstance(r.get(key), (int, float)) and math.isfinite(float(r[key]))
        ]
        return [p[0] for p in points], [p[1] for p in points]

    panels = [(key, *series(key)) for key in ("loss", "lr", *EVAL_METRICS)]
    panels = [panel for panel in panels if panel[1]]
    if not panels:
        raise DataError(path, "no 'loss', 'lr' or evaluation metrics to plot")
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(4.5 * columns, 3.2 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis, (key, xs, ys) in zip(axes.flat, panels):
        axis.plot(xs, ys, marker="o" if key not in ("loss", "lr") else None, markersize=3)
        axis.set_title(key)
        axis.set_xlabel("iteration")
        axis.grid(alpha=0.3)
        if key == "lr":
            axis.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    figure.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    return out_png


def plot_layer_masks(image: torch.Tensor, sets: Sequence[dict], out_png: str | os.PathLike, *,
                     labels: torch.Tensor, gt_masks: torch.Tensor, matcher, max_queries: int = 4) -> Path:
    """One image's masks layer by layer (MP-Former's Figure 3 idea): a row per query that finally owns
    one of the largest GT segments, a column per prediction set, the GT last. The title of each cell
    names the query the Hungarian matching assigns that GT to at that set (red when it differs from
    the final owner), so inconsistent layers are visible at a glance.

    image: uint8 [3, H, W] (unpadded); sets: per set {"pred_logits": [Q, K+1], "pred_masks": [Q, h, w]};
    labels [N], gt_masks [N, Hp, Wp] at the padded size the predictions refer to."""
    from matplotlib.figure import Figure

    _check_image(image)
    h, w = image.shape[-2:]
    hp, wp = gt_masks.shape[-2:]
    if len(labels) == 0:
        raise ValueError("plot_layer_masks: the image has no GT segment")
    order = gt_masks.flatten(1).sum(1).argsort(descending=True)[:max_queries].tolist()
    owners = []
    for s in sets:
        gen = torch.Generator(device=s["pred_masks"].device).manual_seed(0)
        rows, cols = matcher({k: v[None] for k, v in s.items()}, [{"labels": labels, "masks": gt_masks}],
                             generator=gen)[0]
        owner = torch.empty(len(labels), dtype=torch.int64)
        owner[cols] = rows
        owners.append(owner)
    base = image.permute(1, 2, 0).cpu().numpy().astype(np.float32) / 255.0
    red = np.array([1.0, 0.15, 0.1], dtype=np.float32)

    def overlay(mask: torch.Tensor) -> np.ndarray:
        m = mask.cpu().numpy()[..., None].astype(np.float32)
        # outside the mask the image is dimmed, inside it is tinted: masks stay visible on busy images
        return (base * 0.3) * (1 - m) + (base * 0.6 + red * 0.4) * m

    n_cols = len(sets) + 1
    figure = Figure(figsize=(1.6 * n_cols, 1.7 * len(order)))
    axes = figure.subplots(len(order), n_cols, squeeze=False)
    for r, j in enumerate(order):
        q = int(owners[-1][j])
        for c, s in enumerate(sets):
            logits = torch.nn.functional.interpolate(s["pred_masks"][q][None, None].float(), size=(hp, wp),
                                                     mode="bilinear", align_corners=False)[0, 0, :h, :w]
            axes[r, c].imshow(overlay(logits > 0))
            matched = int(owners[c][j])
            axes[r, c].set_title(f"set {c}: q{matched}", fontsize=7, color="black" if matched == q else "red")
        axes[r, -1].imshow(overlay(gt_masks[j, :h, :w].bool()))
        axes[r, -1].set_title(f"GT (class {int(labels[j])})", fontsize=7)
        axes[r, 0].set_ylabel(f"query {q}", fontsize=8)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle("masks of the final owner query per layer (title: query matched at that layer)", fontsize=8)
    figure.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_png) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    return out_png
