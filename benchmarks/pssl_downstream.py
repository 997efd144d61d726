"""PSSL end to end: pseudo labels from classifier explanations, pre-training, then downstream mIoU with vs without.

    python benchmarks/pssl_downstream.py --out docs/benchmarks/pssl_downstream

1. Source images: a synthetic set of its own seed (not the downstream images), cropped around every
   thing instance into a classification folder (`omniseg pssl crops`).
2. An ensemble of --ensemble narrow ResNet-18 classifiers trained from scratch on the crops
   (`omniseg pssl classifier`, one seed each).
3. Pseudo labels: ensemble SmoothGrad, per-image deciles, top decile = the crop's class, the rest
   background (`omniseg pssl labels`). Their quality is scored against the true instance masks of
   the crops: precision of the top-decile pixels, next to the chance level (the mask's share of the
   crop), which is what a saliency map without signal would get.
4. Pre-training of --preset on the pseudo labels with the class-weighted CE (1.0 objects, 0.1
   background) that `pssl labels` prints.
5. Downstream: the same preset on a small synthetic semantic set (--downstream-train images), for
   --finetune-iters iterations from the PSSL weights (classifier re-initialised: other classes) and
   from scratch, plus from scratch for --finetune-iters + --pretrain-iters iterations (the same number
   of optimiser steps as pre-training + fine-tuning). Scored on the downstream val images.

Every stage is reused once finished (delete its folder under --runs/pssl to redo it). Writes
RESULTS.md and results.json to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
from pathlib import Path

import numpy as np
import torch
from _runs import command_line, finished, train_or_reuse  # benchmarks/_runs.py

NARROW_RESNET18 = {"channels": [32, 64, 128, 256]}


def crop_masks(source: Path, crops: Path, limit: int, margin: float, size: int) -> dict[Path, np.ndarray]:
    """The true instance mask of up to `limit` crops (evenly spread over the files), cropped and resized
    exactly as their images were (file name = train_<image id>_<instance index>.png)."""
    from omniseg.data.build import build_dataset
    from omniseg.pssl.crops import crop_resize, square_window

    files = sorted(crops.glob("*/*.png"))
    files = files[:: max(1, len(files) // limit)][:limit]
    dataset = build_dataset({"format": "synthetic", "root": str(source)}, "train")
    index = {str(dataset[i]["image_id"]): i for i in range(len(dataset))}
    out = {}
    for f in files:
        _, image_id, k = f.stem.rsplit("_", 2)
        sample = dataset[index[image_id]]
        mask = sample["instances"]["masks"][int(k)]
        h, w = mask.shape
        ys, xs = torch.nonzero(mask, as_tuple=True)
        top, left, side = square_window((int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())), margin, h, w)
        m = crop_resize(mask[None].expand(3, -1, -1).to(torch.uint8) * 255, top, left, side, size)[0]
        out[f] = m.numpy() >= 128
    return out


def label_quality(masks: dict[Path, np.ndarray], crops: Path, pseudo: Path) -> dict:
    """Precision of the pseudo-labelled object pixels against the true masks, and the chance level."""
    from PIL import Image

    info = json.loads((pseudo / "pssl.json").read_text())
    background = info["background_id"]
    precision, chance, recall = [], [], []
    for f, mask in masks.items():
        rel = f.relative_to(crops)
        label = None
        for split in ("train", "val"):
            p = pseudo / "labels" / split / rel.parent / f"{f.stem}.png"
            if p.is_file():
                label = np.array(Image.open(p)) != background
        if label is None:
            raise SystemExit(f"{f}: no pseudo label written for this crop under {pseudo / 'labels'}")
        precision.append(float((label & mask).sum() / max(1, label.sum())))
        recall.append(float((label & mask).sum() / max(1, mask.sum())))
        chance.append(float(mask.mean()))
    return {"crops_scored": len(masks), "precision": float(np.mean(precision)), "chance_precision": float(np.mean(chance)),
            "recall": float(np.mean(recall))}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--runs", type=Path, default=Path("runs"))
    ap.add_argument("--preset", default="pspnet_demo")
    ap.add_argument("--source-images", type=int, default=1000, help="synthetic scenes cropped for classification")
    ap.add_argument("--crop-size", type=int, default=64)
    ap.add_argument("--ensemble", type=int, default=3)
    ap.add_argument("--classifier-iters", type=int, default=800)
    ap.add_argument("--smoothgrad-samples", type=int, default=8)
    ap.add_argument("--pretrain-iters", type=int, default=600)
    ap.add_argument("--downstream-train", type=int, default=100, help="downstream training images")
    ap.add_argument("--finetune-iters", type=int, default=400)
    ap.add_argument("--quality-crops", type=int, default=400, help="crops whose pseudo labels are scored")
    args = ap.parse_args(argv)

    from omniseg.bench import cpu_model
    from omniseg.config import load_config
    from omniseg.data.synthetic import generate
    from omniseg.pssl import make_crops, train_classifier, write_pseudo_labels

    work = args.runs / "pssl"
    source = generate(work / "source", num_train=args.source_images, num_val=0, image_size=128, seed=1)
    crops = work / "crops"
    if not (crops / "done").is_file():
        report = make_crops(source, crops, size=args.crop_size, overwrite=True)
        print(report.summary(), flush=True)
        (crops / "done").write_text(report.summary() + "\n")

    classifiers = []
    for seed in range(args.ensemble):
        path = work / f"classifier_{seed}" / "classifier.safetensors"
        if not path.is_file():
            train_classifier(crops, out=path.parent, arch="resnet18", timm_kwargs=NARROW_RESNET18,
                             iters=args.classifier_iters, batch=32, seed=seed, image_size=args.crop_size)
        classifiers.append(path)
    accuracies = [json.loads(p.with_suffix(".json").read_text())["val_accuracy"] for p in classifiers]

    pseudo = work / "pseudo"
    if not (pseudo / "pssl.json").is_file():
        write_pseudo_labels(crops, classifiers, pseudo, n_samples=args.smoothgrad_samples, preset=args.preset,
                            overwrite=True)
    info = json.loads((pseudo / "pssl.json").read_text())
    quality = label_quality(crop_masks(source, crops, args.quality_crops, 0.5, args.crop_size), crops, pseudo)

    # Pre-training: exactly the printed command's overrides, sized for the crops.
    pre_run = work / "pretrain"
    train_argv = shlex.split(info["train_command"])
    pre_cfg = load_config(args.preset, [a for a in train_argv[3:] if not a.startswith("train.output_dir=")] + [
        f"data.crop_size={args.crop_size}", f"data.min_size_test={args.crop_size}", "data.scale_range=[0.75,1.25]",
        f"train.max_iters={args.pretrain_iters}", f"train.eval_period={args.pretrain_iters}",
        f"train.checkpoint_period={args.pretrain_iters}", f"train.output_dir={pre_run}"])
    train_or_reuse(pre_cfg, pre_run)

    down_root = work / f"downstream_{args.downstream_train}"
    down_data = ["data.train.root=" + str(down_root), "data.val.root=" + str(down_root),
                 f"data.synthetic.num_train={args.downstream_train}", "data.synthetic.num_val=100",
                 "data.synthetic.seed=0"]
    total = args.finetune_iters + args.pretrain_iters
    variants = {
        "pssl": (f"PSSL pre-training ({args.pretrain_iters} it), then {args.finetune_iters} it",
                 args.finetune_iters, [f"train.weights={pre_run / 'model_final.safetensors'}"]),
        "scratch": (f"from scratch, {args.finetune_iters} it", args.finetune_iters, []),
        "scratch_long": (f"from scratch, {total} it (= pre-training + fine-tuning steps)", total, []),
    }
    results = {}
    for key, (label, iters, extra) in variants.items():
        run = work / f"{key}_{args.downstream_train}_{iters}"
        cfg = load_config(args.preset, [*down_data, *extra, f"train.max_iters={iters}", f"train.eval_period={iters}",
                                        f"train.checkpoint_period={iters}", f"train.output_dir={run}"])
        train_or_reuse(cfg, run)
        if finished(run):
            m = json.loads((run / "final_metrics.json").read_text())["metrics"]
            results[key] = {"label": label, "iters": iters, "mIoU": m["mIoU"], "pAcc": m["pAcc"],
                            "IoU": m.get("IoU", {})}
    pre_metrics = json.loads((pre_run / "final_metrics.json").read_text())["metrics"]

    machine = f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}"
    command = command_line(__file__, argv)
    n_crops = sum(info["images"].values())
    lines = [
        "# PSSL: pre-training on pseudo labels from classifier explanations, and what it gives downstream", "",
        f"Command: `{command}`", "", f"Machine: {machine}", "",
        f"Source: {args.source_images} synthetic scenes (seed 1), {n_crops} thing crops of {args.crop_size} px in "
        f"{len(info['classes']) - 1} classes. Ensemble: {args.ensemble} narrow ResNet-18 classifiers from scratch, "
        f"{args.classifier_iters} steps each, held-out accuracy "
        + ", ".join(f"{100 * a:.1f}%" for a in accuracies) + f". SmoothGrad with {args.smoothgrad_samples} noisy "
        f"copies (noise 0.15).", "",
        "| pseudo labels | value |", "|---|---|",
        f"| object pixels per crop (top decile) | {100 * info['foreground_fraction']:.1f}% |",
        f"| precision of object pixels vs the true mask ({quality['crops_scored']} crops) | "
        f"{100 * quality['precision']:.1f}% |",
        f"| chance precision (mask share of the crop) | {100 * quality['chance_precision']:.1f}% |",
        f"| recall of the true mask | {100 * quality['recall']:.1f}% |",
        f"| pre-training val mIoU on held-out pseudo labels | {pre_metrics['mIoU']:.1f} |", "",
        f"Downstream: `{args.preset}` on {args.downstream_train} synthetic training scenes (seed 0), scored on 100 "
        "val scenes, same seed and data order for every row.", "",
        "| initialisation | downstream iterations | val pixel acc | val mIoU |", "|---|---|---|---|",
        *[f"| {r['label']} | {r['iters']} | {r['pAcc']:.1f} | {r['mIoU']:.1f} |" for r in results.values()],
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "RESULTS.md").write_text("\n".join(lines) + "\n")
    (args.out / "results.json").write_text(json.dumps(
        {"command": command, "machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
         "classifier_accuracy": accuracies, "pseudo_labels": {"foreground_fraction": info["foreground_fraction"],
                                                              **quality},
         "pretrain_val": pre_metrics, "downstream": results}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
