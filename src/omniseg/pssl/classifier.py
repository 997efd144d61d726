"""The classifiers whose explanations become pseudo labels: train one from scratch, or load any.

PSSL explains an *ensemble*: several classifiers that disagree on noise but agree on the object.
Here an ensemble is several `train_classifier` runs with different seeds (initialisation, sampling
and augmentation all follow the seed), or local timm checkpoints the user already has. Nothing is
ever downloaded (`pretrained=False` always).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import timm
import torch
from torch import nn
from torch.nn import functional as F

from omniseg.pssl.folder import ClassificationFolder

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # 0-255 scale, as model.pixel_mean in the configs
IMAGENET_STD = (58.395, 57.12, 57.375)
FORMAT = "omniseg_pssl_classifier"
# Decoded training images are kept in memory when they fit in this many bytes (a busy CPU spends
# most of a small classifier's step decoding PNGs otherwise).
CACHE_BYTES = 512 << 20


@dataclass
class Classifier:
    """A classifier ready for saliency: eval-mode model, its input size and normalisation."""

    model: nn.Module
    arch: str
    num_classes: int
    image_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    classes: list[str] | None = None
    path: Path | None = None

    def class_ids_for(self, names: Sequence[str]) -> list[int]:
        """Output index of each folder class: by name when the classifier knows its class names,
        else by position (folder classes sorted by name, as timm / torchvision order ImageNet)."""
        if self.classes is not None:
            missing = [n for n in names if n not in self.classes]
            if missing:
                raise ValueError(f"{self.path}: classes {missing[:10]} of the folder are not among the "
                                 f"classifier's {len(self.classes)} classes")
            return [self.classes.index(n) for n in names]
        if len(names) > self.num_classes:
            raise ValueError(f"{self.path}: the folder has {len(names)} classes but the classifier only "
                             f"{self.num_classes} outputs")
        return list(range(len(names)))


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """float 0-255 [B,3,H,W] -> the classifier's input space."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return (images.float() - m) / s


def resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8/float [3,H,W] -> float [3,size,size] (antialiased bilinear; classifiers see squares)."""
    x = image.float()
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def create_model(arch: str, num_classes: int, timm_kwargs: dict | None = None) -> nn.Module:
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, **(timm_kwargs or {}))


class _Images:
    """Resized float images of a folder subset, decoded once when they fit in memory."""

    def __init__(self, folder: ClassificationFolder, indices: list[int], size: int):
        self.folder, self.indices, self.size = folder, indices, size
        self.cache = None
        if len(indices) * 3 * size * size <= CACHE_BYTES:
            self.cache = torch.stack([resize(folder[i][0], size).round().to(torch.uint8) for i in indices])

    def get(self, positions: Sequence[int]) -> torch.Tensor:
        if self.cache is not None:
            return self.cache[list(positions)].float()
        return torch.stack([resize(self.folder[self.indices[p]][0], self.size) for p in positions])

    def labels(self, positions: Sequence[int]) -> torch.Tensor:
        return torch.tensor([self.folder.items[self.indices[p]].label for p in positions], dtype=torch.int64)


def _augment(size: int):
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomResizedCrop(size, scale=(0.6, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
                       v2.RandomHorizontalFlip()])


@torch.no_grad()
def accuracy(clf: Classifier, images: _Images, batch: int = 64) -> float:
    """Top-1 accuracy of the classifier on a subset (fraction in [0, 1])."""
    clf.model.eval()
    correct, n = 0, len(images.indices)
    device = next(clf.model.parameters()).device
    for start in range(0, n, batch):
        pos = list(range(start, min(n, start + batch)))
        logits = clf.model(normalize(images.get(pos).to(device), clf.mean, clf.std))
        correct += int((logits.argmax(1).cpu() == images.labels(pos)).sum())
    return correct / max(1, n)


def _out_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    out = Path(out)
    weights = out if out.suffix == ".safetensors" else out / "classifier.safetensors"
    return weights, weights.with_suffix(".json")


def train_classifier(folder: str | os.PathLike | ClassificationFolder, *, out: str | os.PathLike,
                     arch: str = "resnet18", iters: int = 500, batch: int = 32, lr: float = 1e-3,
                     weight_decay: float = 0.05, seed: int = 0, image_size: int = 64,
                     timm_kwargs: dict | None = None, val_fraction: float = 0.1, schedule: str = "cosine",
                     device: str | torch.device = "cpu",
                     progress: Callable[[int, float], None] | None = None) -> Path:
    """Train a timm classifier from scratch on a classification folder; returns the .safetensors path.

    AdamW, linear warm-up over the first 5% of steps, then cosine (or poly 0.9) decay to 0; random
    resized crops (scale 0.6-1) and horizontal flips. A deterministic 10% per class (`val_fraction`) is
    held out and its top-1 accuracy stored in the json next to the weights (with the per-step losses).
    `out` is a .safetensors file or a folder (then classifier.safetensors + classifier.json in it).
    """
    if schedule not in ("cosine", "poly"):
        raise ValueError(f"schedule must be cosine or poly, got {schedule!r}")
    if iters < 1 or batch < 1:
        raise ValueError("iters and batch must be >= 1")
    data = folder if isinstance(folder, ClassificationFolder) else ClassificationFolder(folder)
    train_idx, val_idx = data.split(val_fraction, seed=0)  # one split for every seed: comparable accuracies
    weights_path, json_path = _out_paths(out)
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):  # the seed drives init + augmentation, callers' RNG untouched
        torch.manual_seed(seed)
        model = create_model(arch, data.num_classes, timm_kwargs).to(device)
        clf = Classifier(model, arch, data.num_classes, image_size, classes=list(data.classes), path=weights_path)
        train_set, val_set = _Images(data, train_idx, image_size), _Images(data, val_idx, image_size)
        augment = _augment(image_size)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        warmup = max(1, iters // 20)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            t = (step - warmup) / max(1, iters - warmup)
            return 0.5 * (1 + math.cos(math.pi * t)) if schedule == "cosine" else (1 - t) ** 0.9

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        gen = torch.Generator().manual_seed(seed)
        order: list[int] = []
        losses = []
        model.train()
        for step in range(iters):
            if len(order) < min(batch, len(train_idx)):
                order += torch.randperm(len(train_idx), generator=gen).tolist()
            pos, order = order[:batch], order[batch:]
            x = torch.stack([augment(img) for img in train_set.get(pos)]).to(device)
            y = train_set.labels(pos).to(device)
            loss = F.cross_entropy(model(normalize(x, clf.mean, clf.std)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(step, losses[-1])
        acc = accuracy(clf, val_set) if val_idx else None
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(weights_path))
    info = {"format": FORMAT, "arch": arch, "timm_kwargs": timm_kwargs or {}, "classes": list(data.classes),
            "num_classes": data.num_classes, "image_size": image_size, "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD), "folder": str(data.root), "seed": seed, "iters": iters, "batch": batch,
            "lr": lr, "weight_decay": weight_decay, "schedule": schedule, "val_fraction": val_fraction,
            "train_images": len(train_idx), "val_images": len(val_idx), "val_accuracy": acc,
            "losses": [round(v, 5) for v in losses]}
    json_path.write_text(json.dumps(info, indent=1))
    return weights_path


def load_classifier(path: str | os.PathLike, *, arch: str | None = None, num_classes: int | None = None,
                    image_size: int | None = None, timm_kwargs: dict | None = None,
                    device: str | torch.device = "cpu") -> Classifier:
    """A classifier from `train_classifier`'s output (weights + json), or from a local timm checkpoint
    (.safetensors / .pth / .bin) given its timm `arch`.

    The json, when present, describes the model completely and the other arguments are not used (so
    one `arch` can be given for a mixed list of files). For a plain checkpoint, the number of classes is
    read from the classifier layer's weight, the input size and normalisation from timm's default
    config of `arch`; output i is folder class i.
    """
    from omniseg.hub import CheckpointError, load_state_dict_file, report_load

    p = Path(path)
    if p.is_dir():
        p = p / "classifier.safetensors"
    if not p.is_file():
        raise CheckpointError(f"{p}: no such classifier weights file")
    sidecar = p.with_suffix(".json")
    info = None
    if sidecar.is_file():
        try:
            info = json.loads(sidecar.read_text())
        except (OSError, ValueError) as e:
            if arch is None:
                raise CheckpointError(f"{sidecar}: unreadable classifier json ({e})") from None
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            info = None
    if info is None and arch is None:
        raise CheckpointError(f"{p}: no omniseg classifier json next to it; name the timm architecture "
                              f"of this checkpoint (arch=..., CLI --arch)")
    sd = load_state_dict_file(p)
    if info is not None:
        try:
            arch, timm_kwargs, k = info["arch"], info.get("timm_kwargs") or {}, int(info["num_classes"])
            size, classes = int(info["image_size"]), [str(c) for c in info["classes"]]
            mean, std = tuple(info.get("mean", IMAGENET_MEAN)), tuple(info.get("std", IMAGENET_STD))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{sidecar}: malformed classifier json ({type(e).__name__}: {e})") from None
        model = create_model(arch, k, timm_kwargs)
        report_load(model, sd, source=str(p), strict=True)
        clf = Classifier(model, arch, k, size, mean, std, classes=classes, path=p)
    else:
        probe = create_model(arch, 1, timm_kwargs)
        cfg = probe.pretrained_cfg or {}
        head = cfg.get("classifier", "fc")
        head = head[0] if isinstance(head, (list, tuple)) else head
        if num_classes is None:
            w = sd.get(f"{head}.weight")
            if w is None:
                raise CheckpointError(f"{p}: no '{head}.weight' to read the number of classes from; pass num_classes")
            num_classes = int(w.shape[0])
        model = create_model(arch, num_classes, timm_kwargs)
        report_load(model, sd, source=str(p), strict=True)
        size = image_size or int((cfg.get("input_size") or (3, 224, 224))[-1])
        mean = tuple(255.0 * v for v in cfg.get("mean", (0.485, 0.456, 0.406)))
        std = tuple(255.0 * v for v in cfg.get("std", (0.229, 0.224, 0.225)))
        clf = Classifier(model, arch, num_classes, size, mean, std, classes=None, path=p)
    clf.model.to(device).eval()
    for q in clf.model.parameters():  # saliency needs input gradients only
        q.requires_grad_(False)
    return clf
