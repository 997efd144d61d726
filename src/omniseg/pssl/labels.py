"""Pseudo semantic segmentation labels from classifier explanations, as a `semantic_folder` dataset.

Per image: ensemble SmoothGrad of its ground-truth class -> per-image deciles -> decile 9 gets the
image's class id, everything else the background id K (the LAST class, as PaddleSeg's PSSL data:
ImageNet's 1000 classes, background 1000). The result is an ordinary omniseg dataset, so pre-training
is a plain `omniseg train` run with class-weighted CE (1.0 per object class, 0.1 for background:
background covers ~9x the pixels of any class).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from omniseg.pssl.classifier import Classifier, load_classifier
from omniseg.pssl.crops import prepare_out_dir
from omniseg.pssl.folder import ClassificationFolder
from omniseg.pssl.saliency import decile_map, ensemble_saliency

LABELS_MARKER = ".omniseg_pssl_labels"
FORMAT = "omniseg_pssl_labels"
OBJECT_WEIGHT = 1.0
BACKGROUND_WEIGHT = 0.1  # PaddleSeg configs/pssl: weight 0.1 for the background class
TOP_DECILE = 9


@dataclass
class LabelReport:
    out_dir: Path
    classes: list[str]  # object classes then the background class
    class_weights: list[float]
    images: dict[str, int] = field(default_factory=dict)
    foreground_fraction: float = 0.0
    ignore_index: int = 255
    command: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def background_id(self) -> int:
        return len(self.classes) - 1

    def command_line(self) -> str:
        return " ".join(shlex.quote(a) for a in self.command)


def class_weights(num_object_classes: int) -> list[float]:
    return [OBJECT_WEIGHT] * num_object_classes + [BACKGROUND_WEIGHT]


def pseudo_label(deciles: torch.Tensor, class_id: int, background_id: int) -> torch.Tensor:
    """[H,W] deciles -> [H,W] ids: the image's class in the top decile, background elsewhere."""
    return torch.where(deciles == TOP_DECILE, torch.as_tensor(class_id), torch.as_tensor(background_id))


def data_config(root: str | os.PathLike, classes: Sequence[str], split: str, ignore_index: int = 255) -> dict:
    """The `data.<split>` section that reads the written dataset."""
    cfg = {"format": "semantic_folder", "root": str(root), "split": split, "classes": list(classes)}
    if ignore_index != 255:
        cfg["ignore_index"] = ignore_index
    return cfg


def _yaml_value(v) -> str:
    return json.dumps(v, separators=(",", ":")) if isinstance(v, list) else str(v)


def train_command(root: str | os.PathLike, classes: Sequence[str], weights: Sequence[float], *,
                  preset: str = "pspnet_demo", has_val: bool = True, ignore_index: int = 255,
                  output_dir: str | os.PathLike | None = None) -> list[str]:
    """argv of the `omniseg train` run that pre-trains on the pseudo labels (values are YAML/JSON,
    so class names with spaces or commas survive OmegaConf's dotted-override parser)."""
    args = ["omniseg", "train", preset, "task=semantic", "eval_tasks=[semantic]"]
    for split in ("train", "val"):
        cfg = data_config(root, classes, "val" if (split == "val" and has_val) else "train", ignore_index)
        args += [f"data.{split}.{k}={_yaml_value(v)}" for k, v in cfg.items()]
    args.append("model.loss.class_weights=[" + ",".join(repr(float(w)) for w in weights) + "]")
    if output_dir is not None:
        args.append(f"train.output_dir={output_dir}")
    return args


def _write_label(path: Path, label: np.ndarray, sixteen_bit: bool) -> None:
    arr = label.astype(np.uint16 if sixteen_bit else np.uint8)
    Image.fromarray(arr).save(path, compress_level=1)


def write_pseudo_labels(folder: str | os.PathLike | ClassificationFolder,
                        classifiers: Sequence[Classifier | str | os.PathLike], out_dir: str | os.PathLike, *,
                        n_samples: int = 16, noise: float = 0.15, val_fraction: float = 0.1, seed: int = 0,
                        batch: int = 8, device: str | torch.device = "cpu", preset: str = "pspnet_demo",
                        overwrite: bool = False,
                        progress: Callable[[range], object] | None = None) -> LabelReport:
    """Write images/{train,val}/<class>/<file> (copies) + labels/{train,val}/<class>/<stem>.png + pssl.json.

    Labels: class id (0..K-1, folder order) on the top-decile pixels of the ensemble saliency,
    background id K elsewhere; 8-bit PNGs (16-bit with ignore index 65535 when K + 1 > 255). The
    train/val split is stratified and seeded (`val_fraction`, `seed`); the SmoothGrad noise follows
    `seed` too, so the same arguments write the same files.
    """
    data = folder if isinstance(folder, ClassificationFolder) else ClassificationFolder(folder)
    device = torch.device(device)
    models = [c if isinstance(c, Classifier) else load_classifier(c, device=device) for c in classifiers]
    if not models:
        raise ValueError("write_pseudo_labels needs at least one classifier")
    for m in models:
        m.model.to(device)
    # Folder class -> output index of each model (by name when the model knows its class names).
    tables = [torch.tensor(m.class_ids_for(data.classes), dtype=torch.int64, device=device) for m in models]
    k = data.num_classes
    background = "background" if "background" not in data.classes else "_background"
    classes = list(data.classes) + [background]
    sixteen_bit = k + 1 > 255
    ignore_index = 65535 if sixteen_bit else 255
    train_idx, val_idx = data.split(val_fraction, seed)
    split_of = {i: "train" for i in train_idx} | {i: "val" for i in val_idx}

    out = Path(out_dir)
    prepare_out_dir(out, LABELS_MARKER, overwrite, "pseudo labels")
    names: dict[int, str] = {}
    for c in range(k):  # unique stems per class folder: a.jpg and a.png would share a label file
        idx = [i for i, it in enumerate(data.items) if it.label == c]
        stems = [data.items[i].path.stem for i in idx]
        for i, stem in zip(idx, stems):
            p = data.items[i].path
            names[i] = stem if stems.count(stem) == 1 else f"{stem}_{p.suffix.lstrip('.').lower()}"

    gen = torch.Generator(device=device).manual_seed(seed)
    counts = {s: [0] * k for s in ("train", "val")}
    pixels = [0] * (k + 1)
    fg_fraction = 0.0
    starts = range(0, len(data), batch)
    for start in (progress(starts) if progress is not None else starts):
        idx = list(range(start, min(len(data), start + batch)))
        images = [data[i][0].to(device) for i in idx]
        labels = torch.tensor([data.items[i].label for i in idx], dtype=torch.int64, device=device)
        maps = ensemble_saliency(models, images, [t[labels] for t in tables], n_samples=n_samples, noise=noise,
                                 generator=gen)
        for i, sal in zip(idx, maps):
            item = data.items[i]
            split = split_of[i]
            label = pseudo_label(decile_map(sal), item.label, k).cpu()
            img_dir = out / "images" / split / data.classes[item.label]
            lab_dir = out / "labels" / split / data.classes[item.label]
            img_dir.mkdir(parents=True, exist_ok=True)
            lab_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(item.path, img_dir / f"{names[i]}{item.path.suffix}")
            _write_label(lab_dir / f"{names[i]}.png", label.numpy(), sixteen_bit)
            counts[split][item.label] += 1
            fg = int((label == item.label).sum())
            pixels[item.label] += fg
            pixels[k] += label.numel() - fg
            fg_fraction += fg / label.numel()

    weights = class_weights(k)
    root = out.resolve()
    n_images = {s: sum(v) for s, v in counts.items()}
    command = train_command(root, classes, weights, preset=preset, has_val=n_images["val"] > 0,
                            ignore_index=ignore_index, output_dir=root / "pretrain")
    report = LabelReport(out_dir=out, classes=classes, class_weights=weights, images=n_images,
                         foreground_fraction=fg_fraction / max(1, len(data)), ignore_index=ignore_index,
                         command=command)
    info = {
        "format": FORMAT,
        "classes": classes,
        "num_classes": k + 1,
        "background_id": k,
        "class_weights": weights,
        "ignore_index": ignore_index,
        "label_bits": 16 if sixteen_bit else 8,
        "images": n_images,
        "images_per_class": {s: dict(zip(data.classes, v)) for s, v in counts.items()},
        "pixels_per_class": dict(zip(classes, pixels)),
        "foreground_fraction": report.foreground_fraction,
        "source_folder": str(data.root),
        "classifiers": [str(m.path) if m.path else m.arch for m in models],
        "n_samples": n_samples,
        "noise": noise,
        "seed": seed,
        "val_fraction": val_fraction,
        "data": {s: data_config(root, classes, s if n_images[s] > 0 else "train", ignore_index)
                 for s in ("train", "val")},
        "train_command": report.command_line(),
    }
    (out / "pssl.json").write_text(json.dumps(info, indent=1))
    return report
