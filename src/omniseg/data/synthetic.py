"""A built-in, procedurally generated segmentation dataset written to disk in the real formats.

Scenes: two textured "stuff" regions (stripes vs dots, split by a wavy boundary, random side and
colours) and 2-6 occluding "thing" shapes (circle, square, triangle, cross) of random size, rotation,
colour and shading. Colours come from one distribution for every class, so only texture (stuff) and
shape (things) identify a class. Because it is written as COCO panoptic, COCO instance and a semantic
PNG folder, the same readers used for real data train and evaluate on it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from omniseg.data.meta import DatasetMeta

FORMAT_VERSION = 1
THING_CLASSES = ["circle", "square", "triangle", "cross"]
STUFF_CLASSES = ["stripes", "dots"]
# Dataset ids deliberately differ from contiguous ids so id-mapping mistakes show up on this data.
THING_IDS = [1, 2, 3, 4]
STUFF_IDS = [11, 12]
CLASS_COLORS = [(220, 20, 60), (0, 130, 200), (255, 180, 0), (60, 180, 75), (145, 30, 180), (170, 110, 40)]
SPLITS = ("train", "val")
_MARKER = ".omniseg_synthetic"


def synthetic_meta() -> DatasetMeta:
    """Things first (contiguous 0..3), then stuff (4, 5), matching the JSON category order."""
    return DatasetMeta(
        classes=THING_CLASSES + STUFF_CLASSES,
        isthing=[True] * len(THING_CLASSES) + [False] * len(STUFF_CLASSES),
        dataset_ids=THING_IDS + STUFF_IDS,
        colors=CLASS_COLORS,
        name="synthetic",
    )


def synthetic_paths(root: str | os.PathLike, split: str) -> dict[str, Path]:
    """Where each format of `split` lives under a generated dataset root."""
    root = Path(root)
    return {
        "image_dir": root / split / "images",
        "panoptic_json": root / "annotations" / f"panoptic_{split}.json",
        "panoptic_png_dir": root / "annotations" / f"panoptic_{split}",
        "instances_json": root / "annotations" / f"instances_{split}.json",
        "semantic_dir": root / f"semantic_{split}",
        "meta": root / "meta.json",
    }


# ----------------------------------------------------------------------------------------------
# Drawing (vectorised over the whole image: 128 px images cost well under a millisecond per shape)


def _random_color(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3).astype(np.float32)


def _stripes(rng, xx, yy) -> np.ndarray:
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(5.0, 12.0)
    t = (xx * float(np.cos(angle)) + yy * float(np.sin(angle))) * (1.0 / period) + rng.uniform(0, 1)
    on = (t - np.floor(t)) < rng.uniform(0.35, 0.65)
    c1, c2 = _random_color(rng), _random_color(rng)
    return np.where(on[..., None], c1, c2)


def _dots(rng, xx, yy) -> np.ndarray:
    angle = rng.uniform(0, np.pi / 2)
    spacing = rng.uniform(6.0, 11.0)
    radius = spacing * rng.uniform(0.22, 0.38)
    c, s = float(np.cos(angle)), float(np.sin(angle))
    u = (xx * c + yy * s) * (1.0 / spacing) + rng.uniform(0, 1)
    v = (yy * c - xx * s) * (1.0 / spacing) + rng.uniform(0, 1)
    du, dv = u - np.round(u), v - np.round(v)
    on = (du * du + dv * dv) * spacing * spacing <= radius * radius
    c1, c2 = _random_color(rng), _random_color(rng)
    return np.where(on[..., None], c1, c2)


def _shape_mask(kind: int, xx, yy, cx, cy, r, theta, aspect) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    c, s = float(np.cos(theta)), float(np.sin(theta))
    u, v = c * dx + s * dy, -s * dx + c * dy
    if kind == 0:  # circle
        return u * u + v * v <= r * r
    if kind == 1:  # square / rectangle
        return (np.abs(u) <= r * 0.85) & (np.abs(v) <= r * 0.85 * aspect)
    if kind == 2:  # triangle (equilateral, circumradius r): inside all three edge half-planes
        inside = np.ones_like(u, dtype=bool)
        for a in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3):
            inside &= (u * float(np.cos(a + np.pi)) + v * float(np.sin(a + np.pi))) <= r / 2
        return inside
    # cross: two bars of half-width w
    w = r * 0.3
    return ((np.abs(u) <= r) & (np.abs(v) <= w)) | ((np.abs(v) <= r) & (np.abs(u) <= w))


def _render_scene(rng: np.random.Generator, size: int, xx, yy):
    """Image [S,S,3] uint8, stuff index map [S,S], instance list [(class, full mask)] in paint order, inst map."""
    # Stuff: wavy boundary, random side for each texture.
    base = size * rng.uniform(0.35, 0.65)
    amp1, amp2 = size * rng.uniform(0.03, 0.12), size * rng.uniform(0.0, 0.05)
    f1, f2 = rng.uniform(0.5, 2.0), rng.uniform(2.0, 5.0)
    p1, p2 = rng.uniform(0, 2 * np.pi, size=2)
    x = np.arange(size, dtype=np.float32)
    boundary = base + amp1 * np.sin(2 * np.pi * f1 * x / size + p1) + amp2 * np.sin(2 * np.pi * f2 * x / size + p2)
    top_is_stripes = rng.random() < 0.5
    top = yy < boundary[None, :]
    stuff = np.where(top == top_is_stripes, 0, 1)  # 0 = stripes, 1 = dots
    image = np.where((stuff == 0)[..., None], _stripes(rng, xx, yy), _dots(rng, xx, yy))

    # Things, painter's order; instances left with too few visible pixels are not drawn at all.
    n = int(rng.integers(2, 7))
    shapes = []
    for _ in range(n):
        kind = int(rng.integers(0, len(THING_CLASSES)))
        r = size * rng.uniform(0.08, 0.22)
        cx, cy = rng.uniform(0.1 * size, 0.9 * size, size=2)
        mask = _shape_mask(kind, xx, yy, cx, cy, r, rng.uniform(0, 2 * np.pi), rng.uniform(0.55, 1.0))
        shading = int(rng.integers(0, 3))  # 0 flat, 1 linear gradient, 2 radial gradient
        c1, c2 = _random_color(rng), _random_color(rng)
        shapes.append((kind, mask, c1, c2, (shading, rng.uniform(0, 2 * np.pi), cx, cy, r)))

    min_area = max(8, int(0.001 * size * size))
    inst = np.zeros((size, size), dtype=np.int32)
    for j, (_, mask, *_rest) in enumerate(shapes):
        inst[mask] = j + 1
    visible = np.bincount(inst.ravel(), minlength=n + 1)[1:]
    # Dropping a shape only uncovers earlier ones, so one pass leaves every kept shape >= min_area.
    shapes = [sh for j, sh in enumerate(shapes) if visible[j] >= min_area]
    inst[:] = 0
    for j, (_, mask, c1, c2, (shading, a, cx, cy, r)) in enumerate(shapes):
        inst[mask] = j + 1
        px, py = xx[mask], yy[mask]
        if shading == 0:
            t = np.zeros_like(px)
        elif shading == 1:
            t = np.clip(((px - cx) * float(np.cos(a)) + (py - cy) * float(np.sin(a))) / (2 * r) + 0.5, 0, 1)
        else:
            t = np.clip(np.sqrt((px - cx) ** 2 + (py - cy) ** 2) / r, 0, 1)
        image[mask] = c1 * (1 - t[:, None]) + c2 * t[:, None]

    image += rng.standard_normal(size=image.shape, dtype=np.float32) * 3.0
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return image, stuff, [(sh[0], sh[1]) for sh in shapes], inst


def _id_to_rgb(ids: np.ndarray) -> np.ndarray:
    return np.stack([ids % 256, (ids // 256) % 256, (ids // 65536) % 256], axis=-1).astype(np.uint8)


def _generate_split(root: Path, split: str, count: int, size: int, seed: int) -> None:
    paths = synthetic_paths(root, split)
    for key in ("image_dir", "panoptic_png_dir", "semantic_dir"):
        paths[key].mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    meta = synthetic_meta()
    categories = [
        {"id": meta.dataset_ids[i], "name": meta.classes[i], "isthing": int(meta.isthing[i]),
         "color": list(meta.colors[i]), "supercategory": "thing" if meta.isthing[i] else "stuff"}
        for i in range(meta.num_classes)
    ]
    num_things = len(THING_CLASSES)
    images, pan_anns, inst_anns = [], [], []
    ann_id = 1
    for i in range(count):
        image_id = i + 1
        rng = np.random.default_rng([seed, SPLITS.index(split) if split in SPLITS else 7, i])
        image, stuff, shapes, inst = _render_scene(rng, size, xx, yy)
        name = f"{image_id:06d}"

        # Segment ids: things 1..N in paint order, then stuff regions N+1, N+2.
        sem = np.where(inst > 0, 0, stuff + num_things).astype(np.uint8)
        pan = np.zeros((size, size), dtype=np.int64)
        segments = []
        for j, (kind, _) in enumerate(shapes):
            vis = inst == j + 1
            sem[vis] = kind
            pan[vis] = j + 1
            rle = mask_utils.encode(np.asfortranarray(vis.astype(np.uint8)))
            bbox = [float(v) for v in mask_utils.toBbox(rle)]
            area = int(vis.sum())
            segments.append({"id": j + 1, "category_id": THING_IDS[kind], "iscrowd": 0, "area": area, "bbox": bbox})
            rle["counts"] = rle["counts"].decode("ascii")
            inst_anns.append({"id": ann_id, "image_id": image_id, "category_id": THING_IDS[kind], "iscrowd": 0,
                              "segmentation": rle, "area": area, "bbox": bbox})
            ann_id += 1
        for k in range(len(STUFF_CLASSES)):
            region = (inst == 0) & (stuff == k)
            if region.any():
                seg_id = len(shapes) + 1 + k
                pan[region] = seg_id
                rle = mask_utils.encode(np.asfortranarray(region.astype(np.uint8)))
                segments.append({"id": seg_id, "category_id": STUFF_IDS[k], "iscrowd": 0, "area": int(region.sum()),
                                 "bbox": [float(v) for v in mask_utils.toBbox(rle)]})

        Image.fromarray(image).save(paths["image_dir"] / f"{name}.png", compress_level=1)
        Image.fromarray(_id_to_rgb(pan)).save(paths["panoptic_png_dir"] / f"{name}.png", compress_level=1)
        Image.fromarray(sem).save(paths["semantic_dir"] / f"{name}.png", compress_level=1)
        images.append({"id": image_id, "file_name": f"{name}.png", "height": size, "width": size})
        pan_anns.append({"image_id": image_id, "file_name": f"{name}.png", "segments_info": segments})

    with open(paths["panoptic_json"], "w") as f:
        json.dump({"images": images, "annotations": pan_anns, "categories": categories}, f)
    with open(paths["instances_json"], "w") as f:
        json.dump({"images": images, "annotations": inst_anns,
                   "categories": [c for c in categories if c["isthing"]]}, f)


def _manifest(num_train: int, num_val: int, image_size: int, seed: int) -> dict:
    return {"format_version": FORMAT_VERSION, "num_train": int(num_train), "num_val": int(num_val),
            "image_size": int(image_size), "seed": int(seed)}


def is_complete(out_dir: str | os.PathLike, manifest: dict) -> bool:
    """True when `out_dir` holds a finished dataset generated with exactly these parameters."""
    root = Path(out_dir)
    try:
        with open(root / "manifest.json") as f:
            if json.load(f) != manifest:
                return False
    except (OSError, json.JSONDecodeError):
        return False
    for split, count in (("train", manifest["num_train"]), ("val", manifest["num_val"])):
        p = synthetic_paths(root, split)
        if not (p["panoptic_json"].is_file() and p["instances_json"].is_file()):
            return False
        for key in ("image_dir", "panoptic_png_dir", "semantic_dir"):
            if not p[key].is_dir() or sum(1 for _ in p[key].glob("*.png")) != count:
                return False
    return True


def existing_manifest(out_dir: str | os.PathLike) -> dict | None:
    """The parameters of the finished synthetic dataset in `out_dir`, or None if there is none."""
    try:
        with open(Path(out_dir) / "manifest.json") as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        return None
    return manifest if is_complete(out_dir, manifest) else None


def generate(out_dir: str | os.PathLike, num_train: int = 320, num_val: int = 80, image_size: int = 128,
             seed: int = 0, overwrite: bool = False) -> Path:
    """Write the dataset to `out_dir` (skipped when already complete with the same parameters).

    Generation happens in a sibling temporary directory that is renamed into place, so concurrent
    processes (e.g. distributed ranks) and interrupted runs never leave a half-written dataset.
    """
    root = Path(out_dir)
    manifest = _manifest(num_train, num_val, image_size, seed)
    if not overwrite and is_complete(root, manifest):
        return root
    if root.exists() and any(root.iterdir()) and not (root / _MARKER).exists():
        from omniseg.data.errors import DataError

        raise DataError(root, "exists, is not empty and is not a synthetic dataset directory; refusing to overwrite")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        (tmp / _MARKER).write_text("generated by omniseg.data.synthetic\n")
        for split, count in (("train", num_train), ("val", num_val)):
            _generate_split(tmp, split, count, image_size, seed)
        with open(tmp / "meta.json", "w") as f:
            json.dump(synthetic_meta().to_dict(), f, indent=1)
        with open(tmp / "manifest.json", "w") as f:
            json.dump(manifest, f, indent=1)
        if is_complete(root, manifest) and not overwrite:  # another process finished first
            shutil.rmtree(tmp)
            return root
        if root.exists():
            shutil.rmtree(root)
        try:
            os.replace(tmp, root)
        except OSError:
            if not is_complete(root, manifest):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # lost a race to an identical dataset
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
