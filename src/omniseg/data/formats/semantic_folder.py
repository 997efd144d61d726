"""A folder of images and a folder of single-channel label PNGs paired by file stem.

Presets encode the id conventions of common datasets (CamVid void=11, ADE20K reduce-zero-label,
Cityscapes labelIds -> trainIds, binary masks 0 / 255 or 0 / 1) so users never hand-write a lookup table
for them.
"""

from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from omniseg.data.errors import DataError
from omniseg.data.formats.files import (
    IMAGE_EXTENSIONS,
    check_same_size,
    load_png_array,
    load_rgb_image,
    require_path,
)
from omniseg.data.meta import DatasetMeta

CAMVID_CLASSES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                  "Pedestrian", "Bicyclist"]
CAMVID_COLORS = [(128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
                 (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)]

# (labelId, trainId name, colour, isthing) for the 19 evaluated Cityscapes classes, in trainId order.
CITYSCAPES = [
    (7, "road", (128, 64, 128), False), (8, "sidewalk", (244, 35, 232), False),
    (11, "building", (70, 70, 70), False), (12, "wall", (102, 102, 156), False),
    (13, "fence", (190, 153, 153), False), (17, "pole", (153, 153, 153), False),
    (19, "traffic light", (250, 170, 30), False), (20, "traffic sign", (220, 220, 0), False),
    (21, "vegetation", (107, 142, 35), False), (22, "terrain", (152, 251, 152), False),
    (23, "sky", (70, 130, 180), False), (24, "person", (220, 20, 60), True), (25, "rider", (255, 0, 0), True),
    (26, "car", (0, 0, 142), True), (27, "truck", (0, 0, 70), True), (28, "bus", (0, 60, 100), True),
    (31, "train", (0, 80, 100), True), (32, "motorcycle", (0, 0, 230), True), (33, "bicycle", (119, 11, 32), True),
]

PRESETS = ("camvid", "ade20k", "cityscapes", "binary")


def read_ade20k_object_info(path: str | os.PathLike) -> tuple[list[str], list[bool]]:
    """Class names (first synonym) and thing flags from ADE20K's objectInfo150.csv."""
    p = require_path(path, "ADE20K objectInfo150.csv", is_dir=False)
    names, isthing = [], []
    with open(p, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            names.append(row["Name"].split(";")[0].strip())
            isthing.append(str(row.get("Stuff", "1")).strip() == "0")
    if len(names) != 150:
        raise DataError(p, f"expected 150 classes, found {len(names)}")
    return names, isthing


def _preset(preset: str, class_info: str | os.PathLike | None, ignore: int, classes: Sequence[str] | None = None):
    """(meta, label value -> contiguous id mapping, default label suffix) for a named preset."""
    if preset == "binary":  # 0 = background; 1 or 255 = foreground (both occur in the wild); no ignore value
        names = list(classes) if classes else ["background", "foreground"]
        if len(names) != 2:
            raise ValueError(f"the binary preset has two classes (background, foreground), got {names}")
        meta = DatasetMeta(names, isthing=[False, True], dataset_ids=[0, 255], name="binary", ignore_index=ignore)
        return meta, {0: 0, 1: 1, 255: 1}, ".png"
    if preset == "camvid":
        meta = DatasetMeta(CAMVID_CLASSES, colors=CAMVID_COLORS, name="camvid", ignore_index=ignore)
        mapping = {v: v for v in range(11)} | {11: ignore}
        return meta, mapping, ".png"
    if preset == "ade20k":
        if class_info is not None:
            names, isthing = read_ade20k_object_info(class_info)
        else:
            names, isthing = [f"class_{i}" for i in range(150)], None
        meta = DatasetMeta(names, isthing=isthing, dataset_ids=list(range(1, 151)), name="ade20k",
                           ignore_index=ignore)
        mapping = {0: ignore} | {v: v - 1 for v in range(1, 151)}
        return meta, mapping, ".png"
    if preset == "cityscapes":
        meta = DatasetMeta([c[1] for c in CITYSCAPES], isthing=[c[3] for c in CITYSCAPES],
                           dataset_ids=[c[0] for c in CITYSCAPES], colors=[c[2] for c in CITYSCAPES],
                           name="cityscapes", ignore_index=ignore)
        # Every labelId that is not one of the 19 evaluated classes is ignored.
        mapping = {v: ignore for v in range(256)} | {c[0]: i for i, c in enumerate(CITYSCAPES)}
        return meta, mapping, "_gtFine_labelIds.png"
    raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")


def _index_files(root: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    """Relative path without suffix -> file, searched recursively (Cityscapes nests by city)."""
    found = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        name = p.name
        for suf in suffixes:
            if name.lower().endswith(suf.lower()):
                rel = p.relative_to(root).as_posix()
                found[rel[: len(rel) - len(suf)]] = p
                break
    return found


def frame_sequence(key: str) -> str:
    """The sequence of a frame named `<sequence>_<frame>` (CamVid: 0001TP_006690, Seq05VD_f00000)."""
    return Path(key).name.split("_", 1)[0]


def select_sequences(images: dict[str, Path], image_dir: Path, keep: Sequence[str] | None,
                     drop: Sequence[str] | None) -> dict[str, Path]:
    """The frames of the `keep` sequences (all when None) minus those of `drop`. A named sequence without a
    frame in `image_dir` is an error (a typo would otherwise leave a split silently empty or whole)."""
    present = {frame_sequence(k) for k in images}
    for label, names in (("sequences", keep), ("exclude_sequences", drop)):
        missing = sorted(set(names or ()) - present)
        if missing:
            raise DataError(image_dir, f"data.{label}: no frames of {missing} (sequences here: {sorted(present)})")
    chosen = {k: p for k, p in images.items()
              if (keep is None or frame_sequence(k) in set(keep)) and frame_sequence(k) not in set(drop or ())}
    if not chosen:
        raise DataError(image_dir, f"no frames left after data.sequences={list(keep or [])} / "
                                   f"data.exclude_sequences={list(drop or [])}")
    return chosen


class SemanticFolderDataset(Dataset):
    """Images + label PNGs. Label values map to contiguous ids; unmapped values are a DataError.

    Without a preset, `classes` are the names of label values 0..K-1 (or of the keys of `label_map`,
    a {label value: contiguous id} dict for custom encodings); `ignore_index` stays ignored.
    `sequences` / `exclude_sequences` keep / drop the frames of video sequences named `<sequence>_<frame>`
    (CamVid), so that a validation split can share no sequence with the training frames.
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        label_dir: str | os.PathLike,
        classes: Sequence[str] | None = None,
        preset: str | None = None,
        *,
        image_suffix: str | None = None,
        label_suffix: str | None = None,
        label_map: Mapping[int, int] | None = None,
        class_info: str | os.PathLike | None = None,
        isthing: Sequence[bool] | None = None,
        colors: Sequence[tuple[int, int, int]] | None = None,
        ignore_index: int = 255,
        name: str | None = None,
        sequences: Sequence[str] | None = None,
        exclude_sequences: Sequence[str] | None = None,
    ):
        self.image_dir = require_path(image_dir, "image directory", is_dir=True)
        self.label_dir = require_path(label_dir, "label directory", is_dir=True)
        if preset is not None:
            self.meta, mapping, default_label_suffix = _preset(preset, class_info, ignore_index, classes)
            if preset == "cityscapes" and image_suffix is None:
                image_suffix = "_leftImg8bit.png"
        else:
            if classes is None:
                raise ValueError("SemanticFolderDataset needs `classes` (names of label values) or a `preset`")
            k = len(classes)
            if label_map is not None:
                mapping = {int(v): int(c) for v, c in label_map.items()}
                bad = sorted(c for c in mapping.values() if not (0 <= c < k or c == ignore_index))
                if bad:
                    raise ValueError(f"label_map targets {bad} are neither class ids 0..{k - 1} nor ignore")
                inverse = {c: v for v, c in sorted(mapping.items(), reverse=True) if c != ignore_index}
                dataset_ids = [inverse.get(i, i) for i in range(k)]
            else:
                mapping = {v: v for v in range(k)}
                dataset_ids = None
            mapping[ignore_index] = ignore_index
            self.meta = DatasetMeta(list(classes), isthing=list(isthing) if isthing else None,
                                    dataset_ids=dataset_ids, colors=list(colors) if colors else None,
                                    ignore_index=ignore_index, name=name or Path(self.image_dir).name)
            default_label_suffix = ".png"
        if name:
            self.meta.name = name
        self.ignore_index = ignore_index
        self._warned_binary = preset is not None  # presets say what their values mean
        self.label_suffix = label_suffix or default_label_suffix
        self.image_suffix = image_suffix
        self._mapping = mapping
        self._lut = np.full(256, -1, dtype=np.int64)
        for v, c in mapping.items():
            if 0 <= v < 256:
                self._lut[v] = c

        images = _index_files(self.image_dir, [image_suffix] if image_suffix else IMAGE_EXTENSIONS)
        labels = _index_files(self.label_dir, [self.label_suffix])
        if not images:
            raise DataError(self.image_dir, "no images found" + (f" ending in '{image_suffix}'" if image_suffix else ""))
        if sequences is not None or exclude_sequences is not None:
            images = select_sequences(images, self.image_dir, sequences, exclude_sequences)
        self.items: list[tuple[str, Path, Path]] = []
        for key, image_path in images.items():
            if key not in labels:
                raise DataError(image_path, f"no matching label file '{key}{self.label_suffix}' in {self.label_dir}")
            self.items.append((key, image_path, labels[key]))

    def __len__(self) -> int:
        return len(self.items)

    def map_labels(self, raw: np.ndarray, path: str | os.PathLike) -> torch.Tensor:
        """Raw label values -> int64 contiguous ids; values with no meaning are reported, not guessed."""
        if raw.ndim != 2:
            raise DataError(path, f"label PNG must be single-channel class ids, got shape {raw.shape} "
                                  f"(colour-coded labels need converting to ids first)")
        if not self._warned_binary and raw.dtype == np.uint8 and self.ignore_index == 255 and int(raw.max()) == 255 \
                and set(np.unique(raw).tolist()) == {0, 255}:
            self._warned_binary = True  # once per dataset
            warnings.warn(f"{path}: this label PNG holds only 0 and 255, and 255 is the ignore value here, so "
                          f"every foreground pixel would be ignored; for binary masks set the split's "
                          f"preset: binary (0 = background, 255 or 1 = foreground)", stacklevel=2)
        if raw.dtype == np.uint8:
            out = self._lut[raw]
        else:
            raw = raw.astype(np.int64)
            out = np.full(raw.shape, -1, dtype=np.int64)
            for v in np.unique(raw).tolist():
                if v in self._mapping:
                    out[raw == v] = self._mapping[v]
        bad = out < 0
        if bad.any():
            values = sorted(np.unique(raw[bad]).tolist())
            raise DataError(path, f"label values {values[:20]} are not valid class ids for {self.meta.num_classes} "
                                  f"classes (ignore = {self.ignore_index})")
        return torch.from_numpy(out)

    def image_categories(self, index: int) -> set[int]:
        """The classes present in image `index`'s label PNG (read; the image itself is not decoded)."""
        _, _, label_path = self.items[index]
        sem = self.map_labels(load_png_array(label_path), label_path)
        return {int(c) for c in torch.unique(sem).tolist() if c != self.ignore_index}

    def class_counts(self, max_images: int | None = None) -> list[int]:
        """Images containing each class (scans label files, so optionally limited)."""
        counts = [0] * self.meta.num_classes
        for _, _, label_path in self.items[:max_images]:
            sem = self.map_labels(load_png_array(label_path), label_path)
            for c in torch.unique(sem).tolist():
                if c != self.ignore_index:
                    counts[c] += 1
        return counts

    def __getitem__(self, index: int) -> dict:
        key, image_path, label_path = self.items[index]
        image = load_rgb_image(image_path)
        raw = load_png_array(label_path)
        sem = self.map_labels(raw, label_path)
        check_same_size(label_path, tuple(sem.shape), image_path, tuple(image.shape[-2:]))
        return {
            "image": image,
            "file_name": str(image_path),
            "image_id": key,
            "height": int(image.shape[1]),
            "width": int(image.shape[2]),
            "sem_seg": sem,
        }
